// src/cuda/router_logits.cuh — the router's logits, logits[T, E] = x · Wgᵀ (+ bias), fp32, for
// 16-bit x and Wg [E, H], on tensor cores with mma.sync (sm_80 and later).
//
// Why not the grouped GEMM engine: its tile is 128 x 256, so a router with E = 8 (mixtral) ran
// 32x the real columns' wgmmas and took 46 µs on an H100 for T 8192, H 4096 (this kernel: 40 µs
// with 128-B row pieces per stage, and less with 256-B pieces, which the DRAM serves better).
// With E = 64 or 128 the engine's deep TMA pipeline was as fast or faster (paper-64 38 µs, this
// kernel 41), so it takes E ≤ 32 only. The problem is x's bandwidth: each block streams 64 rows
// of x through a cp.async ring once and multiplies them by all E columns of Wg, which every block
// reads from L2. CuTe's SM80 atoms do the mma.sync, ldmatrix and cp.async.
//
// Block: 128 threads = 4 warps, 64 rows x kETile (8, 16 or 32 ≥ E) columns; warp w owns rows
// 16w .. 16w + 15 and all columns (kETile / 8 m16n8k16 accumulators). K runs in blocks of 128
// (256 B of a row) through kStages stages of shared memory; the low three bits of a row's 16-B
// chunk index are XOR-swizzled by (row mod 8), so the eight rows of each ldmatrix phase hit eight
// different bank groups. Rows past T and columns past E load zeros and are not stored. Needs
// H % 8 == 0 and 16-B aligned x and Wg.
#pragma once

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <type_traits>

#include "cuda/common.cuh"

namespace fusedmoe::cuda {
namespace router_logits_detail {

constexpr int kRows = 64, kK = 128, kStages = 4, kThreads = 128;
constexpr int kChunks = kK / 8;  // 16-B chunks per row per k-block (16)

template <class T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct Mma<__half> {
  using Op = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// Element offset of (row, chunk) in a stage buffer of rows x kK elements: the chunk's low three
// bits XOR (row mod 8), so the eight rows of an ldmatrix phase hit eight different bank groups.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * kK + ((chunk ^ (row & 7)) * 8); }

template <int kETile>
constexpr size_t smem_bytes() {
  return size_t(kStages) * (kRows + kETile) * kK * 2;
}

template <class T, int kETile>
__global__ void __launch_bounds__(kThreads)
    router_logits_kernel(const T* __restrict__ x, const T* __restrict__ wg, const T* __restrict__ bias,
                         float* __restrict__ logits, int64_t num_tokens, int64_t hidden, int64_t experts) {
  static_assert(kETile == 8 || kETile == 16 || kETile == 32, "column tile: 8, 16 or 32");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const a_smem = reinterpret_cast<T*>(smem_raw);  // [kStages][kRows * kK]
  T* const b_smem = a_smem + kStages * kRows * kK;   // [kStages][kETile * kK]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // blockIdx.x: column tile (one while E ≤ kETile); blockIdx.y: row block.
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kETile, m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t k_blocks = (hidden + kK - 1) / kK;

  // Rows row0 .. row0 + kCount - 1 (of `limit`) of a [limit, hidden] matrix, columns k0 .. k0 +
  // kK - 1, into `dst`: 16-B cp.async chunks, zero-filled outside the matrix.
  auto load_rows = [&](auto count, T* dst, const T* base, int64_t row0, int64_t limit, int64_t k0) {
    constexpr int kCount = decltype(count)::value;
    for (int i = tid; i < kCount * kChunks; i += kThreads) {
      const int row = i / kChunks, chunk = i % kChunks;
      const int64_t g_row = row0 + row, gk = k0 + chunk * 8;
      const bool valid = g_row < limit && gk < hidden;
      const T* src = valid ? base + g_row * hidden + gk : base;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(src),
          *reinterpret_cast<cute::uint128_t*>(dst + swizzled(row, chunk)), valid);
    }
  };
  auto load_stage = [&](int stage, int64_t kb) {
    load_rows(std::integral_constant<int, kRows>{}, a_smem + stage * kRows * kK, x, m0, num_tokens, kb * kK);
    load_rows(std::integral_constant<int, kETile>{}, b_smem + stage * kETile * kK, wg, n0, experts, kb * kK);
  };

  float acc[kETile / 8][4];
#pragma unroll
  for (int f = 0; f < kETile / 8; ++f)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[f][q] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_blocks) load_stage(s, s);
    cute::cp_async_fence();
  }
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kb % kStages is in; every warp is done with stage (kb - 1) % kStages
    if (kb + kStages - 1 < k_blocks)
      load_stage(static_cast<int>((kb + kStages - 1) % kStages), kb + kStages - 1);
    cute::cp_async_fence();
    const int stage = static_cast<int>(kb % kStages);
    const T* a = a_smem + stage * kRows * kK;
    const T* b = b_smem + stage * kETile * kK;
#pragma unroll 4
    for (int kk = 0; kk < kK / 16; ++kk) {
      // A: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) of the warp's 16 rows, from lanes 0-7,
      // 8-15, 16-23, 24-31: a0..a3 of m16n8k16's A fragment.
      uint32_t a0, a1, a2, a3;
      const int a_row = warp * 16 + lane % 16;
      cute::SM75_U32x4_LDSM_N::copy(
          *reinterpret_cast<const cute::uint128_t*>(a + swizzled(a_row, kk * 2 + lane / 16)), a0, a1, a2, a3);
#pragma unroll
      for (int f2 = 0; f2 < (kETile + 15) / 16; ++f2) {
        // B (Wg rows = n, k contiguous): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
        // (n 8-15, k 8-15) = b0, b1 of column fragments 2 f2 and 2 f2 + 1.
        const int m = lane / 8;
        const int b_row = f2 * 16 + (m / 2) * 8 + lane % 8;
        const cute::uint128_t& src =
            *reinterpret_cast<const cute::uint128_t*>(b + swizzled(b_row % kETile, kk * 2 + m % 2));
        if constexpr (kETile == 8) {
          uint32_t b0, b1;
          cute::SM75_U32x2_LDSM_N::copy(src, b0, b1);
          Mma<T>::Op::fma(acc[0][0], acc[0][1], acc[0][2], acc[0][3], a0, a1, a2, a3, b0, b1, acc[0][0],
                          acc[0][1], acc[0][2], acc[0][3]);
        } else {
          uint32_t b0, b1, b2, b3;
          cute::SM75_U32x4_LDSM_N::copy(src, b0, b1, b2, b3);
          float* c0 = acc[2 * f2];
          float* c1 = acc[2 * f2 + 1];
          Mma<T>::Op::fma(c0[0], c0[1], c0[2], c0[3], a0, a1, a2, a3, b0, b1, c0[0], c0[1], c0[2], c0[3]);
          Mma<T>::Op::fma(c1[0], c1[1], c1[2], c1[3], a0, a1, a2, a3, b2, b3, c1[0], c1[1], c1[2], c1[3]);
        }
      }
    }
  }
  cute::cp_async_wait<0>();

  // Accumulator (f, q): row 16w + lane/4 (+ 8 for q >= 2), column 8f + 2 (lane % 4) + (q % 2).
  const int64_t row_base = m0 + warp * 16 + lane / 4;
#pragma unroll
  for (int f = 0; f < kETile / 8; ++f)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t row = row_base + (q >= 2 ? 8 : 0);
      const int64_t col = n0 + f * 8 + 2 * (lane % 4) + (q % 2);
      if (row < num_tokens && col < experts)
        logits[row * experts + col] = acc[f][q] + (bias ? to_f32(bias[col]) : 0.f);
    }
}

}  // namespace router_logits_detail

}  // namespace fusedmoe::cuda
