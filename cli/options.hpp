// cli/options.hpp — the flags of `fusedmoe run`: one table drives both parsing and --help, so
// every flag is documented with its default. Tests: cli/tests.cmake (cli_run_help_lists_flags,
// cli_bad_*, cli_unknown_flag, cli_config_file).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedmoe/config.hpp"
#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe::cli {

// A mistake on the command line (unknown flag, missing or malformed value). Reported like
// fusedmoe::Error: "fusedmoe: error: <message>", exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Everything `fusedmoe run` needs. Member defaults are the documented defaults.
struct RunOptions {
  MoeConfig config;          // the layer; starts as default_run_config()
  int64_t num_tokens = 512;  // T, over all ranks
  uint64_t seed = 1234;      // weights, inputs and gate noise
  Backend backend = Backend::kAuto;
  bool training = false;            // gate noise, Switch jitter, GShard random routing
  double gate_scale = 1.0;          // scale of the router weights: larger = more peaked routing
  int iterations = 3;               // timed repetitions of forward and backward; median reported
  bool check = true;                // compare with the naive reference
  std::optional<double> tolerance;  // on relative errors; unset = tolerance_for()
  bool show_help = false;           // -h / --help was given
  // local: W ranks emulated in this process. nccl: this process is one rank of a job launched
  // with one process per GPU (mpirun, srun, torchrun): rank and size from the launcher's
  // environment, the fused kernel over an NCCL communicator (backend fused, forward only).
  std::string transport = "local";
  std::string nccl_id_file;  // where rank 0 leaves the NCCL unique id; empty = a file in /tmp
};

// The layer `fusedmoe run` uses when no flag changes it: small enough to run with the naive check
// in a few seconds on two cores.
MoeConfig default_run_config();

// Default tolerance on relative errors: 1e-6 for fp64, 1e-4 for fp32, 5e-3 for fp32 through
// TF32 tensor cores (the cuda backend with fp32_math = tf32).
double tolerance_for(const MoeConfig& config, Backend backend);

// The --backend spelling of a backend: auto, cpu, naive, cuda, threads.
std::string backend_name(Backend backend);

// Parses the arguments that follow "run", in order (a --config file is applied where it
// appears; flags after it override it). Throws UsageError or fusedmoe::Error naming the flag or
// field. Does not validate the config as a whole: the caller does (MoeConfig::validate).
RunOptions parse_run_options(const std::vector<std::string>& args);

// The text of `fusedmoe run --help`: every flag, its value, its meaning and its default.
std::string run_usage();

}  // namespace fusedmoe::cli
