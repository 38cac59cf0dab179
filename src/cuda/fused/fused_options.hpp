// src/cuda/fused/fused_options.hpp — options of the fused persistent-kernel backend
// (Backend::kFused): the bounded-wait timeout, when launch errors are checked, and planted
// faults for tests. Process-wide; read at the start of every forward.
#pragma once

namespace fusedmoe::cuda::fused {

struct FusedOptions {
  double timeout_ms = 0;          // every bounded wait inside the kernel; 0: the environment's
                                  // FUSEDMOE_FUSED_TIMEOUT_MS, else 5000
  // true: forward synchronises its stream after the launch and raises a protocol error at once.
  // false (default): the error record is copied back asynchronously and checked (raised) at the
  // next forward, so forward never blocks the host. Under CUDA-graph capture it is never
  // synchronous.
  bool sync_check = false;
  // true: the portable mma.sync engine even where the Hopper (wgmma/TMA) engine could run (tests
  // of the portable engine on Hopper; also FUSEDMOE_FUSED_PORTABLE=1 in the environment).
  bool portable_engine = false;
  int silent_rank = -1;           // fault: this rank never dispatches (its peers must time out)
  bool flag_before_data = false;  // fault: raise every dispatch flag before writing the rows
  bool drop_shared_tiles = false; // fault: shared-expert GEMM1 tiles are never counted (the
                                  // combine's wait for them must time out)
  // Tests of the GIN paths on one GPU: > 0 (and < world_size, emulated ranks): ranks form teams
  // of this many, and the other teams are reached through the kernel's GIN paths with puts and
  // signals emulated by copies and atomics in the heaps (gin_link.cuh).
  int gin_lsa_size = 0;
  int unfinished_rank = -1;       // fault: this rank never announces the end of the launch (every
                                  // rank's next launch must time out waiting for it)
  // Faults of the Hopper engine's in-block waits: kStallScheduler — the scheduler thread of
  // block 0 never publishes a task (its consumers' task-ring wait must time out);
  // kStallProducer — every block's scheduler publishes its first task but never loads its
  // stages (the consumers' stage wait, or a peer waiting for that task's results, must time
  // out). Either way the stalled thread gives up when the launch aborts.
  enum Stall { kNoStall = 0, kStallScheduler = 1, kStallProducer = 2 };
  int stall = kNoStall;
};

void set_fused_options(const FusedOptions& options);
FusedOptions fused_options();

}  // namespace fusedmoe::cuda::fused
