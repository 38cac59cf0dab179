// src/cpu/thread_pool.hpp — a small persistent thread pool for the CPU backend.
// parallel_for splits [0, n) into contiguous chunks, one per worker; nested calls run inline.
// Thread count: FUSEDMOE_NUM_THREADS, else std::thread::hardware_concurrency().
#pragma once

#include <cstdint>
#include <functional>

namespace fusedmoe::cpu {

int num_threads();
// Makes parallel_for run inline on the calling thread while alive (threads that are already
// concurrent, like the protocol backend's rank threads, need no pool).
class SerialScope {
 public:
  SerialScope();
  ~SerialScope();
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool saved_;
};
// Calls fn(begin, end) over disjoint chunks covering [0, n); blocks until all are done.
// min_chunk: fewest items per chunk (small loops run on the calling thread alone).
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1);

}  // namespace fusedmoe::cpu
