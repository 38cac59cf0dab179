// cli/launcher.hpp — one process per GPU: this process's rank as the launcher (mpirun, srun,
// torchrun) gives it in the environment, and the hand-over of the NCCL unique id from rank 0
// to the others through a file (the NCCL transport's ranks share one node, so /tmp is common
// to them). No MPI library is needed: mpirun only starts the processes.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fusedmoe::cli {

struct LauncherRank {
  int rank = 0, world = 1, local_rank = 0;
  std::string launcher;  // which environment named them, e.g. "Open MPI"
};

// Open MPI (OMPI_COMM_WORLD_*), MPICH / Intel MPI (PMI_*), Slurm (SLURM_PROCID, ...), torchrun
// (RANK, WORLD_SIZE, LOCAL_RANK), in that order; nullopt when none is set. Throws UsageError on
// a malformed or inconsistent value.
std::optional<LauncherRank> launcher_rank_from_env();

// The default id file: /tmp/fusedmoe-nccl-<parent pid>.id (the ranks of one node are children
// of the same launcher process).
std::string default_id_file();

// Rank 0 writes `bytes` to `path` (a temporary file renamed into place, so readers never see a
// partial id); the other ranks wait up to `timeout_s` for it and return its contents.
std::vector<char> share_through_file(const LauncherRank& me, const std::string& path,
                                     const std::vector<char>& bytes, double timeout_s);

}  // namespace fusedmoe::cli
