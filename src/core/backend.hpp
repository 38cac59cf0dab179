// src/core/backend.hpp — the interface every backend implements behind fusedmoe::MoeLayer.
// MoeLayer checks all arguments (shapes, dtypes, presence) before calling a backend, so a
// backend may assume well-formed views; tokens_per_rank is resolved (W entries, sum = T).
#pragma once

#include <memory>
#include <vector>

#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe {

class BackendImpl {
 public:
  virtual ~BackendImpl() = default;
  virtual void forward(const MoeConfig& config, const MoeWeights& weights, const ForwardArgs& args,
                       const std::vector<int64_t>& tokens_per_rank, const ForwardOutputs& out) = 0;
  virtual void backward(const MoeConfig& config, const MoeWeights& weights,
                        const BackwardArgs& args, const std::vector<int64_t>& tokens_per_rank,
                        const MoeGrads& grads) = 0;
};

std::unique_ptr<BackendImpl> make_cpu_backend();
std::unique_ptr<BackendImpl> make_naive_backend();
std::unique_ptr<BackendImpl> make_threads_backend();
// Defined by the CUDA backend when the library is built with CUDA; nullptr otherwise.
std::unique_ptr<BackendImpl> make_cuda_backend();
std::unique_ptr<BackendImpl> make_fused_backend();  // the persistent kernel; nullptr without CUDA
bool cuda_device_present();

}  // namespace fusedmoe
