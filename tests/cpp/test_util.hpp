// tests/cpp/test_util.hpp — shared helpers of the C++ tests: running a layer on host tensors
// (outputs poisoned with NaN first), comparing results, seeds that are printed.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fusedmoe/fusedmoe.hpp"
#include "fusedmoe/host_tensors.hpp"

namespace fusedmoe::testing {

// A seed per test: FUSEDMOE_TEST_SEED if set, else fresh; recorded in the test's XML/log.
inline uint64_t test_seed() {
  static const uint64_t base = [] {
    if (const char* env = std::getenv("FUSEDMOE_TEST_SEED")) return static_cast<uint64_t>(std::stoull(env));
    return static_cast<uint64_t>(std::random_device{}()) << 20;
  }();
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  uint64_t h = base;
  if (info) for (const char* p = info->name(); *p; ++p) h = h * 131 + static_cast<unsigned char>(*p);
  ::testing::Test::RecordProperty("seed", std::to_string(base));
  return h;
}

inline HostTensor random_tensor(DType dtype, std::vector<int64_t> shape, uint64_t seed, double scale = 1.0) {
  HostTensor t(dtype, std::move(shape));
  std::mt19937_64 rng(seed);
  t.randomize(rng, scale);
  return t;
}

inline HostTensor poisoned(DType dtype, std::vector<int64_t> shape) {
  HostTensor t(dtype, std::move(shape));
  t.fill(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline bool all_finite(const HostTensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.get(i))) return false;
  return true;
}

struct Inputs {
  HostTensor x, dy;
  std::vector<int64_t> tokens_per_rank;
  bool training = false;
  uint64_t noise_seed = 7;
  int64_t token_offset = 0;
  std::vector<int32_t> forced;  // empty = router decides
  double d_aux = 0.0, d_z = 0.0;
};

struct Result {
  HostTensor y;
  std::vector<int32_t> idx;
  HostTensor weight;
  std::vector<uint8_t> kept;
  std::vector<int64_t> routed, kept_counts;
  double aux = 0, z = 0;
  HostTensor dx;
  HostWeights grads;
};

inline ForwardArgs forward_args(const Inputs& in) {
  return ForwardArgs{.x = in.x.view(), .tokens_per_rank = in.tokens_per_rank, .training = in.training,
                     .seed = in.noise_seed, .token_offset = in.token_offset,
                     .forced_topk_idx = in.forced.empty() ? nullptr : in.forced.data()};
}

// Runs forward (and backward when with_backward) on `backend`; every output starts as NaN.
inline Result run_layer(const MoeConfig& config, const HostWeights& weights, const Inputs& in,
                        Backend backend, bool with_backward = true) {
  MoeLayer layer(config, weights.views(), backend);
  const int64_t T = in.x.shape()[0], k = config.top_k, E = config.num_experts;
  Result r;
  r.y = poisoned(config.dtype, {T, config.hidden_size});
  r.weight = poisoned(config.dtype, {T, k});
  r.idx.assign(static_cast<size_t>(T * k), -7);
  r.kept.assign(static_cast<size_t>(T * k), 9);
  r.routed.assign(static_cast<size_t>(E), -1);
  r.kept_counts.assign(static_cast<size_t>(E), -1);
  r.aux = r.z = std::numeric_limits<double>::quiet_NaN();
  layer.forward(forward_args(in), ForwardOutputs{.y = r.y.view(), .topk_idx = r.idx.data(),
                                                 .topk_weight = r.weight.view(), .kept = r.kept.data(),
                                                 .expert_counts = r.routed.data(), .kept_counts = r.kept_counts.data(),
                                                 .aux_loss = &r.aux, .z_loss = &r.z});
  if (with_backward) {
    r.grads = HostWeights::zeros_like(config);
    for (HostTensor* g : r.grads.all()) g->fill(std::numeric_limits<double>::quiet_NaN());
    r.dx = poisoned(config.dtype, {T, config.hidden_size});
    MoeGrads views = r.grads.grad_views(r.dx);
    views.d_gate_weight = r.grads.gate_weight.view();
    layer.backward(BackwardArgs{.forward = forward_args(in), .dy = in.dy.view(), .d_aux = in.d_aux, .d_z = in.d_z},
                   views);
    r.grads.selection_bias = HostTensor();  // not a gradient
  }
  return r;
}

inline Inputs make_inputs(const MoeConfig& config, int64_t num_tokens, uint64_t seed) {
  Inputs in;
  in.x = random_tensor(config.dtype, {num_tokens, config.hidden_size}, seed + 1);
  in.dy = random_tensor(config.dtype, {num_tokens, config.hidden_size}, seed + 2);
  in.d_aux = 0.3;
  in.d_z = 0.05;
  return in;
}

// Compares two results: routing exactly, tensors by relative error.
inline void expect_same(const Result& a, const Result& b, double tol, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(a.idx, b.idx);
  EXPECT_EQ(a.kept, b.kept);
  EXPECT_EQ(a.routed, b.routed);
  EXPECT_EQ(a.kept_counts, b.kept_counts);
  ASSERT_TRUE(all_finite(a.y)) << "y has unwritten (NaN) elements";
  EXPECT_LE(relative_error(a.y, b.y), tol) << "y";
  EXPECT_LE(relative_error(a.weight, b.weight), tol) << "topk_weight";
  EXPECT_NEAR(a.aux, b.aux, tol * (1 + std::abs(b.aux))) << "aux_loss";
  EXPECT_NEAR(a.z, b.z, tol * (1 + std::abs(b.z))) << "z_loss";
  if (a.dx.defined() && b.dx.defined()) {
    ASSERT_TRUE(all_finite(a.dx)) << "dx has unwritten (NaN) elements";
    EXPECT_LE(relative_error(a.dx, b.dx), tol) << "dx";
    auto ga = a.grads.all();
    auto gb = b.grads.all();
    const char* names[] = {"d_gate_weight", "d_gate_bias", "d_noise_weight", "selection_bias", "d_w1", "d_b1",
                           "d_w2", "d_b2", "d_shared_w1", "d_shared_b1", "d_shared_w2", "d_shared_b2"};
    for (size_t i = 0; i < ga.size(); ++i) {
      if (!ga[i]->defined() && !gb[i]->defined()) continue;
      ASSERT_EQ(ga[i]->numel(), gb[i]->numel()) << names[i];
      ASSERT_TRUE(all_finite(*ga[i])) << names[i] << " has unwritten (NaN) elements";
      EXPECT_LE(relative_error(*ga[i], *gb[i]), tol) << names[i];
    }
  }
}

}  // namespace fusedmoe::testing
