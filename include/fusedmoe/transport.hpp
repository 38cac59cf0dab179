// fusedmoe/transport.hpp — where the ranks of the fused kernel (Backend::kFused) live.
//
// Local (the default): one process; a config with world_size = W runs W emulated ranks as W
// slices of one grid on one GPU, x holding all ranks' tokens.
//
// NCCL: one process per GPU, rank r of W. The heaps of the kernel live in an NCCL symmetric
// memory window; the kernel reaches its peers' heaps through NCCL's load/store-accessible (LSA)
// pointers (NVLink / PCIe P2P) and signals with system-scope release/acquire flags in window
// memory. A fused layer's config must have world_size = W; x holds this rank's tokens only,
// and every rank calls forward with the same token count (the heaps' layout depends on it).
//
//   auto id = fusedmoe::nccl_unique_id();            // on rank 0, then broadcast (MPI, torch)
//   fusedmoe::use_nccl_transport(id, world, rank);   // collective over the W processes
//   layer.forward(...);                               // runs rank `rank` of the fused layer
//   fusedmoe::use_local_transport();                  // collective; frees the window
//
// libnccl is loaded when the transport is first used, so fusedmoe itself runs without it:
// FUSEDMOE_NCCL_LIBRARY if set, else a libnccl.so.2 already in the process (torch's), else the
// loader's search path. It must be at least the version of the NCCL headers fusedmoe was built
// with (2.28.9 here; the device side reads NCCL's window structure). Ranks must all be LSA peers (one node); the inter-node
// (GIN) transport is not available.
#pragma once

#include <array>
#include <cstdint>

namespace fusedmoe {

struct NcclUniqueId {
  std::array<char, 128> bytes{};  // ncclUniqueId
};

// A new NCCL unique id (call on one rank, share with the others).
NcclUniqueId nccl_unique_id();

// Collective over `world` processes: creates the communicator on the current CUDA device and
// binds this process's fused forwards to rank `rank`. Replaces an earlier NCCL transport.
void use_nccl_transport(const NcclUniqueId& id, int world, int rank);

// Collective when an NCCL transport is active: destroys it and returns to emulated ranks.
void use_local_transport();

struct TransportInfo {
  bool nccl = false;
  int world = 1;  // NCCL: the communicator's size
  int rank = 0;   // NCCL: this process's rank
};
TransportInfo fused_transport();

}  // namespace fusedmoe
