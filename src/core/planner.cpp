// src/core/planner.cpp — see fusedmoe/planner.hpp.
#include "fusedmoe/planner.hpp"

#include <algorithm>
#include <sstream>

#include "fusedmoe/error.hpp"

namespace fusedmoe {

TilePlan make_plan(const MoeConfig& config, int64_t max_tokens, const DeviceInfo& device) {
  config.validate();
  FUSEDMOE_CHECK(max_tokens >= 0, "max_tokens = " << max_tokens << ": must be >= 0");
  FUSEDMOE_CHECK(device.sm_count > 0, "device.sm_count = " << device.sm_count << ": must be > 0");
  TilePlan plan;
  const int64_t elem = static_cast<int64_t>(dtype_size(config.dtype));
  plan.use_wgmma = device.cc_major == 9 && config.dtype != DType::kFloat64;
  // Small batches (decode) use short tiles so that weight streaming is spread over more blocks.
  const int64_t rows_per_expert = max_tokens * config.top_k / std::max<int64_t>(1, config.num_experts);
  plan.block_m = rows_per_expert <= 64 ? 64 : 128;
  plan.block_k = elem >= 4 ? 32 : 64;
  plan.block_n0 = 128;
  plan.block_n1 = 128;
  // Shared memory: A tile + B tile (two B tiles for gated GEMM0) per stage.
  const int64_t b_tiles = config.gated() ? 2 : 1;
  auto stage_bytes = [&](const TilePlan& p) {
    return (static_cast<int64_t>(p.block_m) + b_tiles * p.block_n0) * p.block_k * elem;
  };
  const int64_t reserve = 1024;  // barriers, scheduler slots
  plan.stages = static_cast<int>(std::min<int64_t>(
      6, (device.smem_per_block - reserve) / std::max<int64_t>(1, stage_bytes(plan))));
  while (plan.stages < 2 && plan.block_n0 > 32) {
    plan.block_n0 /= 2;
    plan.block_n1 = plan.block_n0;
    plan.stages = static_cast<int>(std::min<int64_t>(
        6, (device.smem_per_block - reserve) / stage_bytes(plan)));
  }
  FUSEDMOE_CHECK(plan.stages >= 2, "device.smem_per_block = " << device.smem_per_block
                                   << ": too small for a two-stage pipeline of "
                                   << stage_bytes(plan) << " B per stage");
  plan.smem_bytes = plan.stages * stage_bytes(plan) + reserve;
  plan.num_blocks = device.sm_count * std::max(1, device.blocks_per_sm);
  plan.n0_tiles = (config.ffn_size + plan.block_n0 - 1) / plan.block_n0;
  plan.n1_tiles = (config.hidden_size + plan.block_n1 - 1) / plan.block_n1;
  plan.k0_steps = (config.hidden_size + plan.block_k - 1) / plan.block_k;
  plan.k1_steps = (config.ffn_size + plan.block_k - 1) / plan.block_k;
  plan.layout = LayoutParams{
      .world_size = config.world_size,
      .max_local_experts = config.max_local_experts(),
      .num_experts = config.num_experts,
      .top_k = config.top_k,
      .hidden_size = config.hidden_size,
      .ffn_size = config.ffn_size,
      .max_tokens = max_tokens,
      .capacity = config.dropless() ? 0 : config.capacity(max_tokens),
      .element_size = elem,
      .block_m = plan.block_m,
  };
  return plan;
}

std::string TilePlan::to_string() const {
  std::ostringstream os;
  os << "tile " << block_m << "x" << block_n0 << "/" << block_n1 << "x" << block_k << ", "
     << stages << " stages, " << smem_bytes / 1024 << " KiB smem, " << num_blocks << " blocks, "
     << (use_wgmma ? "wgmma" : "mma.sync") << ", tiles n0=" << n0_tiles << " n1=" << n1_tiles;
  return os.str();
}

}  // namespace fusedmoe
