// src/cuda/simple_gemm.cuh — a generic grouped GEMM on CUDA cores with fp32 accumulation:
// any operand strides (so NN, NT, TN from one kernel), per-group row ranges read on the device
// (varying M for forward/dgrad, varying K for wgrad), optional accumulate and row scale.
// It is the exact-fp32 path and the correctness baseline the tensor-core grouped GEMM
// (src/cuda/gemm/) is checked against; shapes it serves are not performance paths.
#pragma once

#include "cuda/common.cuh"

namespace fusedmoe::cuda {

enum class VaryDim { kNone, kM, kK };

struct SimpleGemmParams {
  int num_groups = 1;
  const int64_t* offsets = nullptr;  // device [num_groups + 1] ranges of the varying dimension
  VaryDim vary = VaryDim::kNone;
  int64_t m = 0, n = 0, k = 0;       // fixed sizes; for the varying one an upper bound per group
  const void* a = nullptr;
  int64_t a_group = 0, a_sm = 0, a_sk = 0;  // element strides
  const void* b = nullptr;
  int64_t b_group = 0, b_sk = 0, b_sn = 0;
  void* c = nullptr;
  int64_t c_group = 0, c_sm = 0, c_sn = 0;
  bool accumulate = false;
  const float* row_scale = nullptr;  // indexed by the global row (m_base + m)
  // Split-K (tensor-core kernel only): k_splits blocks share one output tile, block `split`
  // sums its slice of K into C + split · c_split (partial outputs, reduced by the caller).
  int k_splits = 1;
  int64_t c_split = 0;
};

namespace detail {

constexpr int kSimpleBM = 64, kSimpleBN = 64, kSimpleBK = 16;

template <class TA, class TB, class TC>
__global__ void __launch_bounds__(256) simple_gemm_kernel(SimpleGemmParams p) {
  __shared__ float a_tile[kSimpleBK][kSimpleBM + 4];
  __shared__ float b_tile[kSimpleBK][kSimpleBN + 4];
  const int g = blockIdx.z;
  int64_t m_base = 0, m_count = p.m, k_base = 0, k_count = p.k;
  if (p.vary == VaryDim::kM) { m_base = p.offsets[g]; m_count = p.offsets[g + 1] - m_base; }
  if (p.vary == VaryDim::kK) { k_base = p.offsets[g]; k_count = p.offsets[g + 1] - k_base; }
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSimpleBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSimpleBN;
  if (m0 >= m_count || n0 >= p.n) return;
  const TA* a = static_cast<const TA*>(p.a) + g * p.a_group;
  const TB* b = static_cast<const TB*>(p.b) + g * p.b_group;
  TC* c = static_cast<TC*>(p.c) + g * p.c_group;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4 x 4 outputs each
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k_count; k0 += kSimpleBK) {
    for (int i = threadIdx.x; i < kSimpleBK * kSimpleBM; i += blockDim.x) {
      const int kk = i / kSimpleBM, mm = i % kSimpleBM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      a_tile[kk][mm] = (gm < m_count && gk < k_count) ? to_f32(a[(m_base + gm) * p.a_sm + (k_base + gk) * p.a_sk]) : 0.f;
    }
    for (int i = threadIdx.x; i < kSimpleBK * kSimpleBN; i += blockDim.x) {
      const int kk = i / kSimpleBN, nn = i % kSimpleBN;
      const int64_t gn = n0 + nn, gk = k0 + kk;
      b_tile[kk][nn] = (gn < p.n && gk < k_count) ? to_f32(b[(k_base + gk) * p.b_sk + gn * p.b_sn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimpleBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a_tile[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b_tile[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty * 4 + i;
    if (gm >= m_count) continue;
    const float scale = p.row_scale ? p.row_scale[m_base + gm] : 1.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx * 4 + j;
      if (gn >= p.n) continue;
      TC* out = c + (m_base + gm) * p.c_sm + gn * p.c_sn;
      const float v = acc[i][j] * scale;
      *out = p.accumulate ? from_f32<TC>(to_f32(*out) + v) : from_f32<TC>(v);
    }
  }
}

}  // namespace detail

template <class TA, class TB, class TC>
void simple_gemm(const SimpleGemmParams& p, cudaStream_t stream) {
  FUSEDMOE_CHECK(p.k_splits == 1, "simple_gemm: k_splits = " << p.k_splits << " (split-K runs on the tensor-core kernel only)");
  if (p.n <= 0 || p.num_groups <= 0) return;
  const int64_t m_bound = p.m;
  if (m_bound <= 0) return;
  dim3 grid(static_cast<unsigned>(ceil_div(p.n, detail::kSimpleBN)),
            static_cast<unsigned>(ceil_div(m_bound, detail::kSimpleBM)), static_cast<unsigned>(p.num_groups));
  FUSEDMOE_CHECK(grid.y <= 65535u && grid.z <= 65535u, "simple_gemm: grid " << grid.y << " x " << grid.z << " too large");
  detail::simple_gemm_kernel<TA, TB, TC><<<grid, 256, 0, stream>>>(p);
  FUSEDMOE_LAUNCH_CHECK();
}

}  // namespace fusedmoe::cuda
