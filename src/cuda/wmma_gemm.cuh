// src/cuda/wmma_gemm.cuh — the generic grouped GEMM of simple_gemm.cuh on tensor cores
// (mma.sync through nvcuda::wmma; bf16/fp16 inputs, or fp32 inputs rounded to TF32; fp32
// accumulation), for every operand layout
// the modular path needs: forward (varying M), dgrad (B transposed) and wgrad (varying K, A
// transposed). Each operand tile is staged in shared memory in the layout it has in global
// memory (row- or column-major), and the matching wmma fragment layout reads it, so no
// transposes are materialised. This is also the path for GPUs without wgmma. The Hopper engine
// (src/cuda/gemm/) replaces it where its layout constraints hold.
#pragma once

#include <mma.h>

#include "cuda/simple_gemm.cuh"

namespace fusedmoe::cuda {
namespace detail {

constexpr int kWmmaBM = 128, kWmmaBN = 128, kWmmaBK = 32;
constexpr int kWmmaPad = 8;  // elements: keeps 16-B alignment and breaks bank conflicts

// Shared-memory tile of one operand; `kRowMajor` = the first index is contiguous-outer
// (A: [M][K] when K is contiguous, else [K][M]; B: [K][N] when N is contiguous, else [N][K]).
template <class T, int kOuter, int kInner>
struct SmemTile {
  T data[kOuter][kInner + kWmmaPad];
};

// Loads a kOuter x kInner tile (inner dimension contiguous in global memory with unit stride,
// outer stride `outer_stride`) starting at (outer0, inner0) into smem; zero outside
// [0, outer_count) x [0, inner_count). vector: 16-B loads allowed (alignment checked by the host).
// kTeam: the threads 0 .. kTeam-1 of the block share the work (0: the whole block).
template <int kTeam = 0, class T, int kOuter, int kInner>
__device__ __forceinline__ void load_tile(SmemTile<T, kOuter, kInner>& tile, const T* base, int64_t outer_stride,
                                          int64_t outer0, int64_t outer_count, int64_t inner0, int64_t inner_count,
                                          bool vector) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-B chunk
  constexpr int kChunks = kOuter * kInner / kVec;
  const int stride = kTeam > 0 ? kTeam : static_cast<int>(blockDim.x);
  for (int c = threadIdx.x; c < kChunks; c += stride) {
    const int o = c / (kInner / kVec), i = (c % (kInner / kVec)) * kVec;
    const int64_t go = outer0 + o, gi = inner0 + i;
    T* dst = &tile.data[o][i];
    if (vector && go < outer_count && gi + kVec <= inner_count) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(base + go * outer_stride + gi);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        dst[e] = (go < outer_count && gi + e < inner_count) ? base[go * outer_stride + gi + e] : from_f32<T>(0.f);
    }
  }
}

// kAKContig: A's K index has unit stride (else M has). kBNContig: B's N index has unit stride.
template <class T, class TC, bool kAKContig, bool kBNContig>
__global__ void __launch_bounds__(256) wmma_gemm_kernel(SimpleGemmParams p, bool vector_a, bool vector_b) {
  using namespace nvcuda;
  using ATile = std::conditional_t<kAKContig, SmemTile<T, kWmmaBM, kWmmaBK>, SmemTile<T, kWmmaBK, kWmmaBM>>;
  using BTile = std::conditional_t<kBNContig, SmemTile<T, kWmmaBK, kWmmaBN>, SmemTile<T, kWmmaBN, kWmmaBK>>;
  __shared__ ATile a_tile;
  __shared__ BTile b_tile;
  __shared__ float out_stage[8][16][16 + 4];

  const int g = blockIdx.z / p.k_splits, split = blockIdx.z % p.k_splits;
  int64_t m_base = 0, m_count = p.m, k_base = 0, k_count = p.k;
  if (p.vary == VaryDim::kM) { m_base = p.offsets[g]; m_count = p.offsets[g + 1] - m_base; }
  if (p.vary == VaryDim::kK) { k_base = p.offsets[g]; k_count = p.offsets[g + 1] - k_base; }
  if (p.k_splits > 1) {  // this block's slice of K (whole tiles)
    const int64_t chunk = (k_count + static_cast<int64_t>(p.k_splits) * kWmmaBK - 1) / (static_cast<int64_t>(p.k_splits) * kWmmaBK) * kWmmaBK;
    const int64_t begin = static_cast<int64_t>(split) * chunk;
    k_base += begin < k_count ? begin : k_count;
    k_count = begin < k_count ? (k_count - begin < chunk ? k_count - begin : chunk) : 0;
  }
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kWmmaBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kWmmaBN;
  if (m0 >= m_count || n0 >= p.n) return;
  // Base pointers at (m_base, k_base) of this group.
  const T* a = static_cast<const T*>(p.a) + g * p.a_group + m_base * p.a_sm + k_base * p.a_sk;
  const T* b = static_cast<const T*>(p.b) + g * p.b_group + k_base * p.b_sk;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps, 64 x 32 outputs each

  using ALayout = std::conditional_t<kAKContig, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<kBNContig, wmma::row_major, wmma::col_major>;
  // fp32 operands run as TF32 (k = 8 per instruction), 16-bit ones natively (k = 16).
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kStepK = kTf32 ? 8 : 16;
  using FragElement = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  wmma::fragment<wmma::accumulator, 16, 16, kStepK, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < k_count; k0 += kWmmaBK) {
    if constexpr (kAKContig) load_tile(a_tile, a, p.a_sm, m0, m_count, k0, k_count, vector_a);
    else load_tile(a_tile, a, p.a_sk, k0, k_count, m0, m_count, vector_a);
    if constexpr (kBNContig) load_tile(b_tile, b, p.b_sk, k0, k_count, n0, p.n, vector_b);
    else load_tile(b_tile, b, p.b_sn, n0, p.n, k0, k_count, vector_b);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kWmmaBK; kk += kStepK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStepK, FragElement, ALayout> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, kStepK, FragElement, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int mm = warp_m * 64 + i * 16;
        if constexpr (kAKContig) wmma::load_matrix_sync(fa[i], &a_tile.data[mm][kk], kWmmaBK + kWmmaPad);
        else wmma::load_matrix_sync(fa[i], &a_tile.data[kk][mm], kWmmaBM + kWmmaPad);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int nn = warp_n * 32 + j * 16;
        if constexpr (kBNContig) wmma::load_matrix_sync(fb[j], &b_tile.data[kk][nn], kWmmaBN + kWmmaPad);
        else wmma::load_matrix_sync(fb[j], &b_tile.data[nn][kk], kWmmaBK + kWmmaPad);
      }
      if constexpr (kTf32) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Epilogue: each 16 x 16 fragment through a per-warp staging tile, bounds-checked.
  TC* c = static_cast<TC*>(p.c) + g * p.c_group + split * p.c_split;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&out_stage[warp][0][0], acc[i][j], 16 + 4, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, col = e % 16;
        const int64_t gm = m0 + warp_m * 64 + i * 16 + r, gn = n0 + warp_n * 32 + j * 16 + col;
        if (gm >= m_count || gn >= p.n) continue;
        const float scale = p.row_scale ? p.row_scale[m_base + gm] : 1.f;
        const float v = out_stage[warp][r][col] * scale;
        TC* out = c + (m_base + gm) * p.c_sm + gn * p.c_sn;
        *out = p.accumulate ? from_f32<TC>(to_f32(*out) + v) : from_f32<TC>(v);
      }
      __syncwarp();
    }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace detail

// Tensor-core grouped GEMM for 16-bit A and B (same type). Returns false (and does nothing)
// when neither operand has a unit-stride dimension, so the caller can fall back.
template <class T, class TC>
bool wmma_gemm(const SimpleGemmParams& p, cudaStream_t stream) {
  const bool a_k = p.a_sk == 1, a_m = p.a_sm == 1, b_n = p.b_sn == 1, b_k = p.b_sk == 1;
  if (!(a_k || a_m) || !(b_n || b_k)) return false;
  if (p.n <= 0 || p.m <= 0 || p.num_groups <= 0) return true;
  const int64_t a_outer = a_k ? p.a_sm : p.a_sk, b_outer = b_n ? p.b_sk : p.b_sn;
  // 16-B vector loads need aligned bases and outer strides (the varying offset moves the base
  // by offset · stride, also a multiple of 8 elements then).
  // A varying dimension that is also the unit-stride one shifts the base by an arbitrary
  // number of elements: scalar loads then.
  constexpr int64_t kVec = 16 / sizeof(T);
  const bool vector_a = detail::aligned16(p.a) && a_outer % kVec == 0 && p.a_group % kVec == 0 &&
                        !(p.vary == VaryDim::kK && a_k) && !(p.vary == VaryDim::kM && a_m);
  const bool vector_b = detail::aligned16(p.b) && b_outer % kVec == 0 && p.b_group % kVec == 0 &&
                        !(p.vary == VaryDim::kK && b_k);
  dim3 grid(static_cast<unsigned>(ceil_div(p.n, detail::kWmmaBN)), static_cast<unsigned>(ceil_div(p.m, detail::kWmmaBM)),
            static_cast<unsigned>(p.num_groups * p.k_splits));
  FUSEDMOE_CHECK(grid.y <= 65535u && grid.z <= 65535u, "wmma_gemm: grid " << grid.y << " x " << grid.z << " too large");
#define FUSEDMOE_WMMA_LAUNCH(AK, BN) \
  detail::wmma_gemm_kernel<T, TC, AK, BN><<<grid, 256, 0, stream>>>(p, vector_a, vector_b)
  if (a_k && b_n) FUSEDMOE_WMMA_LAUNCH(true, true);
  else if (a_k) FUSEDMOE_WMMA_LAUNCH(true, false);
  else if (b_n) FUSEDMOE_WMMA_LAUNCH(false, true);
  else FUSEDMOE_WMMA_LAUNCH(false, false);
#undef FUSEDMOE_WMMA_LAUNCH
  FUSEDMOE_LAUNCH_CHECK();
  return true;
}

// The modular path's GEMM entry: tensor cores for 16-bit operands and, when allow_tf32, for
// fp32 operands (TF32); the CUDA-core kernel otherwise (exact fp32 arithmetic).
template <class TA, class TB, class TC>
void grouped_gemm_any(const SimpleGemmParams& p, cudaStream_t stream, bool allow_tf32 = false) {
  if constexpr (std::is_same_v<TA, TB> && (std::is_same_v<TA, __nv_bfloat16> || std::is_same_v<TA, __half>)) {
    // Every operand of the layer has a unit-stride dimension, so 16-bit GEMMs never need the
    // CUDA-core kernel (which is not instantiated for them).
    const bool launched = wmma_gemm<TA, TC>(p, stream);
    FUSEDMOE_CHECK(launched, "internal: a 16-bit GEMM operand without a unit-stride dimension");
  } else {
    if constexpr (std::is_same_v<TA, float> && std::is_same_v<TB, float>) {
      if (allow_tf32 && wmma_gemm<float, TC>(p, stream)) return;
    }
    simple_gemm<TA, TB, TC>(p, stream);
  }
}

}  // namespace fusedmoe::cuda
