// src/cuda/shared_experts.cuh — the shared experts' forward of the modular backend (dense FFNs
// applied to every token, weight 1). The fused kernel runs its shared experts as segments of its
// own (fused_kernel.cuh).
#pragma once

#include "cuda/common.cuh"
#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe::cuda {

// dense [Tn, H] (fp32, overwritten) = Σ_s FFN_s(x) (+ shared b2) over the Tn tokens of x, on the
// Hopper engine for 16-bit types without shared biases (H and the shared I multiples of 8,
// aligned operands), the generic tensor-core kernels otherwise. T: float, __nv_bfloat16, __half.
template <class T>
void shared_experts_forward(const MoeConfig& c, const MoeWeights& w, const T* x, int64_t Tn, float* dense, Scratch& s,
                            cudaStream_t stream);

}  // namespace fusedmoe::cuda
