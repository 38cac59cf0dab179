// cli/main.cpp — the `fusedmoe` command: subcommands run, version and help.
//
//   fusedmoe run [--config FILE] [flags]   time and check one MoE layer (run --help: all flags)
//   fusedmoe bench [flags]                 the GPU benchmark with torch baselines (Python:
//                                          python3 -m fusedmoe.bench; bench --help: its flags)
//   fusedmoe version
//   fusedmoe --help
//
// Exit status: 0 success, 1 a numeric check failed, 2 bad arguments, configuration or any other
// error (printed as "fusedmoe: error: <message>"). Tests: cli/tests.cmake.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "fusedmoe/error.hpp"
#include "fusedmoe/moe_layer.hpp"
#include "fusedmoe/version.hpp"
#include "options.hpp"
#include "run_command.hpp"

namespace {

constexpr int kExitError = 2;

// The commands; with_run_flags adds the text of `fusedmoe run --help`.
std::string program_usage(bool with_run_flags) {
  std::string usage =
      "usage: fusedmoe <command> [flags]\n"
      "\n"
      "fusedmoe " FUSEDMOE_VERSION_STRING
      " — a fused Mixture-of-Experts layer for training and inference.\n"
      "\n"
      "Commands:\n"
      "  run        run one MoE layer forward and backward, time it and check it against the\n"
      "             naive reference\n"
      "  bench      time fusedmoe against the torch baselines on the standard configs (runs\n"
      "             python3 -m fusedmoe.bench; needs a GPU and the Python package)\n"
      "  version    print the version and whether a CUDA device is usable\n"
      "  help       this help (also -h, --help)\n";
  if (!with_run_flags)
    return usage + "\nSee 'fusedmoe --help' or 'fusedmoe run --help' for the flags.\n";
  return usage + "\nFlags of 'fusedmoe run':\n\n" + fusedmoe::cli::run_usage();
}

int print_version() {
  std::printf("fusedmoe %s (CUDA device: %s)\n", FUSEDMOE_VERSION_STRING,
              fusedmoe::MoeLayer::cuda_available() ? "available" : "not available");
  return 0;
}

int report_error(const char* message) {
  std::fflush(stdout);
  std::fprintf(stderr, "fusedmoe: error: %s\n", message);
  return kExitError;
}

int dispatch(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::fputs(program_usage(false).c_str(), stderr);
    return kExitError;
  }
  const std::string& command = args.front();
  const std::vector<std::string> command_args(args.begin() + 1, args.end());
  if (command == "run") return fusedmoe::cli::run_command(command_args);
  if (command == "version" || command == "--version") return print_version();
  if (command == "bench") {
    // The baselines are torch code, so the benchmark lives in the Python package.
    std::vector<std::string> argv_strings = {"python3", "-m", "fusedmoe.bench"};
    argv_strings.insert(argv_strings.end(), command_args.begin(), command_args.end());
    std::vector<char*> argv_ptrs;
    for (auto& a : argv_strings) argv_ptrs.push_back(a.data());
    argv_ptrs.push_back(nullptr);
    std::fflush(stdout);
    execvp("python3", argv_ptrs.data());
    throw fusedmoe::Error(std::string("bench: cannot start python3: ") + std::strerror(errno));
  }
  if (command == "help" || command == "--help" || command == "-h") {
    std::fputs(program_usage(true).c_str(), stdout);
    return 0;
  }
  throw fusedmoe::cli::UsageError("unknown command '" + command +
                                  "' (commands: run, bench, version, help)");
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return dispatch(args);
  } catch (const std::bad_alloc&) {
    return report_error("out of host memory; try smaller --tokens or layer sizes");
  } catch (const std::exception& error) {
    return report_error(error.what());
  } catch (...) {
    return report_error("unexpected exception of unknown type");
  }
}
