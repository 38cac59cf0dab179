// tests/cpp/test_cpu_layer.cpp — the CPU backend (layout-based, W emulated ranks) against the
// naive reference, for every gate, FFN kind, capacity mode, shared experts, world size, and the
// adversarial shapes of QUALITY.md. Run: ctest -R cpu_layer (or build/tests/cpp/fusedmoe_tests).
#include <gtest/gtest.h>

#include "test_util.hpp"

namespace fusedmoe::testing {
namespace {

MoeConfig base_config(GateKind gate, FfnKind ffn, DType dtype = DType::kFloat64) {
  MoeConfig c;
  c.hidden_size = 24;
  c.ffn_size = 20;
  c.num_experts = 6;
  c.top_k = gate == GateKind::kSwitchTop1 ? 1 : 2;
  c.gate = gate;
  c.ffn = ffn;
  c.dtype = dtype;
  return c;
}

struct GateFfn {
  GateKind gate;
  FfnKind ffn;
};

class GateFfnTest : public ::testing::TestWithParam<GateFfn> {};

TEST_P(GateFfnTest, CpuMatchesNaiveForwardBackwardInTrainingAndEval) {
  for (bool training : {false, true}) {
    MoeConfig c = base_config(GetParam().gate, GetParam().ffn);
    c.gate_bias = true;
    c.expert_bias = true;
    const uint64_t seed = test_seed() + training;
    HostWeights w = HostWeights::random(c, seed, 3.0);
    Inputs in = make_inputs(c, 37, seed);
    in.training = training;
    Result cpu = run_layer(c, w, in, Backend::kCpu);
    Result naive = run_layer(c, w, in, Backend::kNaive);
    expect_same(cpu, naive, 1e-10, "training=" + std::to_string(training) + " seed=" + std::to_string(seed));
  }
}

std::vector<GateFfn> all_gate_ffn() {
  std::vector<GateFfn> out;
  for (GateKind g : {GateKind::kSoftmaxTopK, GateKind::kSigmoidTopK, GateKind::kNoisyTopK, GateKind::kSwitchTop1,
                     GateKind::kGShardTop2})
    for (FfnKind f : {FfnKind::kReluMlp, FfnKind::kGeluMlp, FfnKind::kSwiGlu, FfnKind::kGeGlu}) out.push_back({g, f});
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllKinds, GateFfnTest, ::testing::ValuesIn(all_gate_ffn()),
                         [](const auto& info) { return to_string(info.param.gate) + "_" + to_string(info.param.ffn); });

TEST(CpuLayer, Fp32MatchesNaive) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu, DType::kFloat32);
  c.num_shared_experts = 1;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 50, seed);
  expect_same(run_layer(c, w, in, Backend::kCpu), run_layer(c, w, in, Backend::kNaive), 2e-5, "fp32");
}

TEST(CpuLayer, CapacityDropsInChoiceMajorOrder) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kReluMlp);
  c.capacity_factor = 0.5;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 40, seed);
  Result cpu = run_layer(c, w, in, Backend::kCpu);
  expect_same(cpu, run_layer(c, w, in, Backend::kNaive), 1e-10, "capacity 0.5");
  const int64_t capacity = c.capacity(40);  // ceil(0.5 * 40 * 2 / 6) = 7
  EXPECT_EQ(capacity, 7);
  int64_t dropped = 0;
  for (int64_t e = 0; e < c.num_experts; ++e) {
    EXPECT_LE(cpu.kept_counts[e], capacity);
    EXPECT_EQ(cpu.kept_counts[e], std::min(cpu.routed[e], capacity));
    dropped += cpu.routed[e] - cpu.kept_counts[e];
  }
  EXPECT_GT(dropped, 0) << "capacity 0.5 must overflow";
  // A first choice is never dropped while a second choice of the same expert is kept.
  for (int64_t e = 0; e < c.num_experts; ++e) {
    bool second_kept = false, first_dropped = false;
    for (int64_t t = 0; t < 40; ++t) {
      if (cpu.idx[t * 2 + 1] == e && cpu.kept[t * 2 + 1]) second_kept = true;
      if (cpu.idx[t * 2] == e && !cpu.kept[t * 2]) first_dropped = true;
    }
    EXPECT_FALSE(second_kept && first_dropped) << "expert " << e;
  }
}

TEST(CpuLayer, SharedExpertsAndBiases) {
  for (FfnKind ffn : {FfnKind::kReluMlp, FfnKind::kGeGlu}) {
    MoeConfig c = base_config(GateKind::kSigmoidTopK, ffn);
    c.num_shared_experts = 2;
    c.shared_ffn_size = 12;
    c.expert_bias = true;
    const uint64_t seed = test_seed();
    HostWeights w = HostWeights::random(c, seed);
    Inputs in = make_inputs(c, 29, seed);
    expect_same(run_layer(c, w, in, Backend::kCpu), run_layer(c, w, in, Backend::kNaive), 1e-10, to_string(ffn));
  }
}

// W emulated ranks, dropless: identical to W = 1 on the concatenated tokens (noise included,
// since the noise key is the global token index).
TEST(CpuLayer, WorldSizesEqualSingleRankDropless) {
  for (GateKind gate : {GateKind::kSoftmaxTopK, GateKind::kNoisyTopK, GateKind::kGShardTop2}) {
    MoeConfig c1 = base_config(gate, FfnKind::kSwiGlu);
    c1.num_experts = 8;
    c1.num_shared_experts = 1;
    const uint64_t seed = test_seed();
    HostWeights w = HostWeights::random(c1, seed, 2.0);
    Inputs in = make_inputs(c1, 41, seed);
    in.training = true;
    Result single = run_layer(c1, w, in, Backend::kCpu);
    for (int world : {2, 4, 8}) {
      MoeConfig cw = c1;
      cw.world_size = world;
      Inputs inw = in;
      inw.tokens_per_rank.assign(static_cast<size_t>(world), 41 / world);
      inw.tokens_per_rank.back() += 41 % world;  // uneven last rank
      expect_same(run_layer(cw, w, inw, Backend::kCpu), single, 1e-12,
                  to_string(gate) + " W=" + std::to_string(world));
    }
  }
}

// With capacity, each rank is its own group: rank r's outputs equal W = 1 on its shard alone.
TEST(CpuLayer, WorldSizesWithCapacityEqualPerShardRuns) {
  MoeConfig c1 = base_config(GateKind::kSoftmaxTopK, FfnKind::kGeluMlp);
  c1.num_experts = 8;
  c1.capacity_factor = 1.0;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c1, seed, 4.0);
  const int world = 4;
  const std::vector<int64_t> shares = {9, 0, 13, 7};
  MoeConfig cw = c1;
  cw.world_size = world;
  Inputs in = make_inputs(c1, 29, seed);
  in.tokens_per_rank = shares;
  Result all = run_layer(cw, w, in, Backend::kCpu);
  expect_same(all, run_layer(cw, w, in, Backend::kNaive), 1e-10, "naive W=4");
  int64_t begin = 0;
  for (int r = 0; r < world; ++r) {
    Inputs shard;
    shard.x = HostTensor(c1.dtype, {shares[r], c1.hidden_size});
    for (int64_t i = 0; i < shard.x.numel(); ++i) shard.x.set(i, in.x.get(begin * c1.hidden_size + i));
    Result one = run_layer(c1, w, shard, Backend::kCpu, /*with_backward=*/false);
    HostTensor y_rank(c1.dtype, {shares[r], c1.hidden_size});
    for (int64_t i = 0; i < y_rank.numel(); ++i) y_rank.set(i, all.y.get(begin * c1.hidden_size + i));
    EXPECT_LE(relative_error(y_rank, one.y), 1e-12) << "rank " << r;
    begin += shares[r];
  }
}

TEST(CpuLayer, NonContiguousPlacementAndUnevenExperts) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  c.num_experts = 7;
  c.world_size = 3;
  c.expert_placement = {2, 0, 1, 0, 2, 2, 1};
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 30, seed);
  MoeConfig single = c;
  single.world_size = 1;
  single.expert_placement.clear();
  Inputs in1 = in;
  in1.tokens_per_rank.clear();
  expect_same(run_layer(c, w, in, Backend::kCpu), run_layer(single, w, in1, Backend::kCpu), 1e-12, "placement");
}

// ---------------------------------------------------------------------- adversarial shapes --

TEST(CpuLayerAdversarial, ZeroTokens) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 0, seed);
  Result r = run_layer(c, w, in, Backend::kCpu);
  EXPECT_EQ(r.y.numel(), 0);
  EXPECT_EQ(r.aux, 0.0);
  for (int64_t e = 0; e < c.num_experts; ++e) EXPECT_EQ(r.routed[e], 0);
  for (int64_t i = 0; i < r.grads.w1.numel(); ++i) ASSERT_EQ(r.grads.w1.get(i), 0.0);
}

TEST(CpuLayerAdversarial, OneTokenAndPrimeCounts) {
  for (int64_t tokens : {1, 2, 3, 13, 61, 127}) {
    MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kGeGlu);
    const uint64_t seed = test_seed() + static_cast<uint64_t>(tokens);
    HostWeights w = HostWeights::random(c, seed);
    Inputs in = make_inputs(c, tokens, seed);
    expect_same(run_layer(c, w, in, Backend::kCpu), run_layer(c, w, in, Backend::kNaive), 1e-10,
                "T=" + std::to_string(tokens));
  }
}

TEST(CpuLayerAdversarial, TopKEqualsNumExperts) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  c.top_k = c.num_experts;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 11, seed);
  Result r = run_layer(c, w, in, Backend::kCpu);
  expect_same(r, run_layer(c, w, in, Backend::kNaive), 1e-10, "k=E");
  for (int64_t e = 0; e < c.num_experts; ++e) EXPECT_EQ(r.routed[e], 11);
}

TEST(CpuLayerAdversarial, AllTokensToOneExpertAndZeroTokenExperts) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  c.top_k = 1;
  c.world_size = 2;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 20, seed);
  in.forced.assign(20, 4);  // every token to expert 4 (rank 1)
  Result r = run_layer(c, w, in, Backend::kCpu);
  expect_same(r, run_layer(c, w, in, Backend::kNaive), 1e-10, "all to one");
  for (int64_t e = 0; e < c.num_experts; ++e) EXPECT_EQ(r.routed[e], e == 4 ? 20 : 0);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    if (e == 4) continue;
    for (int64_t i = 0; i < c.hidden_size * c.ffn_in_width(); ++i)
      ASSERT_EQ(r.grads.w1.get(e * c.hidden_size * c.ffn_in_width() + i), 0.0) << "expert " << e;
  }
}

TEST(CpuLayerAdversarial, SkewedRoutingWithCapacityOverflowAcrossRanks) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kReluMlp);
  c.capacity_factor = 1.25;
  c.world_size = 2;
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  for (int64_t e = 0; e < c.hidden_size; ++e) w.gate_weight.set(e, 2.0);  // expert 0 attracts many
  Inputs in = make_inputs(c, 33, seed);
  in.tokens_per_rank = {17, 16};
  expect_same(run_layer(c, w, in, Backend::kCpu), run_layer(c, w, in, Backend::kNaive), 1e-10, "skewed");
}

TEST(CpuLayerAdversarial, ForcedRoutingWithEmptySlots) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  const uint64_t seed = test_seed();
  HostWeights w = HostWeights::random(c, seed);
  Inputs in = make_inputs(c, 5, seed);
  in.forced = {0, 1, 2, -1, -1, -1, 5, 0, 3, 4};
  Result r = run_layer(c, w, in, Backend::kCpu);
  expect_same(r, run_layer(c, w, in, Backend::kNaive), 1e-10, "forced");
  EXPECT_EQ(r.idx, in.forced);
}

// ----------------------------------------------------------------------------- bad input --

TEST(CpuLayerErrors, RejectsBadArgumentsByName) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  HostWeights w = HostWeights::random(c, 1);
  auto expect_message = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  MoeWeights bad = w.views();
  bad.w1.shape = {6, 24, 21};
  expect_message([&] { MoeLayer(c, bad, Backend::kCpu); }, "w1: shape [6, 24, 21], expected [6, 24, 40]");
  bad = w.views();
  bad.w2 = {};
  expect_message([&] { MoeLayer(c, bad, Backend::kCpu); }, "w2: missing");
  bad = w.views();
  bad.b1 = w.w1.view();
  expect_message([&] { MoeLayer(c, bad, Backend::kCpu); }, "b1: given, but config.expert_bias is off");
  bad = w.views();
  bad.gate_weight.dtype = DType::kFloat32;
  expect_message([&] { MoeLayer(c, bad, Backend::kCpu); }, "gate_weight: dtype fp32");

  MoeLayer layer(c, w.views(), Backend::kCpu);
  HostTensor x(c.dtype, {4, 23}), y(c.dtype, {4, 24});
  expect_message([&] { layer.forward({.x = x.view()}, {.y = y.view()}); }, "x: shape [4, 23]");
  HostTensor x_ok(c.dtype, {4, 24}), y_bad(c.dtype, {5, 24});
  expect_message([&] { layer.forward({.x = x_ok.view()}, {.y = y_bad.view()}); }, "y: shape [5, 24]");
  expect_message([&] { layer.forward({.x = x_ok.view(), .tokens_per_rank = {3}}, {.y = y.view()}); },
                 "tokens_per_rank: entries sum to 3");
  std::vector<int32_t> forced = {0, 6, 1, 2, 3, 3, 0, 1};
  expect_message([&] { layer.forward({.x = x_ok.view(), .forced_topk_idx = forced.data()}, {.y = y.view()}); },
                 "forced_topk_idx[0, 1] = 6");
  forced[1] = 1;
  expect_message([&] { layer.forward({.x = x_ok.view(), .forced_topk_idx = forced.data()}, {.y = y.view()}); },
                 "appears twice");
  HostTensor dy(c.dtype, {4, 24}), dx_bad(c.dtype, {4, 2});
  expect_message([&] { layer.backward({.forward = {.x = x_ok.view()}, .dy = dy.view()}, {.dx = dx_bad.view()}); },
                 "dx: shape [4, 2]");
  MoeConfig bf16 = c;
  bf16.dtype = DType::kBFloat16;
  expect_message([&] { MoeLayer(bf16, w.views(), Backend::kCpu); }, "dtype = bf16");
  expect_message([&] { MoeLayer(c, w.views(), Backend::kCuda); }, "backend: cuda");
}

TEST(CpuLayer, LoadStatsAccumulate) {
  MoeConfig c = base_config(GateKind::kSoftmaxTopK, FfnKind::kSwiGlu);
  HostWeights w = HostWeights::random(c, test_seed());
  MoeLayer layer(c, w.views(), Backend::kCpu);
  HostTensor x = random_tensor(c.dtype, {10, 24}, 3), y(c.dtype, {10, 24});
  layer.forward({.x = x.view()}, {.y = y.view()});
  layer.forward({.x = x.view()}, {.y = y.view()});
  int64_t total = 0;
  for (int64_t v : layer.load_stats().routed) total += v;
  EXPECT_EQ(total, 2 * 10 * 2);
  EXPECT_EQ(layer.load_stats().calls, 2);
  EXPECT_EQ(layer.load_stats().tokens, 20);
  layer.reset_load_stats();
  EXPECT_EQ(layer.load_stats().calls, 0);
  EXPECT_GT(layer.workspace_size(10), 0u);
}

}  // namespace
}  // namespace fusedmoe::testing
