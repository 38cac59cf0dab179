// tests/cpp/random_case.hpp — random layer configurations for the differential harness
// (random shapes, k, E, gates, FFN kinds, capacity, shared experts, world sizes, placements,
// skewed routing). One 64-bit seed determines a whole case, so any case can be replayed.
#pragma once

#include <random>
#include <sstream>

#include "test_util.hpp"

namespace fusedmoe::testing {

struct RandomCase {
  MoeConfig config;
  HostWeights weights;
  Inputs inputs;
  std::string describe;
};

inline RandomCase make_random_case(uint64_t seed, bool allow_fp32 = true) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  RandomCase rc;
  MoeConfig& c = rc.config;
  c.hidden_size = pick(1, 40);
  c.ffn_size = pick(1, 32);
  c.num_experts = pick(1, 16);
  c.gate = static_cast<GateKind>(pick(0, 4));
  if (c.gate == GateKind::kGShardTop2 && c.num_experts < 2) c.num_experts = 2;
  c.top_k = c.gate == GateKind::kSwitchTop1 ? 1 : c.gate == GateKind::kGShardTop2 ? 2 : pick(1, std::min<int64_t>(8, c.num_experts));
  c.ffn = static_cast<FfnKind>(pick(0, 3));
  c.renormalize = coin(0.5);
  const double factors[] = {0.0, 0.0, 0.5, 1.0, 1.25, 2.0};
  c.capacity_factor = factors[pick(0, 5)];
  c.num_shared_experts = coin(0.3) ? pick(1, 2) : 0;
  c.shared_ffn_size = coin(0.5) ? pick(1, 16) : 0;
  c.expert_bias = coin(0.5);
  c.gate_bias = coin(0.5);
  c.dtype = allow_fp32 && coin(0.2) ? DType::kFloat32 : DType::kFloat64;
  const int worlds[] = {1, 2, 4, 8};
  c.world_size = worlds[pick(0, 3)];
  if (c.world_size > c.num_experts || coin(0.3)) {
    c.expert_placement.resize(static_cast<size_t>(c.num_experts));
    for (auto& r : c.expert_placement) r = static_cast<int>(pick(0, c.world_size - 1));
  }
  const int64_t tokens = coin(0.05) ? 0 : pick(1, 70);
  const double gate_scale = coin(0.3) ? 8.0 : 1.5;  // skewed routing
  rc.weights = HostWeights::random(c, seed ^ 0x5151, gate_scale);
  rc.inputs = make_inputs(c, tokens, seed ^ 0xabcd);
  rc.inputs.training = coin(0.5);
  rc.inputs.noise_seed = seed;
  rc.inputs.token_offset = pick(0, 1000);
  // Random split of the tokens over the ranks (zero-token ranks included).
  std::vector<int64_t> cuts = {0, tokens};
  for (int r = 1; r < c.world_size; ++r) cuts.push_back(pick(0, tokens));
  std::sort(cuts.begin(), cuts.end());
  for (int r = 0; r < c.world_size; ++r) rc.inputs.tokens_per_rank.push_back(cuts[r + 1] - cuts[r]);
  if (coin(0.1) && tokens > 0) {  // all tokens to the same experts
    rc.inputs.forced.resize(static_cast<size_t>(tokens * c.top_k));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < c.top_k; ++j) rc.inputs.forced[static_cast<size_t>(t * c.top_k + j)] = static_cast<int32_t>(j);
  }
  std::ostringstream os;
  os << c.summary() << " T=" << tokens << " training=" << rc.inputs.training
     << (rc.inputs.forced.empty() ? "" : " forced") << " gate_scale=" << gate_scale;
  rc.describe = os.str();
  return rc;
}

}  // namespace fusedmoe::testing
