// cli/launcher.cpp — see launcher.hpp.
#include "launcher.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>

#include "fusedmoe/error.hpp"
#include "options.hpp"

namespace fusedmoe::cli {

namespace {

std::optional<int> env_int(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || text[0] == 0) return std::nullopt;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != 0 || value < 0 || value > 1 << 20)
    throw UsageError(std::string("launcher environment: ") + name + " = '" + text + "' is not a rank count");
  return static_cast<int>(value);
}

}  // namespace

std::optional<LauncherRank> launcher_rank_from_env() {
  struct Names {
    const char *rank, *world, *local, *launcher;
  };
  constexpr Names kLaunchers[] = {
      {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"},
      {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI (MPICH, Intel MPI)"},
      {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "Slurm"},
      {"RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"},
  };
  for (const Names& names : kLaunchers) {
    const auto rank = env_int(names.rank), world = env_int(names.world);
    if (!rank || !world) continue;
    if (*world < 1 || *rank >= *world)
      throw UsageError(std::string("launcher environment (") + names.launcher + "): rank " + std::to_string(*rank) +
                       " of " + std::to_string(*world));
    return LauncherRank{*rank, *world, env_int(names.local).value_or(*rank), names.launcher};
  }
  return std::nullopt;
}

std::string default_id_file() {
  return "/tmp/fusedmoe-nccl-" + std::to_string(static_cast<long>(getppid())) + ".id";
}

std::vector<char> share_through_file(const LauncherRank& me, const std::string& path,
                                     const std::vector<char>& bytes, double timeout_s) {
  if (me.rank == 0) {
    const std::string temporary = path + ".tmp";
    {
      std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      if (!out) throw Error("--nccl-id-file: cannot write " + temporary);
    }
    if (std::rename(temporary.c_str(), path.c_str()) != 0) throw Error("--nccl-id-file: cannot create " + path);
    return bytes;
  }
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::vector<char> read((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (read.size() == bytes.size()) return read;
    }
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s)
      throw Error("--transport nccl: rank " + std::to_string(me.rank) + " waited " + std::to_string(timeout_s) +
                  " s for rank 0's NCCL id in " + path +
                  " (the ranks must share a node and this path; set --nccl-id-file)");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace fusedmoe::cli
