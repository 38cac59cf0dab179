// src/protocol/transport.hpp — the transport concept of the fused layer's protocol, and its
// CPU-threads implementation.
//
// Every transport gives the same four operations over a symmetric region (one heap per rank,
// all with the same WorkspaceLayout, addressed by byte offsets):
//   put(dst_rank, dst_offset, src, bytes)   plain stores into a peer's heap (rows, metadata)
//   signal(dst_rank, flag_offset, value)    release-store of a 64-bit flag: every put issued
//                                            before it by this thread is visible to whoever
//                                            acquires the flag
//   wait(rank, flag_offset, epoch, ...)     acquire-load loop until the flag's epoch is at least
//                                            `epoch` (wrap-safe); bounded by a clock timeout that
//                                            records {rank, what, flag, expected, seen} in the
//                                            shared error record and aborts every other wait
//   aborted()                               true once any wait has failed
// The GPU transports (local, emulated ranks, NCCL LSA) implement the same operations with
// st.release.sys / ld.acquire.sys on flags; this one uses std::atomic_ref with release/acquire,
// and is what the ThreadSanitizer test runs (tests/cpp/test_protocol.cpp).
// Peers on another node (NCCL GIN) take puts of registered memory instead of stores, and their
// flags are signals that only add; the same object emulates them:
//   gin_put(dst_rank, dst_offset, src_rank, src_offset, bytes, signal, add)
//                                            copy, then (signal >= 0) add to dst_rank's signal
//                                            (release): the payload is visible to whoever
//                                            acquires the signal
//   wait_signal(rank, signal, epoch, ...)    as wait, on one of this rank's signals
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fusedmoe/layout.hpp"

namespace fusedmoe::protocol {

// What a failed wait reports (the host turns it into a fusedmoe::Error).
struct WaitFailure {
  int rank = -1;           // the rank that waited
  std::string what;        // which flag ("dispatch flag (source 2, local expert 1)", ...)
  uint32_t expected_epoch = 0;
  uint64_t seen = 0;       // the flag's last value
  double waited_ms = 0;
  std::string violation;    // set instead of a timeout when a rank saw an impossible value
  std::string message() const {
    std::ostringstream os;
    if (!violation.empty()) {
      os << "rank " << rank << ": " << violation;
      return os.str();
    }
    os << "rank " << rank << " timed out after " << waited_ms << " ms waiting for " << what << ": expected epoch "
       << expected_epoch << ", last seen flag 0x" << std::hex << seen << std::dec << " (epoch " << flag_epoch(seen)
       << ", count " << flag_count(seen) << ")";
    return os.str();
  }
};

class CpuThreadsTransport {
 public:
  CpuThreadsTransport() = default;

  // (Re)allocates W heaps of `bytes` each when the size changes (zeroed: every flag at epoch 0).
  // Returns true when it reallocated (the caller restarts its epochs).
  bool ensure(int world_size, int64_t bytes, int64_t signals = 0) {
    if (world_size == static_cast<int>(heaps_.size()) && bytes == bytes_ && signals == signal_count_) return false;
    heaps_.assign(static_cast<size_t>(world_size), std::vector<unsigned char>(static_cast<size_t>(bytes), 0));
    signals_.assign(static_cast<size_t>(world_size), std::vector<uint64_t>(static_cast<size_t>(signals), 0));
    bytes_ = bytes;
    signal_count_ = signals;
    return true;
  }
  void reset_errors() {
    aborted_.store(false);
    failure_ = {};
  }

  unsigned char* heap(int rank) { return heaps_[static_cast<size_t>(rank)].data(); }
  template <class T>
  T* at(int rank, int64_t offset) { return reinterpret_cast<T*>(heap(rank) + offset); }

  void put(int dst_rank, int64_t dst_offset, const void* src, size_t bytes) {
    std::memcpy(heap(dst_rank) + dst_offset, src, bytes);
  }
  void signal(int dst_rank, int64_t flag_offset, uint64_t value) {
    std::atomic_ref<uint64_t>(*at<uint64_t>(dst_rank, flag_offset)).store(value, std::memory_order_release);
  }
  uint64_t load_flag(int rank, int64_t flag_offset) {
    return std::atomic_ref<uint64_t>(*at<uint64_t>(rank, flag_offset)).load(std::memory_order_acquire);
  }

  void gin_put(int dst_rank, int64_t dst_offset, int src_rank, int64_t src_offset, size_t bytes, int64_t signal,
               uint64_t add) {
    if (bytes > 0) std::memcpy(heap(dst_rank) + dst_offset, heap(src_rank) + src_offset, bytes);
    if (signal < 0) return;
    std::atomic_ref<uint64_t>(signals_[static_cast<size_t>(dst_rank)][static_cast<size_t>(signal)])
        .fetch_add(add, std::memory_order_release);
  }
  uint64_t load_signal(int rank, int64_t signal) {
    return std::atomic_ref<uint64_t>(signals_[static_cast<size_t>(rank)][static_cast<size_t>(signal)])
        .load(std::memory_order_acquire);
  }

  // Waits on this rank's own heap. Returns the flag value, or nothing (after recording the
  // failure, or because another wait failed) when it gave up.
  bool wait(int rank, int64_t flag_offset, uint32_t epoch, const std::string& what, std::chrono::milliseconds timeout,
            uint64_t* value) {
    return wait_until([&] { return load_flag(rank, flag_offset); }, rank, epoch, what, timeout, value);
  }
  bool wait_signal(int rank, int64_t signal, uint32_t epoch, const std::string& what,
                   std::chrono::milliseconds timeout, uint64_t* value) {
    return wait_until([&] { return load_signal(rank, signal); }, rank, epoch, what, timeout, value);
  }
  template <class Load>
  bool wait_until(Load load, int rank, uint32_t epoch, const std::string& what, std::chrono::milliseconds timeout,
                  uint64_t* value) {
    const auto start = std::chrono::steady_clock::now();
    uint64_t seen = 0;
    for (uint64_t spins = 0;; ++spins) {
      seen = load();
      if (epoch_reached(flag_epoch(seen), epoch)) {
        *value = seen;
        return true;
      }
      if (aborted_.load(std::memory_order_relaxed)) return false;
      if (spins % 64 == 63) {
        std::this_thread::yield();
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited > timeout) {
          std::lock_guard<std::mutex> lock(failure_mutex_);
          if (!aborted_.exchange(true)) {
            failure_ = WaitFailure{.rank = rank, .what = what, .expected_epoch = epoch, .seen = seen,
                                   .waited_ms = std::chrono::duration<double, std::milli>(waited).count()};
          }
          return false;
        }
      }
    }
  }
  // Records a protocol violation found by a rank (first one wins) and aborts every wait.
  void fail(const WaitFailure& failure) {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    if (!aborted_.exchange(true)) failure_ = failure;
  }
  bool aborted() const { return aborted_.load(); }
  WaitFailure failure() {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    return failure_;
  }

 private:
  std::vector<std::vector<unsigned char>> heaps_;
  std::vector<std::vector<uint64_t>> signals_;  // per rank: its GIN signals
  int64_t bytes_ = -1, signal_count_ = -1;
  std::atomic<bool> aborted_{false};
  std::mutex failure_mutex_;
  WaitFailure failure_;
};

}  // namespace fusedmoe::protocol
