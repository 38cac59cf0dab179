// tests/cpp/test_gradients.cpp — backward of the CPU backend (and so of the naive one, which
// test_cpu_layer.cpp ties to it) against central finite differences in fp64.
// L = ⟨dy, y⟩ + d_aux · aux_loss + d_z · z_loss; for each parameter tensor P and a random
// direction V:  (L(P + hV) − L(P − hV)) / 2h  vs  ⟨∂L/∂P, V⟩, relative error < 1e-6.
#include <gtest/gtest.h>

#include "test_util.hpp"

namespace fusedmoe::testing {
namespace {

struct Probe {
  double loss = 0;
  std::vector<int32_t> idx;
  std::vector<uint8_t> kept;
};

Probe evaluate(const MoeConfig& c, const HostWeights& w, const Inputs& in) {
  Result r = run_layer(c, w, in, Backend::kCpu, /*with_backward=*/false);
  Probe p;
  for (int64_t i = 0; i < r.y.numel(); ++i) p.loss += r.y.get(i) * in.dy.get(i);
  p.loss += in.d_aux * r.aux + in.d_z * r.z;
  p.idx = r.idx;
  p.kept = r.kept;
  return p;
}

double dot(const HostTensor& a, const HostTensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.get(i) * b.get(i);
  return s;
}

void check_gradients(const MoeConfig& c, bool training, uint64_t seed) {
  HostWeights w = HostWeights::random(c, seed, 2.0);
  Inputs in = make_inputs(c, 12, seed);
  in.training = training;
  Result r = run_layer(c, w, in, Backend::kCpu);
  const Probe base = evaluate(c, w, in);
  const double h = 1e-6;

  // Perturbs one tensor (a weight, or x when target == nullptr) along V; compares.
  auto check = [&](HostTensor& target, const HostTensor& grad, const char* name) {
    if (!target.defined() || target.numel() == 0) return;
    for (int attempt = 0; attempt < 4; ++attempt) {
      HostTensor v = random_tensor(c.dtype, target.shape(), seed + 101 * (attempt + 1));
      HostTensor saved = target;
      for (int64_t i = 0; i < target.numel(); ++i) target.set(i, saved.get(i) + h * v.get(i));
      const Probe plus = evaluate(c, w, in);
      for (int64_t i = 0; i < target.numel(); ++i) target.set(i, saved.get(i) - h * v.get(i));
      const Probe minus = evaluate(c, w, in);
      target = saved;
      if (plus.idx != base.idx || minus.idx != base.idx || plus.kept != base.kept || minus.kept != base.kept)
        continue;  // the step crossed a routing decision: the loss is not smooth there; new direction
      const double numeric = (plus.loss - minus.loss) / (2 * h);
      const double analytic = dot(grad, v);
      const double scale = std::max({std::abs(analytic), std::abs(numeric), 1e-3});
      // A ReLU kink inside [-h, h] along V: the one-sided slopes disagree by O(1) instead of
      // O(h); the central difference is then not a derivative either. New direction.
      const double one_sided_gap = std::abs((plus.loss - base.loss) - (base.loss - minus.loss)) / h;
      if (one_sided_gap > 1e-4 * scale) continue;
      EXPECT_LT(std::abs(numeric - analytic) / scale, 1e-6)
          << name << ": numeric " << numeric << " analytic " << analytic << " (seed " << seed << ")";
      return;
    }
    ADD_FAILURE() << name << ": every direction crossed a routing decision or a kink (seed " << seed << ")";
  };
  check(in.x, r.dx, "dx");
  check(w.gate_weight, r.grads.gate_weight, "d_gate_weight");
  check(w.gate_bias, r.grads.gate_bias, "d_gate_bias");
  if (training) check(w.noise_weight, r.grads.noise_weight, "d_noise_weight");
  check(w.w1, r.grads.w1, "d_w1");
  check(w.b1, r.grads.b1, "d_b1");
  check(w.w2, r.grads.w2, "d_w2");
  check(w.b2, r.grads.b2, "d_b2");
  check(w.shared_w1, r.grads.shared_w1, "d_shared_w1");
  check(w.shared_b1, r.grads.shared_b1, "d_shared_b1");
  check(w.shared_w2, r.grads.shared_w2, "d_shared_w2");
  check(w.shared_b2, r.grads.shared_b2, "d_shared_b2");
}

struct GradCase {
  GateKind gate;
  FfnKind ffn;
  bool training;
};

class FiniteDifference : public ::testing::TestWithParam<GradCase> {};

TEST_P(FiniteDifference, AllGradientsMatchCentralDifferences) {
  MoeConfig c;
  c.hidden_size = 10;
  c.ffn_size = 8;
  c.num_experts = 5;
  c.gate = GetParam().gate;
  c.ffn = GetParam().ffn;
  c.top_k = c.gate == GateKind::kSwitchTop1 ? 1 : 2;
  c.dtype = DType::kFloat64;
  c.gate_bias = true;
  c.expert_bias = true;
  c.num_shared_experts = 1;
  check_gradients(c, GetParam().training, test_seed());
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> out;
  for (GateKind g : {GateKind::kSoftmaxTopK, GateKind::kSigmoidTopK, GateKind::kNoisyTopK, GateKind::kSwitchTop1,
                     GateKind::kGShardTop2})
    for (FfnKind f : {FfnKind::kReluMlp, FfnKind::kGeluMlp, FfnKind::kSwiGlu, FfnKind::kGeGlu})
      out.push_back({g, f, g != GateKind::kSoftmaxTopK && g != GateKind::kSigmoidTopK});
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllKinds, FiniteDifference, ::testing::ValuesIn(grad_cases()), [](const auto& info) {
  return to_string(info.param.gate) + "_" + to_string(info.param.ffn) + (info.param.training ? "_train" : "");
});

TEST(FiniteDifferenceExtra, CapacityNoRenormWorldSize) {
  MoeConfig c;
  c.hidden_size = 8;
  c.ffn_size = 6;
  c.num_experts = 4;
  c.top_k = 3;
  c.ffn = FfnKind::kSwiGlu;
  c.renormalize = false;
  c.capacity_factor = 0.75;
  c.world_size = 2;
  c.dtype = DType::kFloat64;
  check_gradients(c, false, test_seed());
}

}  // namespace
}  // namespace fusedmoe::testing
