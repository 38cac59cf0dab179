// src/cuda/shared_experts.cuh — the shared experts' forward (dense FFNs applied to every token,
// weight 1), used by the modular backend and by the fused backend, which runs it on the stream
// before its kernel and adds the result in the kernel's combine.
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
