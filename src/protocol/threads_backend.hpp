// src/protocol/threads_backend.hpp — options of the CPU-threads protocol backend
// (Backend::kThreads), for tests: the wait timeout and three planted faults.
#pragma once

#include <chrono>

namespace fusedmoe::protocol {

struct ThreadsOptions {
  std::chrono::milliseconds timeout{5000};  // every bounded wait
  int silent_rank = -1;          // fault: this rank never dispatches (its peers must time out)
  bool flag_before_data = false; // fault: raise each dispatch flag before writing its rows
  // > 0: ranks form load/store teams of lsa_size consecutive ranks, and the other teams are
  // reached as NCCL GIN reaches other nodes (puts of staged rows, signals that add).
  int lsa_size = 0;
  int unfinished_rank = -1;      // fault: this rank never announces the end of its launch (every
                                 // rank's next launch must time out waiting for it)
};

// Process-wide; read at the start of every forward.
void set_threads_options(const ThreadsOptions& options);
ThreadsOptions threads_options();

}  // namespace fusedmoe::protocol
