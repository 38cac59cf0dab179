// src/cuda/fused/nccl_transport.hpp — the NCCL transport of the fused kernel (the public side is
// fusedmoe/transport.hpp): the communicator, and the kernel's heaps in an NCCL symmetric window.
//
// The kernel addresses rank q's heap as base + q * stride. That is exactly how NCCL lays out the
// LSA mappings of a window (ncclGetLsaPointer: the LSA team's flat base plus the peer's index
// times a fixed stride), so the kernel takes base and stride from ncclGetLsaPointer once per
// window and needs no other change between emulated and real ranks. Ranks outside the LSA team
// (other nodes) are reached through GIN: the window's device communicator carries the puts and
// signals (gin_link.cuh).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

namespace fusedmoe::cuda::fused {

struct TransportState {
  bool nccl = false;
  int world = 1, rank = 0;
  bool gin = false;  // some ranks are outside this rank's LSA team (reached through GIN)
};
TransportState transport_state();

// The heaps of all W ranks as this rank's kernel sees them.
struct SharedHeaps {
  unsigned char* local = nullptr;  // this rank's heap
  unsigned char* base = nullptr;   // rank 0's heap as mapped here
  int64_t stride = 0;              // bytes from rank q's heap to rank q + 1's
  size_t bytes = 0;                // per rank
  void* window = nullptr;          // ncclWindow_t
  // Ranks outside [lsa_begin, lsa_end) are on other nodes: the kernel reaches them with GIN
  // puts and signals through dev_comm (gin_link.cuh); base + q * stride is valid only inside.
  bool gin = false;
  int lsa_begin = 0, lsa_end = 0;
  ncclDevComm dev_comm{};
};

// Collective (every rank, same `bytes`): a window of `bytes` per rank, zeroed, registered and
// mapped; `stream` is synchronised. Frees `heaps`' previous window first.
void nccl_allocate_heaps(SharedHeaps& heaps, size_t bytes, cudaStream_t stream);
// Collective: deregisters and frees.
void nccl_free_heaps(SharedHeaps& heaps);
// Collective: returns when every rank's work on its stream so far is complete (used after the
// heaps were cleared, before any rank may write into a peer's heap).
void nccl_barrier(cudaStream_t stream);
// Generation of the transport: bumps with every use_nccl_transport / use_local_transport, so
// workspaces built for another communicator are rebuilt.
uint64_t transport_generation();
// Frees every workspace's window (fused_backend.cu); called before the communicator goes.
void release_nccl_heaps();

}  // namespace fusedmoe::cuda::fused
