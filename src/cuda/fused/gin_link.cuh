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
// nodes). What is tested: the index and signal arithmetic (tests/cpp/test_layout.cpp) and the
// protocol with puts and signals emulated (tests/cpp/test_protocol.cpp, "Gin" tests).
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "fusedmoe/layout.hpp"

namespace fusedmoe::cuda::fused {

struct GinLink {
  bool on;                 // some rank of the world is outside this rank's LSA team
  int lsa_begin, lsa_end;  // world ranks [lsa_begin, lsa_end) are load/store peers
  ncclWindow_t window;     // the heaps' window: source and destination of every put
  ncclDevComm comm;        // GIN context 0 and the signals

  __host__ __device__ bool remote(int q) const { return on && (q < lsa_begin || q >= lsa_end); }
};

// Reads this rank's signal `signal` (acquire), i.e. the flag word its writer last published.
__device__ __forceinline__ uint64_t gin_read(const GinLink* link, int64_t signal) {
  const GinLink& g = *link;
  ncclGin gin(g.comm, 0);
  return gin.readSignal(static_cast<ncclGinSignal_t>(signal));
}

// Puts `bytes` from this rank's heap (offset `src`) to `peer`'s heap (offset `dst`), no signal.
__device__ __forceinline__ void gin_put(const GinLink* link, int peer, int64_t dst, int64_t src, int64_t bytes) {
  if (bytes <= 0) return;
  const GinLink& g = *link;
  ncclGin gin(g.comm, 0);
  gin.put(ncclTeamWorld(g.comm), peer, g.window, static_cast<size_t>(dst), g.window, static_cast<size_t>(src),
          static_cast<size_t>(bytes));
}

// Puts `bytes` as gin_put does, then publishes flag word `flag` on `peer`'s signal `signal`;
// `last` (in this rank's gin_sent) holds the value this rank gave that signal before.
__device__ __forceinline__ void gin_publish(const GinLink* link, int peer, int64_t signal, uint64_t* last, uint64_t flag,
                                         int64_t dst, int64_t src, int64_t bytes) {
  const GinLink& g = *link;
  ncclGin gin(g.comm, 0);
  const ncclGin_SignalAdd add{static_cast<ncclGinSignal_t>(signal), flag - *last};
  *last = flag;
  if (bytes > 0)
    gin.put(ncclTeamWorld(g.comm), peer, g.window, static_cast<size_t>(dst), g.window, static_cast<size_t>(src),
            static_cast<size_t>(bytes), add);
  else
    gin.signal(ncclTeamWorld(g.comm), peer, add);
}

}  // namespace fusedmoe::cuda::fused
