// fusedmoe/timeline.hpp — the fused kernel's debug timeline: per block, the start and end
// (GPU global timer, ns) of each phase and of every expert task, for one forward.
//
//   fusedmoe::set_fused_timeline(true);   // the next forwards of Backend::kFused record
//   layer.forward(...);                   // synchronises its stream once to copy the events
//   auto events = fusedmoe::fused_timeline();
//
// Recording costs one global-timer read and one 32-byte store per task; it synchronises the
// stream after each recorded forward and is not allowed under CUDA-graph capture.
#pragma once

#include <cstdint>
#include <vector>

namespace fusedmoe {

// kSchedule: the Hopper engine's scheduler thread looking up its next task (overlaps the
// consumers' GEMM tasks of the same block). Parts of a phase (inside its interval): kRouterLogits,
// a chunk's gate GEMM in the router phase; kDispatchCopy, a chunk's row copies in the dispatch.
enum class FusedEventKind : int32_t {
  kRouter = 0, kDispatch = 1, kGemm0 = 2, kGemm1 = 3, kCombine = 4, kSchedule = 5, kRouterLogits = 6, kDispatchCopy = 7
};

struct FusedEvent {
  int64_t start_ns, end_ns;  // GPU global timer
  int32_t block, sm, rank;
  FusedEventKind kind;
};

void set_fused_timeline(bool enabled);
// The events of the last forward recorded (empty if none); blocks = grid size of that launch.
std::vector<FusedEvent> fused_timeline(int* blocks = nullptr);

}  // namespace fusedmoe
