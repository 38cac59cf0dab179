// fusedmoe/planner.hpp — tile shapes, block count, pipeline stages and shared memory of a launch,
// chosen from the problem shape and the device. Printable, host-only, unit-tested
// (tests/cpp/test_layout.cpp, PlannerTest).
#pragma once

#include <cstdint>
#include <string>

#include "fusedmoe/config.hpp"
#include "fusedmoe/layout.hpp"

namespace fusedmoe {

struct DeviceInfo {
  int sm_count = 132;
  int cc_major = 9;                      // compute capability
  int cc_minor = 0;
  int64_t smem_per_block = 227 * 1024;   // opt-in shared memory per block
  int blocks_per_sm = 1;                 // occupancy of the persistent kernel
};

struct TilePlan {
  int block_m = 128;     // rows (tokens) per tile
  int block_n0 = 128;    // GEMM0 output columns per tile (gated: of each half)
  int block_n1 = 128;    // GEMM1 output columns per tile
  int block_k = 64;
  int stages = 4;        // smem pipeline depth
  bool use_wgmma = true; // sm_90a path; mma.sync otherwise
  int num_blocks = 0;    // persistent grid size = sm_count · blocks_per_sm
  int64_t smem_bytes = 0;
  int64_t n0_tiles = 0;  // ceil(I / block_n0)
  int64_t n1_tiles = 0;  // ceil(H / block_n1)
  int64_t k0_steps = 0;  // ceil(H / block_k)
  int64_t k1_steps = 0;  // ceil(I / block_k)
  LayoutParams layout;

  std::string to_string() const;
};

// max_tokens: the most tokens one rank holds in a call. Throws naming the argument when the
// shape cannot be planned on the device (e.g. not enough shared memory for two stages).
TilePlan make_plan(const MoeConfig& config, int64_t max_tokens, const DeviceInfo& device);

}  // namespace fusedmoe
