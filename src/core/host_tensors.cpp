// src/core/host_tensors.cpp — see fusedmoe/host_tensors.hpp.
#include "fusedmoe/host_tensors.hpp"

#include <cmath>
#include <cstring>

#include "fusedmoe/error.hpp"

namespace fusedmoe {

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
  FUSEDMOE_CHECK(dtype == DType::kFloat32 || dtype == DType::kFloat64,
                 "HostTensor dtype = " << to_string(dtype) << ": must be fp32 or fp64");
  bytes_.assign(static_cast<size_t>(numel()) * dtype_size(dtype), 0);
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return shape_.empty() ? 0 : n;
}

TensorView HostTensor::view() const {
  if (!defined()) return {};
  // A zero-element tensor still gets a non-null pointer so that it counts as "given".
  static unsigned char empty_storage[16];
  void* data = bytes_.empty() ? empty_storage : const_cast<unsigned char*>(bytes_.data());
  return TensorView{.data = data, .dtype = dtype_, .shape = shape_};
}

double HostTensor::get(int64_t i) const {
  if (dtype_ == DType::kFloat64) return reinterpret_cast<const double*>(bytes_.data())[i];
  return reinterpret_cast<const float*>(bytes_.data())[i];
}

void HostTensor::set(int64_t i, double value) {
  if (dtype_ == DType::kFloat64) reinterpret_cast<double*>(bytes_.data())[i] = value;
  else reinterpret_cast<float*>(bytes_.data())[i] = static_cast<float>(value);
}

void HostTensor::fill(double value) {
  for (int64_t i = 0; i < numel(); ++i) set(i, value);
}

void HostTensor::randomize(std::mt19937_64& rng, double scale) {
  std::uniform_real_distribution<double> dist(-scale, scale);
  for (int64_t i = 0; i < numel(); ++i) set(i, dist(rng));
}

std::vector<double> HostTensor::to_double() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = get(i);
  return out;
}

namespace {

HostWeights shaped(const MoeConfig& c) {
  c.validate();
  const DType dt = c.dtype;
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.ffn_size, N1 = c.ffn_in_width();
  const int64_t S = c.num_shared_experts, Is = c.shared_size(), Ns1 = c.shared_in_width();
  HostWeights w;
  w.gate_weight = HostTensor(dt, {E, H});
  if (c.gate_bias) w.gate_bias = HostTensor(dt, {E});
  if (c.gate == GateKind::kNoisyTopK) w.noise_weight = HostTensor(dt, {E, H});
  if (c.gate == GateKind::kSigmoidTopK) w.selection_bias = HostTensor(dt, {E});
  w.w1 = HostTensor(dt, {E, H, N1});
  w.w2 = HostTensor(dt, {E, I, H});
  if (c.expert_bias) {
    w.b1 = HostTensor(dt, {E, N1});
    w.b2 = HostTensor(dt, {E, H});
  }
  if (S > 0) {
    w.shared_w1 = HostTensor(dt, {S, H, Ns1});
    w.shared_w2 = HostTensor(dt, {S, Is, H});
    if (c.expert_bias) {
      w.shared_b1 = HostTensor(dt, {S, Ns1});
      w.shared_b2 = HostTensor(dt, {S, H});
    }
  }
  return w;
}

}  // namespace

HostWeights HostWeights::random(const MoeConfig& c, uint64_t seed, double gate_scale) {
  HostWeights w = shaped(c);
  std::mt19937_64 rng(seed);
  const double h_scale = 1.0 / std::sqrt(static_cast<double>(c.hidden_size));
  w.gate_weight.randomize(rng, gate_scale * h_scale);
  if (w.gate_bias.defined()) w.gate_bias.randomize(rng, 0.1);
  if (w.noise_weight.defined()) w.noise_weight.randomize(rng, h_scale);
  if (w.selection_bias.defined()) w.selection_bias.randomize(rng, 0.1);
  w.w1.randomize(rng, h_scale);
  w.w2.randomize(rng, 1.0 / std::sqrt(static_cast<double>(c.ffn_size)));
  if (w.b1.defined()) w.b1.randomize(rng, 0.1);
  if (w.b2.defined()) w.b2.randomize(rng, 0.1);
  if (w.shared_w1.defined()) w.shared_w1.randomize(rng, h_scale);
  if (w.shared_w2.defined()) w.shared_w2.randomize(rng, 1.0 / std::sqrt(static_cast<double>(c.shared_size())));
  if (w.shared_b1.defined()) w.shared_b1.randomize(rng, 0.1);
  if (w.shared_b2.defined()) w.shared_b2.randomize(rng, 0.1);
  return w;
}

HostWeights HostWeights::zeros_like(const MoeConfig& c) { return shaped(c); }

MoeWeights HostWeights::views() const {
  return MoeWeights{
      .gate_weight = gate_weight.view(), .gate_bias = gate_bias.view(),
      .noise_weight = noise_weight.view(), .selection_bias = selection_bias.view(),
      .w1 = w1.view(), .b1 = b1.view(), .w2 = w2.view(), .b2 = b2.view(),
      .shared_w1 = shared_w1.view(), .shared_b1 = shared_b1.view(),
      .shared_w2 = shared_w2.view(), .shared_b2 = shared_b2.view()};
}

MoeGrads HostWeights::grad_views(const HostTensor& dx) const {
  return MoeGrads{
      .dx = dx.view(), .d_gate_weight = gate_weight.view(), .d_gate_bias = gate_bias.view(),
      .d_noise_weight = noise_weight.view(),
      .d_w1 = w1.view(), .d_b1 = b1.view(), .d_w2 = w2.view(), .d_b2 = b2.view(),
      .d_shared_w1 = shared_w1.view(), .d_shared_b1 = shared_b1.view(),
      .d_shared_w2 = shared_w2.view(), .d_shared_b2 = shared_b2.view()};
}

std::vector<HostTensor*> HostWeights::all() {
  return {&gate_weight, &gate_bias, &noise_weight, &selection_bias, &w1, &b1, &w2, &b2,
          &shared_w1, &shared_b1, &shared_w2, &shared_b2};
}

std::vector<const HostTensor*> HostWeights::all() const {
  return {&gate_weight, &gate_bias, &noise_weight, &selection_bias, &w1, &b1, &w2, &b2,
          &shared_w1, &shared_b1, &shared_w2, &shared_b2};
}

double relative_error(const HostTensor& a, const HostTensor& b) {
  FUSEDMOE_CHECK(a.numel() == b.numel(), "relative_error: sizes differ (" << a.numel() << " vs "
                                                                           << b.numel() << ")");
  double diff = 0.0, ref = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    double d = a.get(i) - b.get(i);
    if (std::isnan(a.get(i)) != std::isnan(b.get(i))) return INFINITY;
    diff += d * d;
    ref += b.get(i) * b.get(i);
  }
  if (ref == 0.0) return std::sqrt(diff);
  return std::sqrt(diff / ref);
}

}  // namespace fusedmoe
