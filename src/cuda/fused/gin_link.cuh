// src/cuda/fused/gin_link.cuh — peers of the fused kernel on other nodes, through NCCL GIN
// (GPU-initiated networking: puts between registered windows and signals that only add).
//
// Ranks of this rank's LSA team (one node: NVLink or P2P) are stored into directly, as always
// (heap q at heap_base + q * heap_stride). Every other rank is "remote": nothing is stored into
// its heap. The protocol is the same (design.md), with three substitutions (layout.hpp has the
// sections and indices, src/protocol/threads_backend.cpp runs the same logic on CPU threads
// under ThreadSanitizer):
//   - dispatch rows and their token·k + j are staged in this rank's out_rows / out_meta at the
//     index they will have in the owner's recv_rows / recv_meta; the block that completes a
//     (source, expert) segment puts the rows, then the metadata with a signal add;
//   - results for a remote source go to this rank's out_ret in segment order (at their
//     recv_rows index), and the last GEMM1 tile of the segment puts them in one piece into the
//     source's ret_recv (the combine reads (t, j) at the index its dispatch recorded, sent_row);
//   - a flag word f for a remote rank is published as SignalAdd(f - last), `last` being what
//     this rank gave that signal before (gin_sent, in its own heap): each signal has one writer,
//     so the receiver's signal then reads exactly f and every wait compares epochs and counts
//     as it does on a flag. NCCL makes a signal visible only after the payloads of the puts
//     issued before it on the same context to the same peer, so data-then-flag still holds.
// All puts and signals use GIN context 0: "the same context" then covers puts issued by
// different blocks for one segment (rows, then metadata) and the receiver reads its signals
// on the context they arrive on.
// What cannot be run here: any real GIN traffic (it needs a GIN-capable network between
// nodes). What is tested: the index and signal arithmetic (tests/cpp/test_layout.cpp), the
// protocol with puts and signals emulated on CPU threads (tests/cpp/test_protocol.cpp, "Gin"
// tests), and this kernel's GIN paths with emulated ranks on one GPU (GinLink::emulated: a put
// is a copy by the issuing thread, a signal a system-scope atomic add in the receiver's heap;
// FusedOptions::gin_lsa_size, GPU test FusedKernel.GinPathsOnEmulatedRanks).
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "fusedmoe/layout.hpp"

namespace fusedmoe::cuda::fused {

struct GinLink {
  bool on;                 // some rank of the world is outside this rank's LSA team
  bool emulated;           // tests on one GPU: emulated ranks, puts as copies, signals in heaps
  int lsa_size;            // LSA teams: ranks [i * lsa_size, (i + 1) * lsa_size)
  int64_t signals_offset;  // emulated: this rank's signals (layout gin_signals) in its heap
  ncclWindow_t window;     // the heaps' window: source and destination of every put
  ncclDevComm comm;        // GIN context 0 and the signals

  __host__ __device__ bool remote(int r, int q) const { return on && r / lsa_size != q / lsa_size; }
};

__device__ __forceinline__ void red_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Reads this rank's signal `signal` (acquire), i.e. the flag word its writer last published.
// `self`: this rank's heap.
__device__ __forceinline__ uint64_t gin_read(const GinLink& g, unsigned char* self, int64_t signal) {
  if (g.emulated) {
    uint64_t v;
    const uint64_t* p = reinterpret_cast<const uint64_t*>(self + g.signals_offset) + signal;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
  }
  ncclGin gin(g.comm, 0);
  return gin.readSignal(static_cast<ncclGinSignal_t>(signal));
}

// Puts `bytes` from this rank's heap (`self`, offset `src`) to `peer`'s heap (offset `dst`; the
// emulation copies into `peer_heap`), no signal.
__device__ __forceinline__ void gin_put(const GinLink& g, int peer, unsigned char* self, unsigned char* peer_heap,
                                        int64_t dst, int64_t src, int64_t bytes) {
  if (bytes <= 0) return;
  if (g.emulated) {  // one thread: test sizes only
    const unsigned char* from = self + src;
    unsigned char* to = peer_heap + dst;
    int64_t i = 0;
    if (((reinterpret_cast<uintptr_t>(from) | reinterpret_cast<uintptr_t>(to)) & 15u) == 0)
      for (; i + 16 <= bytes; i += 16) *reinterpret_cast<uint4*>(to + i) = *reinterpret_cast<const uint4*>(from + i);
    for (; i < bytes; ++i) to[i] = from[i];
    return;
  }
  ncclGin gin(g.comm, 0);
  gin.put(ncclTeamWorld(g.comm), peer, g.window, static_cast<size_t>(dst), g.window, static_cast<size_t>(src),
          static_cast<size_t>(bytes));
}

// Puts `bytes` as gin_put does, then publishes flag word `flag` on `peer`'s signal `signal`;
// `last` (in this rank's gin_sent) holds the value this rank gave that signal before.
__device__ __forceinline__ void gin_publish(const GinLink& g, int peer, unsigned char* self, unsigned char* peer_heap,
                                            int64_t signal, uint64_t* last, uint64_t flag, int64_t dst = 0,
                                            int64_t src = 0, int64_t bytes = 0) {
  const uint64_t add = flag - *last;
  *last = flag;
  if (g.emulated) {
    gin_put(g, peer, self, peer_heap, dst, src, bytes);
    __threadfence_system();
    red_release_sys(reinterpret_cast<uint64_t*>(peer_heap + g.signals_offset) + signal, add);
    return;
  }
  ncclGin gin(g.comm, 0);
  const ncclGin_SignalAdd signal_add{static_cast<ncclGinSignal_t>(signal), add};
  if (bytes > 0)
    gin.put(ncclTeamWorld(g.comm), peer, g.window, static_cast<size_t>(dst), g.window, static_cast<size_t>(src),
            static_cast<size_t>(bytes), signal_add);
  else
    gin.signal(ncclTeamWorld(g.comm), peer, signal_add);
}

}  // namespace fusedmoe::cuda::fused
