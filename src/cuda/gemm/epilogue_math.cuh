// fusedmoe — element-wise epilogue math shared by the Hopper grouped GEMM and its reference
// kernel, so that both compute exactly the same function of the fp32 accumulator.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "grouped_gemm.hpp"

namespace fusedmoe::cuda::epilogue_math {

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Exact (erf) GELU, as torch.nn.functional.gelu(approximate="none").
__device__ __forceinline__ float gelu(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// Non-gated activation of a compile-time epilogue (the GEMM epilogues are instantiated per
// activation: a runtime switch inside an epilogue unrolled over a whole tile puts the code of
// every activation into the instruction stream of every element).
template <Epilogue kEpilogue>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kEpilogue == Epilogue::kRelu) return fmaxf(x, 0.0f);
  else if constexpr (kEpilogue == Epilogue::kGelu) return gelu(x);
  else return x;
}

// Gated activation act(gate) * up, compile-time epilogue (kSwiGlu or kGeGlu).
template <Epilogue kEpilogue>
__device__ __forceinline__ float gate_up(float gate, float up) {
  if constexpr (kEpilogue == Epilogue::kGeGlu) return gelu(gate) * up;
  else return silu(gate) * up;
}

// The same functions of a runtime epilogue (the reference kernel).
__device__ __forceinline__ float activate(Epilogue epilogue, float x) {
  switch (epilogue) {
    case Epilogue::kRelu: return activate<Epilogue::kRelu>(x);
    case Epilogue::kGelu: return activate<Epilogue::kGelu>(x);
    default: return x;
  }
}
__device__ __forceinline__ float gate_up(Epilogue epilogue, float gate, float up) {
  return epilogue == Epilogue::kGeGlu ? gate_up<Epilogue::kGeGlu>(gate, up)
                                      : gate_up<Epilogue::kSwiGlu>(gate, up);
}

// Backward of the activations (the modular path's activation backward uses the same functions).
__device__ __forceinline__ float sigmoid_precise(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu_grad(float x) {
  return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}
// act(x) of a forward epilogue's activation (gated: of the gate), accurate exp.
__device__ __forceinline__ float activation_value(Epilogue act, float x) {
  switch (act) {
    case Epilogue::kRelu: return x > 0.f ? x : 0.f;
    case Epilogue::kSwiGlu: return x * sigmoid_precise(x);
    case Epilogue::kGelu:
    case Epilogue::kGeGlu: return gelu(x);
    default: return x;
  }
}
// act'(x), same convention.
__device__ __forceinline__ float activation_grad(Epilogue act, float x) {
  switch (act) {
    case Epilogue::kRelu: return x > 0.f ? 1.f : 0.f;
    case Epilogue::kSwiGlu: { const float s = sigmoid_precise(x); return s * (1.f + x * (1.f - s)); }
    case Epilogue::kGelu:
    case Epilogue::kGeGlu: return gelu_grad(x);
    default: return 1.f;
  }
}

// Scalar conversions / stores of one output element.
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// Store two consecutive elements (ptr must be aligned to 2 * sizeof(T)).
template <class T>
__device__ __forceinline__ void store_pair(T* ptr, float x0, float x1);
template <>
__device__ __forceinline__ void store_pair<float>(float* ptr, float x0, float x1) {
  *reinterpret_cast<float2*>(ptr) = make_float2(x0, x1);
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* ptr, float x0, float x1) {
  *reinterpret_cast<__nv_bfloat162*>(ptr) = __floats2bfloat162_rn(x0, x1);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* ptr, float x0, float x1) {
  *reinterpret_cast<__half2*>(ptr) = __floats2half2_rn(x0, x1);
}

// Store four consecutive elements with one vector store (ptr aligned to 4 * sizeof(T)); the
// same rounding as store_pair.
template <class T>
__device__ __forceinline__ void store_quad(T* ptr, float x0, float x1, float x2, float x3) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(ptr) = make_float4(x0, x1, x2, x3);
  } else {
    uint2 bits;
    store_pair(reinterpret_cast<T*>(&bits.x), x0, x1);
    store_pair(reinterpret_cast<T*>(&bits.y), x2, x3);
    *reinterpret_cast<uint2*>(ptr) = bits;
  }
}

}  // namespace fusedmoe::cuda::epilogue_math
