// fusedmoe/host_tensors.hpp — host-memory storage for a layer's weights, inputs and gradients,
// with views for the API and seeded random initialisation. Used by the CLI, the tests and the
// benchmarks; handy for C++ users who want to try the layer without a tensor library.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe {

// A dense host tensor of fp32 or fp64 (the CPU backends' dtypes), stored as bytes.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<int64_t> shape);
  TensorView view() const;
  bool defined() const { return !shape_.empty() || !bytes_.empty(); }
  int64_t numel() const;
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  double get(int64_t i) const;
  void set(int64_t i, double value);
  void fill(double value);
  // Uniform(-scale, scale) from a seeded generator.
  void randomize(std::mt19937_64& rng, double scale);
  std::vector<double> to_double() const;

 private:
  DType dtype_ = DType::kFloat32;
  std::vector<int64_t> shape_;
  std::vector<unsigned char> bytes_;  // NOTE: mutable through view(); views are non-owning
};

// Weights of a layer (all E experts, all shared experts), shaped as in moe_layer.hpp.
struct HostWeights {
  HostTensor gate_weight, gate_bias, noise_weight, selection_bias;
  HostTensor w1, b1, w2, b2;
  HostTensor shared_w1, shared_b1, shared_w2, shared_b2;

  // Allocates every tensor the config needs, with Uniform(±1/sqrt(fan_in)) values (gate weights
  // scaled by gate_scale to control how peaked routing is).
  static HostWeights random(const MoeConfig& config, uint64_t seed, double gate_scale = 1.0);
  // Same shapes, zero-filled (for gradients).
  static HostWeights zeros_like(const MoeConfig& config);
  MoeWeights views() const;
  MoeGrads grad_views(const HostTensor& dx) const;  // this object holds the gradients
  std::vector<HostTensor*> all();                    // in the order of MoeWeights' fields
  std::vector<const HostTensor*> all() const;
};

// Relative error ‖a − b‖ / max(‖b‖, tiny) over all elements.
double relative_error(const HostTensor& a, const HostTensor& b);

}  // namespace fusedmoe
