// fusedmoe — Hopper (sm_90a) grouped GEMM over experts: the device-side pieces.
//
// Built on CuTe: TMA loads (cp.async.bulk.tensor) into 128-B-swizzled shared memory, wgmma
// (SM90 GMMA, both operands from shared memory), and CUTLASS's PipelineTmaAsync (mbarrier
// full/empty pairs) between one producer warp and two consumer warpgroups.
//
// Tile: kBlockM x kBlockN x kBlockK = 128 x 256 x 64; each consumer warpgroup owns 64 rows x 256
// columns of fp32 accumulators (one 64x256x16 wgmma per 16-wide k step). kStages = 4 stages of
// (A 128x64 + B 256x64) = 48 KiB each.
//
// B is loaded as two 128-column halves per stage:
//   non-gated: halves at columns n0 and n0 + 128 of expert g (output tile = 256 columns);
//   gated:     halves at columns i0 (gate) and I + i0 (up), I = n/2 (output tile = 128 columns).
// In the 64x256 wgmma accumulator a thread that holds column c also holds column c + 128, so
// the gated epilogue act(gate) * up is pure register arithmetic: no shuffle, no shared memory.
//
// Tile scheduler (persistent, static): the tiles of all experts form one list, expert-major;
// inside expert g (m_tiles_g = ceil(rows_g / 128) row tiles, n_tiles column tiles) the row tile
// runs fastest so the row tiles that share one B column block run at the same time (B from L2).
// CTA b takes tiles b, b + grid, b + 2*grid, ... . The per-expert prefix of tile counts is built
// in shared memory at kernel start from the DEVICE row_offsets (no host synchronisation), so
// empty experts cost nothing and the kernel is CUDA-graph capturable.
//
// Ragged rows: A's TMA descriptor is made on the host with max_total_rows rows; at kernel start
// each CTA copies it to shared memory, replaces the row extent with the real total
// (row_offsets[num_groups]) via tensormap.replace, and publishes it to its own 128-B slot of the
// workspace (tensormap.cp_fenceproxy + fence.proxy.tensormap acquire). A tile that runs past its
// expert's last row therefore reads the next expert's rows (harmless: those rows are not stored)
// or, past the last row of A, zeros from TMA's out-of-bounds fill — never memory beyond A. The
// epilogue predicates rows (< the expert's end) and columns (< n_out).
//
// Epilogue: per consumer warp, 32-column chunks go registers -> shared-memory staging -> global
// memory (see store_tile_fixed); activation, gating, row_scale and accumulate (f32) are applied
// on the way. A chunk of 16 full rows of a 16-bit output or gated pre-activation leaves by a TMA
// store, which drains while the warp goes on (paper-64's GEMM0 0.871 -> 0.818 ms, mixtral's
// 6.08 -> 5.51 ms on an H100, same process); other chunks by the warp's coalesced 16-B stores.
// The epilogue's math is not overlapped with the next tile's wgmmas, but the producer keeps
// prefetching the next tile's stages meanwhile.
//
// Resources: 384 threads (producer warpgroup at 40 registers, consumers at 232 via setmaxnreg),
// one CTA per SM, ~213 KiB static shared memory + 12 B per group.
//
// Device-level tile function (for the persistent MoE kernel): see `TileMainloop` and
// `store_tile` below. Contract:
//   - the caller owns a CTA of kNumThreads = 384 threads laid out as warpgroup 0 = producer,
//     warpgroups 1-2 = consumers, with SharedStorage<Config> in dynamic shared memory;
//   - producer (one elected thread): `produce_tile(...)` issues the TMA loads of one tile into
//     the pipeline; consumers (256 threads): `consume_tile(...)` runs the wgmma mainloop into
//     the 64x256-per-warpgroup fp32 accumulator and `store_tile(...)` applies the epilogue;
//   - store_tile needs 16-B aligned c (vector stores) and the warp's staging buffer;
//   - producer and consumers must visit the same sequence of tiles (the pipeline state carries
//     across tiles).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "epilogue_math.cuh"
#include "grouped_gemm.hpp"

namespace fusedmoe::cuda::sm90 {

using namespace cute;

// ---------------------------------------------------------------------------------------------
// Compile-time configuration
// ---------------------------------------------------------------------------------------------
// Operand majors of one kernel instantiation.
//   kForward: C = A · B,    A [rows, k] (k contiguous, K-major), B [groups, k, n] (n contiguous,
//             MN-major).
//   kDgrad:   C = A · Bᵀ,   A as kForward, B [groups, n, k] (k contiguous, K-major: wgmma's
//             natural B layout). Same scheduler, producer, consumer and epilogue as kForward;
//             only the shared-memory layout of B, its TMA view and the wgmma B major differ.
//   kWgrad:   C_g = A_gᵀ · B_g over the rows of group g (the reduction runs over rows):
//             A [rows, m] (m contiguous: MN-major), B [rows, n] (n contiguous: MN-major).
//             Used by grouped_gemm_wgrad (grouped_gemm_wgrad_sm90.cuh).
enum class Operands { kForward, kDgrad, kWgrad };

// kPreRing (kDgrad only): the kernel of the k*Backward epilogues. The forward's pre-activation
// reaches the epilogue through a ring of shared-memory chunks that a producer warp fills by TMA
// while the mainloop runs (PreRing below); the mainloop keeps 3 stages to make room for it.
template <class ElementAB_, bool kGated_, Operands kOperands_ = Operands::kForward, bool kPreRing_ = false>
struct Config {
  using ElementAB = ElementAB_;  // cute::bfloat16_t or cute::half_t
  static constexpr bool kGated = kGated_;
  static constexpr Operands kOperands = kOperands_;
  static constexpr bool kPreRing = kPreRing_;
  static constexpr bool kAKMajor = kOperands != Operands::kWgrad;
  static constexpr bool kBKMajor = kOperands == Operands::kDgrad;
  static_assert(!(kGated && kOperands != Operands::kForward), "gated epilogues: forward only");
  static_assert(!kPreRing || kOperands == Operands::kDgrad, "the pre-activation ring: dgrad only");

  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 256;  // accumulator columns (gated: 128 gate + 128 up)
  static constexpr int kBlockK = 64;
  static constexpr int kHalfN = 128;   // B is loaded as two halves of 128 columns
  static constexpr int kOutBlockN = kGated ? 128 : 256;  // output columns per tile
  // wgrad: 3 stages, the fourth stage's shared memory holds the output tile of the TMA-store
  // epilogue (grouped_gemm_wgrad_sm90.cuh).
  // kPreRing: 3 stages, the ring takes the fourth's shared memory.
  static constexpr int kStages = kOperands == Operands::kWgrad || kPreRing ? 3 : 4;
  static constexpr int kNumConsumerWarpgroups = 2;
  static constexpr int kNumThreads = 128 * (1 + kNumConsumerWarpgroups);
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;

  using BlockM = Int<kBlockM>;
  using BlockN = Int<kBlockN>;
  using BlockK = Int<kBlockK>;
  using HalfN = Int<kHalfN>;
  using Stages = Int<kStages>;

  // K-major operands: 8 x 64 SW128 atoms, tiled M/N-first (each 128-row block of a stage is
  // contiguous). MN-major operands: 64 x 8 SW128 atoms, tiled K-first so that every 64-wide
  // M/N block (and hence each 128-column half of B) is one contiguous, independently
  // TMA-loadable block.
  template <bool kKMajor>
  using AtomOf = std::conditional_t<kKMajor, GMMA::Layout_K_SW128_Atom<ElementAB>,
                                    GMMA::Layout_MN_SW128_Atom<ElementAB>>;
  template <bool kKMajor>
  using TileStep2 = std::conditional_t<kKMajor, Step<_1, _2>, Step<_2, _1>>;
  template <bool kKMajor>
  using TileStep3 = std::conditional_t<kKMajor, Step<_1, _2, _3>, Step<_2, _1, _3>>;

  using SmemLayoutAtomA = AtomOf<kAKMajor>;
  using SmemLayoutAtomB = AtomOf<kBKMajor>;
  using SmemLayoutA = decltype(tile_to_shape(SmemLayoutAtomA{},
                                             make_shape(BlockM{}, BlockK{}, Stages{}),
                                             TileStep3<kAKMajor>{}));
  using SmemLayoutB = decltype(tile_to_shape(SmemLayoutAtomB{},
                                             make_shape(BlockN{}, BlockK{}, Stages{}),
                                             TileStep3<kBKMajor>{}));
  using SmemLayoutBHalf = decltype(tile_to_shape(SmemLayoutAtomB{}, make_shape(HalfN{}, BlockK{}),
                                                 TileStep2<kBKMajor>{}));

  static constexpr GMMA::Major kMajorA = kAKMajor ? GMMA::Major::K : GMMA::Major::MN;
  static constexpr GMMA::Major kMajorB = kBKMajor ? GMMA::Major::K : GMMA::Major::MN;
  using MmaOp = decltype(GMMA::ss_op_selector<ElementAB, ElementAB, float,
                                              Shape<_64, BlockN, BlockK>, kMajorA, kMajorB>());
  using TiledMma = decltype(make_tiled_mma(MmaOp{}, Layout<Shape<_2, _1, _1>>{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  static constexpr uint32_t kStageBytes =
      uint32_t((kBlockM * kBlockK + kBlockN * kBlockK) * sizeof(ElementAB));

  // Global-memory views the TMA descriptors are made from, as (M-or-N extent, K extent[, group]).
  //   A  kForward/kDgrad: (rows, k) : (k, 1)        kWgrad: (m, rows) : (1, m)
  //   B  kForward: (n, k, groups) : (1, n, n*k)     kDgrad: (n, k, groups) : (k, 1, n*k)
  //      kWgrad:   (n, rows, 1) : (1, n, n*rows)
  // make_gmem_a(ptr, mn, k): mn = rows (kForward/kDgrad) or m (kWgrad); k = k or rows.
  CUTE_HOST_DEVICE static auto make_gmem_a(ElementAB const* ptr, int mn, int k) {
    if constexpr (kAKMajor)
      return make_tensor(make_gmem_ptr(ptr), make_shape(mn, k), make_stride(int64_t(k), _1{}));
    else
      return make_tensor(make_gmem_ptr(ptr), make_shape(mn, k), make_stride(_1{}, int64_t(mn)));
  }
  static auto make_gmem_b(ElementAB const* ptr, int n, int k, int groups) {
    if constexpr (kBKMajor)
      return make_tensor(make_gmem_ptr(ptr), make_shape(n, k, groups),
                         make_stride(int64_t(k), _1{}, int64_t(n) * k));
    else
      return make_tensor(make_gmem_ptr(ptr), make_shape(n, k, groups),
                         make_stride(_1{}, int64_t(n), int64_t(n) * k));
  }
  static auto make_tma_a(ElementAB const* ptr, int mn, int k) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_gmem_a(ptr, mn, k),
                         SmemLayoutA{}(_, _, 0), make_shape(BlockM{}, BlockK{}), _1{});
  }
  static auto make_tma_b(ElementAB const* ptr, int n, int k, int groups) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_gmem_b(ptr, n, k, groups), SmemLayoutBHalf{},
                         make_shape(HalfN{}, BlockK{}), _1{});
  }
  using TmaA = decltype(make_tma_a(nullptr, 128, 64));
  using TmaB = decltype(make_tma_b(nullptr, 256, 64, 1));

  // Epilogue TMA stores (see store_tile_fixed): one consumer warp's 16 x 32 chunk of 16-bit
  // values (64-B rows, 64-B swizzle) to a [rows, width] row-major matrix of the operands' type.
  using SmemLayoutChunk = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<ElementAB>{},
                                                 make_shape(Int<16>{}, Int<32>{})));
  static auto make_tma_chunk(ElementAB* ptr, int rows, int width) {
    return make_tma_copy(SM90_TMA_STORE{},
                         make_tensor(make_gmem_ptr(ptr), make_shape(rows, width), make_stride(int64_t(width), _1{})),
                         SmemLayoutChunk{}, make_shape(Int<16>{}, Int<32>{}), _1{});
  }
  using TmaChunk = decltype(make_tma_chunk(nullptr, 16, 32));

  // The pre-activation ring's TMA loads (kPreRing): a 128-row x 32-column chunk of the
  // pre-activation [rows, width] (row-major, the operands' type) into 64-B rows, no swizzle.
  using SmemLayoutPreChunk = Layout<Shape<_128, _32>, Stride<_32, _1>>;
  CUTE_HOST_DEVICE static auto make_gmem_pre(ElementAB const* ptr, int rows, int width) {
    return make_tensor(make_gmem_ptr(ptr), make_shape(rows, width), make_stride(int64_t(width), _1{}));
  }
  static auto make_tma_pre(ElementAB const* ptr, int rows, int width) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_gmem_pre(ptr, rows, width), SmemLayoutPreChunk{},
                         make_shape(_128{}, _32{}), _1{});
  }
  using TmaPre = decltype(make_tma_pre(nullptr, 128, 32));
};

// Epilogue staging: 16 rows x 32 columns per consumer warp, rows padded (f32 is the largest).
inline constexpr int kStagingBytesPerWarp = 16 * (32 * 4 + 32);
inline constexpr int kNumConsumerWarps = 8;

template <class Cfg>
struct SharedStorage {
  static_assert(Cfg::kNumConsumerWarpgroups * 4 == kNumConsumerWarps);
  struct alignas(1024) Tensors {
    cute::array_aligned<typename Cfg::ElementAB, cosize_v<typename Cfg::SmemLayoutA>, 1024> a;
    cute::array_aligned<typename Cfg::ElementAB, cosize_v<typename Cfg::SmemLayoutB>, 1024> b;
  } tensors;
  alignas(128) cute::TmaDescriptor tensormap_a;  // this CTA's copy, before publishing
  // Epilogue: the per-warp staging of store_tile; a wgrad kernel also has the whole 128 x 256
  // 16-bit output tile of its TMA-store epilogue, over the same bytes (one or the other per run).
  static constexpr bool kOutputTile = Cfg::kOperands == Operands::kWgrad;
  union {
    // 512-B aligned: a warp's staging holds two 64-B-swizzled 16 x 32 chunks of 16-bit values
    // for the epilogue's TMA stores (swizzle phase from the address: 512-B repeat).
    alignas(512) char staging[kNumConsumerWarps][kStagingBytesPerWarp];
    alignas(kOutputTile ? 1024 : 128) char output_tile[kOutputTile ? Cfg::kBlockM * Cfg::kBlockN * 2 : 1];
  };
  typename Cfg::Pipeline::SharedStorage pipeline;
  // Followed in dynamic shared memory by the group tables (see GroupTables).
};

// Per-group tables in shared memory: row offsets and the exclusive prefix of tile counts.
struct GroupTables {
  int64_t* row_offsets;  // [num_groups + 1]
  int* tile_prefix;      // [num_groups + 1]; tile_prefix[num_groups] = total tiles
  static size_t bytes(int num_groups) {
    return size_t(num_groups + 1) * (sizeof(int64_t) + sizeof(int));
  }
};

// The pre-activation ring of a kPreRing kernel, in dynamic shared memory between SharedStorage
// and the group tables. Slot s holds one 32-column chunk of a tile's pre-activation for all 128
// rows: the gate half's columns (or the only half of a non-gated kind) in data[s][0], the up
// half's in data[s][1]. Producer warp 1 of the producer warpgroup follows the CTA's tile
// sequence: per chunk it waits for the slot's `empty` barrier (one arrival per consumer warp),
// then loads the chunk by TMA against the slot's `full` barrier. The consumers take the chunks
// in the same order in the epilogue (a running count per thread: slot count % kSlots, phase
// (count / kSlots) & 1). With 3 slots the first three chunks of a tile arrive while its
// mainloop runs; the rest are loaded as the epilogue frees slots (from L2: the tile's
// pre-activation is prefetched there when its mainloop starts).
template <class Cfg>
struct PreRing {
  static constexpr int kSlots = 3;
  static constexpr int kChunkElems = 128 * 32;
  alignas(128) typename Cfg::ElementAB data[kSlots][2][kChunkElems];
  alignas(128) cute::TmaDescriptor tensormap;  // this CTA's copy of tma_pre, before publishing
  uint64_t full[kSlots];
  uint64_t empty[kSlots];
};
// 32-column chunks of a tile starting at column col_base of an n-wide dact (the epilogue's chunk
// loop and the ring's producer must agree on it).
template <class Cfg>
__device__ __forceinline__ int pre_ring_chunks(int64_t n, int col_base) {
  return int(std::min<int64_t>(Cfg::kOutBlockN / 32, (n - col_base + 31) / 32));
}
template <class Cfg>
constexpr size_t pre_ring_bytes() {
  if constexpr (Cfg::kPreRing) return (sizeof(PreRing<Cfg>) + 127) / 128 * 128;
  else return 0;
}

// Runtime parameters of the kernel (passed by value as a __grid_constant__).
template <class Cfg>
struct Params {
  typename Cfg::TmaA tma_a;
  typename Cfg::TmaB tma_b;
  const typename Cfg::ElementAB* a;  // for re-deriving A's TMA extents on the device
  const int64_t* row_offsets;        // device [num_groups + 1]
  int num_groups;
  int n, k;
  int n_out;                 // n or n/2
  int n_tiles;               // ceil(n_out / kOutBlockN)
  int k_tiles;               // ceil(k / kBlockK)
  int up_column_offset;      // gated: I = n/2; non-gated: kHalfN
  cute::TmaDescriptor* tensormap_workspace;  // [gridDim.x] slots of 128 B
  // Epilogue
  Epilogue epilogue;
  ElementType c_type;
  void* c;
  void* pre_activation;
  const float* row_scale;
  bool accumulate;
  const void* activation_input;  // k*Backward epilogues (kDgrad kernels)
  // TMA-store descriptors of the epilogue (tma_chunk_pre: the gated pre-activation, [rows, n];
  // used when pre_tma is set: 16-bit pre of the operands' type, 16-B aligned, n % 8 == 0).
  typename Cfg::TmaChunk tma_chunk_pre;
  bool pre_tma;
  // The output's chunks through TMA stores (tma_chunk_c: c as [rows, n_out]) when c_tma is set:
  // c of the operands' type, 16-B aligned, n_out % 8 == 0, no accumulation.
  typename Cfg::TmaChunk tma_chunk_c;
  bool c_tma;
  // kPreRing kernels: activation_input as [rows_bound, width] (width = 2n gated, else n); each
  // CTA publishes a copy with the real row extent in tensormap_workspace[gridDim.x + blockIdx.x].
  typename Cfg::TmaPre tma_pre;
  int pre_width;
};

// ---------------------------------------------------------------------------------------------
// Tile scheduler
// ---------------------------------------------------------------------------------------------
struct TileCoord {
  int group;
  int m_tile;
  int n_tile;
  int64_t row_begin;  // first row of the tile
  int64_t row_end;    // end of the group's rows (exclusive)
};

// Builds the group tables; every thread of the CTA must call it (contains __syncthreads).
template <int kBlockM>
__device__ void build_group_tables(GroupTables tables, const int64_t* row_offsets, int num_groups,
                                   int n_tiles) {
  for (int g = threadIdx.x; g <= num_groups; g += blockDim.x)
    tables.row_offsets[g] = row_offsets[g];
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < num_groups; base += 32) {
      const int g = base + lane;
      int count = 0;
      if (g < num_groups) {
        const int64_t rows = tables.row_offsets[g + 1] - tables.row_offsets[g];
        count = rows > 0 ? int((rows + kBlockM - 1) / kBlockM) * n_tiles : 0;
      }
      int inclusive = count;
      CUTE_UNROLL
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      if (g < num_groups) tables.tile_prefix[g] = carry + inclusive - count;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) tables.tile_prefix[num_groups] = carry;
  }
  __syncthreads();
}

template <int kBlockM>
__device__ __forceinline__ TileCoord decode_tile(GroupTables tables, int num_groups, int tile) {
  // Largest g with tile_prefix[g] <= tile: the (non-empty) group that owns the tile.
  int lo = 0, hi = num_groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tables.tile_prefix[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  TileCoord tc;
  tc.group = lo;
  const int local = tile - tables.tile_prefix[lo];
  const int64_t group_begin = tables.row_offsets[lo];
  tc.row_end = tables.row_offsets[lo + 1];
  const int m_tiles = int((tc.row_end - group_begin + kBlockM - 1) / kBlockM);
  tc.m_tile = local % m_tiles;
  tc.n_tile = local / m_tiles;
  tc.row_begin = group_begin + int64_t(tc.m_tile) * kBlockM;
  return tc;
}

// ---------------------------------------------------------------------------------------------
// Pipeline waits
// ---------------------------------------------------------------------------------------------
// How the tile functions wait on a stage: the GEMM kernels of this file block on the mbarrier
// (their waits depend only on the block's own threads and TMA); the persistent kernel passes a
// waiter whose waits are bounded and give up on the launch's abort (fused_sm90.cuh). A waiter
// that gives up still returns, and the tile goes on with whatever the stage holds: every thread
// of a warpgroup must reach the same wgmmas, so giving up must not change the control flow.
struct BlockingWait {
  template <class Pipeline, class State>
  __device__ __forceinline__ void acquire(Pipeline& pipeline, State const& state) const {
    pipeline.producer_acquire(state);
  }
  template <class Pipeline, class State>
  __device__ __forceinline__ void wait(Pipeline& pipeline, State const& state) const {
    pipeline.consumer_wait(state);
  }
};

// ---------------------------------------------------------------------------------------------
// Descriptor publishing
// ---------------------------------------------------------------------------------------------
// One warp writes a copy of `tma`'s descriptor with the extents of `gmem` (the real row count,
// known only on the device) to `slot` in global memory, staged through `staging` in shared
// memory, and makes it visible to this CTA's TMA unit. Every lane of the warp must call it.
template <class Tma, class GmemTensor>
__device__ __forceinline__ void publish_tma_descriptor(Tma const& tma, GmemTensor const& gmem,
                                                       cute::TmaDescriptor& staging,
                                                       cute::TmaDescriptor* slot) {
  if (cute::elect_one_sync()) {
    staging = *tma.get_tma_descriptor();
    cute::array<uint32_t, 5> shape = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> stride = {0, 0, 0, 0, 0};
    cute::detail::fill_tma_gmem_shape_stride(tma, gmem, shape, stride);
    for (uint64_t& s : stride) s = s * sizeof(typename GmemTensor::value_type);
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(staging, shape, stride);
  }
  __syncwarp();
  cute::tma_descriptor_cp_fence_release(slot, staging);
  cute::tma_descriptor_fence_acquire(slot);
  __syncwarp();
}

// ---------------------------------------------------------------------------------------------
// Producer: TMA loads of one tile (one elected thread)
// ---------------------------------------------------------------------------------------------
// Issues the TMA loads of one tile's k tiles: A tile (128 x 64) from gA, the two 128-column
// halves of B from gB0 / gB1 (each (128, 64, K_TILES) views of the TMA coordinate tensors).
// desc_a: a CTA-published replacement of A's descriptor, or null to use tma_a's own.
template <class Cfg, class TmaA, class TensorA, class TmaB, class TensorB, class Waiter = BlockingWait>
__device__ __forceinline__ void produce_k_tiles(SharedStorage<Cfg>& smem,
                                                typename Cfg::Pipeline& pipeline,
                                                typename Cfg::PipelineState& write_state,
                                                TmaA const& tma_a,
                                                cute::TmaDescriptor const* desc_a,
                                                TensorA const& gA, TmaB const& tma_b,
                                                TensorB const& gB0, TensorB const& gB1,
                                                int k_tiles, Waiter const& waiter = {}) {
  using BlockK = typename Cfg::BlockK;
  using HalfN = typename Cfg::HalfN;
  Tensor sA = make_tensor(make_smem_ptr(smem.tensors.a.data()), typename Cfg::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(smem.tensors.b.data()), typename Cfg::SmemLayoutB{});
  Tensor sB_halves = flat_divide(sB, make_shape(HalfN{}, BlockK{}));  // (128,64,2,1,STAGES)
  auto [tAgA, tAsA] =
      tma_partition(tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
  auto [tBgB0, tBsB0] =
      tma_partition(tma_b, Int<0>{}, Layout<_1>{},
                    group_modes<0, 2>(sB_halves(_, _, 0, 0, _)), group_modes<0, 2>(gB0));
  auto [tBgB1, tBsB1] =
      tma_partition(tma_b, Int<0>{}, Layout<_1>{},
                    group_modes<0, 2>(sB_halves(_, _, 1, 0, _)), group_modes<0, 2>(gB1));
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    waiter.acquire(pipeline, write_state);
    auto* barrier = pipeline.producer_get_barrier(write_state);
    const int stage = write_state.index();
    if (desc_a != nullptr) copy(tma_a.with(desc_a, *barrier), tAgA(_, k_tile), tAsA(_, stage));
    else copy(tma_a.with(*barrier), tAgA(_, k_tile), tAsA(_, stage));
    copy(tma_b.with(*barrier), tBgB0(_, k_tile), tBsB0(_, stage));
    copy(tma_b.with(*barrier), tBgB1(_, k_tile), tBsB1(_, stage));
    ++write_state;
  }
}

// The (128, 64, K_TILES) view of B's half starting at column `col` of group g.
template <class Cfg, class TensorB>
__device__ __forceinline__ auto b_half_tiles(TensorB const& mB, int group, int col) {
  return local_tile(domain_offset(make_coord(col, 0), mB(_, _, group)),
                    make_shape(typename Cfg::HalfN{}, typename Cfg::BlockK{}), make_coord(0, _));
}

template <class Cfg>
__device__ __forceinline__ void produce_tile(Params<Cfg> const& params,
                                             SharedStorage<Cfg>& smem,
                                             typename Cfg::Pipeline& pipeline,
                                             typename Cfg::PipelineState& write_state,
                                             cute::TmaDescriptor const* tensormap_a,
                                             int rows_total, TileCoord const& tc) {
  // Coordinate tensors of the TMA views.
  Tensor mA = params.tma_a.get_tma_tensor(make_shape(rows_total, params.k));
  Tensor mB = params.tma_b.get_tma_tensor(make_shape(params.n, params.k, params.num_groups));
  Tensor gA = local_tile(domain_offset(make_coord(int(tc.row_begin), 0), mA),
                         make_shape(typename Cfg::BlockM{}, typename Cfg::BlockK{}),
                         make_coord(0, _));  // (128,64,K_TILES)
  const int col_gate = tc.n_tile * Cfg::kOutBlockN;
  const int col_up = col_gate + params.up_column_offset;
  produce_k_tiles<Cfg>(smem, pipeline, write_state, params.tma_a, tensormap_a, gA, params.tma_b,
                       b_half_tiles<Cfg>(mB, tc.group, col_gate),
                       b_half_tiles<Cfg>(mB, tc.group, col_up), params.k_tiles);
}

// ---------------------------------------------------------------------------------------------
// Consumer: wgmma mainloop of one tile (256 consumer threads, both warpgroups)
// ---------------------------------------------------------------------------------------------
template <class Cfg, class Accumulator, class Waiter = BlockingWait>
__device__ __forceinline__ void consume_tile(SharedStorage<Cfg>& smem,
                                             typename Cfg::Pipeline& pipeline,
                                             typename Cfg::PipelineState& read_state,
                                             int k_tiles, int consumer_thread,
                                             Accumulator& accum, Waiter const& waiter = {}) {
  Tensor sA = make_tensor(make_smem_ptr(smem.tensors.a.data()), typename Cfg::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(smem.tensors.b.data()), typename Cfg::SmemLayoutB{});
  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(consumer_thread);
  Tensor tCsA = thr_mma.partition_A(sA);  // (MMA,MMA_M,MMA_K,STAGES)
  Tensor tCsB = thr_mma.partition_B(sB);  // (MMA,MMA_N,MMA_K,STAGES)
  Tensor tCrA = thr_mma.make_fragment_A(tCsA);
  Tensor tCrB = thr_mma.make_fragment_B(tCsB);

  tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  auto release_state = read_state;
  warpgroup_fence_operand(accum);
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    waiter.wait(pipeline, read_state);
    const int stage = read_state.index();
    warpgroup_fence_operand(accum);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
      cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
      tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    // At most one batch in flight: the previous k tile's wgmmas are done, release its stage.
    warpgroup_wait<1>();
    warpgroup_fence_operand(accum);
    if (k_tile > 0) {
      pipeline.consumer_release(release_state);
      ++release_state;
    }
    ++read_state;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(accum);
  if (k_tiles > 0) pipeline.consumer_release(release_state);
}

// ---------------------------------------------------------------------------------------------
// Epilogue: registers -> per-warp shared-memory staging -> coalesced 16-B global stores
// ---------------------------------------------------------------------------------------------
// Each consumer warp owns 16 rows x 256 accumulator columns of the tile (rows 16*w .. 16*w+15
// for consumer warp w). The output is written in chunks of 32 columns: the warp's fragment of
// the chunk (registers 16c .. 16c+15) goes through its own staging buffer (16 rows x 32 columns,
// padded rows: conflict-free) and is then stored with 16-B vectors, 4 (bf16/f16) or 8 (f32)
// lanes per row, predicated on rows (< the group's end) and columns (< n_out; n_out % 8 == 0 so
// a 16-B segment is all in or all out). Only __syncwarp, no block barrier.
// The pre-activation (kept for backward) of a gated tile goes through the staging buffer too; a
// non-gated tile's is stored directly from registers.
template <class TOut>
struct StagingShape {
  static constexpr int kChunkCols = 32;
  static constexpr int kRows = 16;
  static constexpr int kRowBytes = kChunkCols * int(sizeof(TOut));
  static constexpr int kPitch = kRowBytes + (sizeof(TOut) == 4 ? 32 : 16);  // bank-conflict pad
  static constexpr int kLanesPerRow = kRowBytes / 16;
  static constexpr int kRowsPerPass = 32 / kLanesPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static constexpr int kElemsPer16B = 16 / int(sizeof(TOut));
};
static_assert(StagingShape<float>::kRows * StagingShape<float>::kPitch <= kStagingBytesPerWarp);

// Where and how one tile is written.
struct TileStore {
  Epilogue epilogue;
  ElementType c_type;
  void* c;                   // output rows of n_out columns
  void* pre_activation;      // [rows, n] or null (backward)
  const float* row_scale;    // [rows] or null
  const void* bias;          // output type, [n] or null; gated: gate bias at col, up at n_out + col
  const int32_t* row_index;  // destination row of each row of the tile's rows, or null (same row)
  int64_t n, n_out;
  bool accumulate;           // f32 output only: c += result
  const void* activation_input = nullptr;  // k*Backward: the pre-activation (type of c)
  // TMA descriptor (Config::TmaChunk, in kernel parameter space) of pre_activation as a
  // [rows, n] matrix of TOut, or null: the gated pre-activation's chunks then go through the
  // staging buffer and the warp's own stores.
  const void* pre_tma = nullptr;
  // The same for the output c as a [rows, n_out] matrix of TOut (no row_index, no accumulate).
  const void* c_tma = nullptr;
};

template <class Cfg>
__device__ __forceinline__ TileStore tile_store_of(Params<Cfg> const& params) {
  return TileStore{params.epilogue, params.c_type, params.c, params.pre_activation,
                   params.row_scale, nullptr, nullptr, params.n, params.n_out, params.accumulate,
                   params.activation_input,
                   params.pre_tma ? static_cast<const void*>(params.tma_chunk_pre.get_tma_descriptor()) : nullptr,
                   params.c_tma ? static_cast<const void*>(params.tma_chunk_c.get_tma_descriptor()) : nullptr};
}

// Phase 2 of the epilogue: the warp's staged 16 x 32 chunk -> dst (row pitch `pitch` elements,
// first column col0 < n_out) with coalesced 16-B stores, predicated on rows (< the group's end)
// and columns (< n_out; n_out % 8 == 0 so a 16-B segment is all in or all out). The output
// (kOutput) also applies row_index — through dst_rows, this lane's destination row of each pass,
// loaded once per tile (row_index_of_passes) — and accumulate. Ends with __syncwarp (staging
// reusable).
template <class SS, class TOut, bool kOutput>
__device__ __forceinline__ void flush_staged_chunk(TileStore const& params, TileCoord const& tc,
                                                   const char* staging, int lane, int warp_row0,
                                                   TOut* dst_base, int64_t pitch, int col0,
                                                   const int32_t* dst_rows = nullptr) {
  CUTE_UNROLL
  for (int pass = 0; pass < SS::kPasses; ++pass) {
    const int r = pass * SS::kRowsPerPass + lane / SS::kLanesPerRow;
    const int segment = lane % SS::kLanesPerRow;
    const int64_t row = tc.row_begin + warp_row0 + r;
    const int col = col0 + segment * SS::kElemsPer16B;
    if (row < tc.row_end && col < params.n_out) {
      uint4 value = *reinterpret_cast<const uint4*>(staging + r * SS::kPitch + segment * 16);
      int64_t dst_row = row;
      if constexpr (kOutput) dst_row = params.row_index != nullptr ? dst_rows[pass] : row;
      TOut* dst = dst_base + dst_row * pitch + col;
      if constexpr (kOutput && std::is_same_v<TOut, float>) {
        if (params.accumulate) {
          const float4 old = *reinterpret_cast<const float4*>(dst);
          value.x = __float_as_uint(__uint_as_float(value.x) + old.x);
          value.y = __float_as_uint(__uint_as_float(value.y) + old.y);
          value.z = __float_as_uint(__uint_as_float(value.z) + old.z);
          value.w = __float_as_uint(__uint_as_float(value.w) + old.w);
        }
      }
      *reinterpret_cast<uint4*>(dst) = value;
    }
  }
  __syncwarp();
}

// row_index of the rows this lane stores in each pass of flush_staged_chunk (rows past the
// group: 0, never used). Loaded once per tile: reloaded in every chunk's flush, the loads could
// not move above the previous chunk's stores (which may alias them), a round trip per chunk.
template <class SS>
__device__ __forceinline__ void row_index_of_passes(TileStore const& params, TileCoord const& tc, int lane,
                                                    int warp_row0, int32_t (&dst_rows)[SS::kPasses]) {
  CUTE_UNROLL
  for (int pass = 0; pass < SS::kPasses; ++pass) {
    const int64_t row = tc.row_begin + warp_row0 + pass * SS::kRowsPerPass + lane / SS::kLanesPerRow;
    dst_rows[pass] = row < tc.row_end ? params.row_index[row] : 0;
  }
}

// Epilogue TMA stores of a warp's 16 x 32 chunks of 16-bit values (Config::TmaChunk): the warp
// writes the chunk into one of two 1-KiB buffers of its staging area (64-B rows, 16-B units
// XOR-ed with (row / 2) % 4: the 64-B swizzle, conflict-free for the accumulator's pair layout)
// and one lane hands it to the TMA unit, which writes it to global memory while the warp goes
// on (the next chunk, the next tile's mainloop). A buffer is rewritten only after the store that
// read it has read it (cp.async.bulk.wait_group.read, one group per store). Rows: only warps
// whose 16 rows all lie in the tile's group take this path (a TMA box knows no group end).
__device__ __forceinline__ uint32_t chunk_tma_offset(int row, int col) {  // col: 16-bit element
  const int unit = col / 8;
  return uint32_t(row * 64 + ((unit ^ ((row / 2) % 4)) << 4) + (col % 8) * 2);
}

// Where a chunk is written: via_tma, buffer `count % 2` once the store issued two chunks ago
// (from the same buffer) has read it; otherwise the staging area of the register path, once
// every earlier store (count of them) has read it. Warp-collective.
__device__ __forceinline__ char* chunk_buffer(bool via_tma, char* staging, int count, int lane) {
  if (!via_tma && count == 0) return staging;
  if (lane == 0) {
    if (via_tma) tma_store_wait<1>();
    else tma_store_wait<0>();
  }
  __syncwarp();
  return via_tma ? staging + (count % 2) * 1024 : staging;
}

// After the warp's writes to `buffer`: the chunk at (row, col) of the descriptor's matrix.
// Warp-collective.
__device__ __forceinline__ void chunk_tma_issue(const void* desc, const char* buffer, int64_t row, int64_t col,
                                                int lane) {
  tma_store_fence();  // the warp's generic-proxy writes -> visible to the TMA unit
  __syncwarp();
  if (lane == 0) {
    SM90_TMA_STORE_2D::copy(desc, buffer, int32_t(col), int32_t(row));
    tma_store_arrive();
  }
}

// Before the staging area is used by the register path again: every TMA store has read it.
__device__ __forceinline__ void chunk_tma_drain(int lane) {
  if (lane == 0) tma_store_wait<0>();
  __syncwarp();
}

// One instantiation per (output type, activation, pre-activation stored or not): see
// store_tile_typed below for why the activation is a template argument. kRuntime: activation
// and pre-activation store read from `params` instead (the rarely used dgrad epilogues).
// The gated pre-activation (both halves) goes through the staging buffer like the output:
// stored from registers, its 4-B writes to rows 2n apart took 2.5 of mixtral's 7.9 ms GEMM0.
template <class Cfg, class TOut, Epilogue kEpilogue, bool kStorePre, class Accumulator,
          bool kRuntime = false>
__device__ __forceinline__ void store_tile_fixed(TileStore const& params, TileCoord const& tc,
                                                 int consumer_thread, Accumulator const& accum,
                                                 char* staging) {
  using namespace epilogue_math;
  using SS = StagingShape<TOut>;
  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(consumer_thread);
  Tensor coord = thr_mma.partition_C(
      make_identity_tensor(make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{})));
  static_assert(decltype(size(coord))::value == decltype(size(accum))::value);

  auto* c = static_cast<TOut*>(params.c);
  auto* pre = static_cast<TOut*>(params.pre_activation);
  const int64_t n_out = params.n_out;
  const int64_t n = params.n;
  const int col_base = tc.n_tile * Cfg::kOutBlockN;
  const auto* bias = static_cast<const TOut*>(params.bias);
  const int lane = consumer_thread % 32;
  const int warp_row0 = (consumer_thread / 32) * SS::kRows;

  // The two rows this thread holds: warp_row0 + lane/4 and warp_row0 + lane/4 + 8.
  float scale_lo = 1.0f, scale_hi = 1.0f;
  if (params.row_scale != nullptr) {
    const int64_t row_lo = tc.row_begin + warp_row0 + lane / 4;
    if (row_lo < tc.row_end) scale_lo = __ldg(params.row_scale + row_lo);
    if (row_lo + 8 < tc.row_end) scale_hi = __ldg(params.row_scale + row_lo + 8);
  }

  // Register layout of the 64x256 wgmma accumulator (checked on the host in the tests' layout
  // probe): registers 2j, 2j+1 are adjacent columns of one row; register i + kHalf is column
  // + 128 of the same row; registers [16c, 16c+16) are the columns [32c, 32c+32).
  constexpr int kSize = decltype(size(accum))::value;
  constexpr int kHalf = kSize / 2;
  constexpr int kChunks = Cfg::kOutBlockN / SS::kChunkCols;
  constexpr int kRegsPerChunk = 16;
  static_assert(kChunks * kRegsPerChunk == (Cfg::kGated ? kHalf : kSize));

  // Bias of output columns (col, col + 1) of the tile, the up half's at `offset` = n_out.
  auto bias_pair = [&](int tile_col, int64_t offset) {
    const int col = col_base + tile_col;
    if (bias == nullptr || col >= n_out) return make_float2(0.0f, 0.0f);  // n_out even
    return make_float2(to_float(bias[offset + col]), to_float(bias[offset + col + 1]));
  };
  // Phase 1 (inline below, never in a lambda: the accumulator must stay in registers): this
  // thread's fragment of a chunk -> the warp's staging buffer (16 rows x 32 columns, padded
  // rows: conflict-free), then __syncwarp.
  auto slot = [&](int r, int col_in_chunk) {
    return reinterpret_cast<TOut*>(staging + r * SS::kPitch) + col_in_chunk;
  };
  // Phase 2: flush_staged_chunk.

  // Gated: the raw result (+ bias) at its original columns, gate half [0, n_out) and up half
  // + n_out, in passes of their own (one loop with the output pass made the compiler keep the
  // accumulator in local memory; so did these passes in the non-gated kernels, whose
  // pre-activation is stored from registers in the output loop below).
  if constexpr (Cfg::kGated && kStorePre) {
    // TMA stores (chunk_tma_*) for the warps whose rows are all in the group, 16-bit pre only.
    const int64_t warp_row_begin = tc.row_begin + warp_row0;
    const bool warp_tma = sizeof(TOut) == 2 && params.pre_tma != nullptr && warp_row_begin + SS::kRows <= tc.row_end;
    int tma_count = 0;
    CUTE_UNROLL
    for (int half = 0; half < 2; ++half) {
      CUTE_UNROLL
      for (int chunk = 0; chunk < kChunks; ++chunk) {
        const int col0 = col_base + chunk * SS::kChunkCols;
        if (col0 < n_out) {  // warp-uniform
          // One copy of the register writes for both paths (a second one in a branch of its own
          // made ptxas serialise the kernel's wgmmas).
          const bool via_tma = warp_tma && col0 + SS::kChunkCols <= n_out;  // warp-uniform
          char* buffer = chunk_buffer(via_tma, staging, tma_count, lane);
          CUTE_UNROLL
          for (int q = 0; q < kRegsPerChunk; q += 2) {
            const int i = chunk * kRegsPerChunk + q + half * kHalf;
            const int tile_col = get<1>(coord(i)) - half * Cfg::kHalfN;
            const float2 b = bias_pair(tile_col, half * n_out);
            const int r = get<0>(coord(i)) - warp_row0, cc = tile_col - chunk * SS::kChunkCols;
            TOut* dst = via_tma ? reinterpret_cast<TOut*>(buffer + chunk_tma_offset(r, cc)) : slot(r, cc);
            store_pair(dst, accum(i) + b.x, accum(i + 1) + b.y);
          }
          if (via_tma) {
            chunk_tma_issue(params.pre_tma, buffer, warp_row_begin, half * n_out + col0, lane);
            ++tma_count;
          } else {
            __syncwarp();
            flush_staged_chunk<SS, TOut, false>(params, tc, staging, lane, warp_row0, pre + half * n_out, n, col0);
          }
        }
      }
    }
    if (tma_count > 0) chunk_tma_drain(lane);
  }
  // The output's chunks: TMA stores as above where c allows them (c_tma, 16-bit, no row_index,
  // no accumulation) and the warp's rows are all in the group.
  const int64_t out_row_begin = tc.row_begin + warp_row0;
  // Forward kernels only (in the dgrad kernels ptxas spilled ~1 KB around it).
  const bool out_tma = Cfg::kOperands == Operands::kForward && sizeof(TOut) == 2 && params.c_tma != nullptr &&
                       params.row_index == nullptr && out_row_begin + SS::kRows <= tc.row_end;
  int32_t dst_rows[SS::kPasses];
  if (params.row_index != nullptr) row_index_of_passes<SS>(params, tc, lane, warp_row0, dst_rows);
  int out_count = 0;
  CUTE_UNROLL
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    // Skip chunks entirely right of n_out (warp-uniform).
    const int col0 = col_base + chunk * SS::kChunkCols;
    if (col0 >= n_out) break;
    const bool via_tma = out_tma && col0 + SS::kChunkCols <= n_out;  // warp-uniform
    char* buffer = chunk_buffer(via_tma, staging, out_count, lane);
    CUTE_UNROLL
    for (int q = 0; q < kRegsPerChunk; q += 2) {
      const int i = chunk * kRegsPerChunk + q;
      const int r = get<0>(coord(i)) - warp_row0;  // 0..15
      const int tile_col = get<1>(coord(i));
      const float scale = r < 8 ? scale_lo : scale_hi;
      const float2 b = bias_pair(tile_col, 0);
      float out0, out1;
      if constexpr (Cfg::kGated) {
        const float2 b_up = bias_pair(tile_col, n_out);
        out0 = gate_up<kEpilogue>(accum(i) + b.x, accum(i + kHalf) + b_up.x);
        out1 = gate_up<kEpilogue>(accum(i + 1) + b.y, accum(i + kHalf + 1) + b_up.y);
      } else {
        const float v0 = accum(i) + b.x, v1 = accum(i + 1) + b.y;
        if (kStorePre || (kRuntime && pre != nullptr)) {
          const int64_t row = tc.row_begin + warp_row0 + r;
          const int col = col_base + tile_col;
          if (row < tc.row_end && col < n_out) store_pair(pre + row * n + col, v0, v1);
        }
        out0 = kRuntime ? activate(params.epilogue, v0) : activate<kEpilogue>(v0);
        out1 = kRuntime ? activate(params.epilogue, v1) : activate<kEpilogue>(v1);
      }
      const int cc = tile_col - chunk * SS::kChunkCols;
      TOut* dst = via_tma ? reinterpret_cast<TOut*>(buffer + chunk_tma_offset(r, cc)) : slot(r, cc);
      store_pair(dst, out0 * scale, out1 * scale);
    }
    if (via_tma) {
      chunk_tma_issue(params.c_tma, buffer, out_row_begin, col0, lane);
      ++out_count;
    } else {
      __syncwarp();
      flush_staged_chunk<SS, TOut, true>(params, tc, staging, lane, warp_row0, c, n_out, col0, dst_rows);
    }
  }
  // The staging area is free for the next tile's epilogue once the TMA unit has read it.
  if (out_count > 0) chunk_tma_drain(lane);
}

// The epilogue of one tile with output type TOut: dispatches once per tile to the instantiation
// of its activation and pre-activation store. With the activation a runtime switch inside the
// unrolled tile loop, the forward kernels were 240-300 KB of code (the instruction cache holds a
// fraction of that) and paid ~8 us per tile in the epilogue.
template <class Cfg, class TOut, class Accumulator>
__device__ __forceinline__ void store_tile_typed(TileStore const& params, TileCoord const& tc,
                                                 int consumer_thread, Accumulator const& accum,
                                                 char* staging) {
  if constexpr (Cfg::kOperands != Operands::kForward) {
    // dgrad / wgrad: only the plain product (identity, no pre-activation) gets its own
    // instantiation; more inlined variants made ptxas serialise the dgrad kernel's wgmmas.
    if (params.epilogue == Epilogue::kIdentity && params.pre_activation == nullptr)
      store_tile_fixed<Cfg, TOut, Epilogue::kIdentity, false>(params, tc, consumer_thread, accum, staging);
    else
      store_tile_fixed<Cfg, TOut, Epilogue::kIdentity, false, Accumulator, true>(params, tc, consumer_thread,
                                                                               accum, staging);
    return;
  }
  auto with_pre = [&]<bool kStorePre>() {
    if constexpr (Cfg::kGated) {
      if (params.epilogue == Epilogue::kGeGlu)
        store_tile_fixed<Cfg, TOut, Epilogue::kGeGlu, kStorePre>(params, tc, consumer_thread, accum, staging);
      else
        store_tile_fixed<Cfg, TOut, Epilogue::kSwiGlu, kStorePre>(params, tc, consumer_thread, accum, staging);
    } else {
      switch (params.epilogue) {
        case Epilogue::kRelu:
          return store_tile_fixed<Cfg, TOut, Epilogue::kRelu, kStorePre>(params, tc, consumer_thread, accum, staging);
        case Epilogue::kGelu:
          return store_tile_fixed<Cfg, TOut, Epilogue::kGelu, kStorePre>(params, tc, consumer_thread, accum, staging);
        default:
          return store_tile_fixed<Cfg, TOut, Epilogue::kIdentity, kStorePre>(params, tc, consumer_thread, accum, staging);
      }
    }
  };
  if (params.pre_activation != nullptr) with_pre.template operator()<true>();
  else with_pre.template operator()<false>();
}

// The persistent kernel's GEMM0 epilogue (fused_sm90.cuh): every chunk leaves by a TMA store,
// with no register path compiled beside it (in the persistent kernel's consumers, the two
// paths of store_tile_fixed together spilled). This needs rows that a 16-row box may overrun:
// the kernel's segments start on 16-row boundaries and own the padding up to the next one
// (WorkspaceLayout::kSegmentAlign), so a warp whose first row lies inside the tile's group
// writes all 16 rows (the ones past the group's end land in its padding) and a warp whose rows
// all lie past it writes nothing. Columns past n_out and rows past the matrix are clipped by
// the TMA unit. `tma` is a store descriptor (Config::SmemLayoutChunk boxes) over a
// (rows, n_out, heaps) view; the tile's rows are rows row_base + [row_begin, row_end) of heap
// `heap`. Ends when the writes are complete (cp.async.bulk.wait_group 0, not .read): the caller
// publishes the rows to other blocks' TMA loads after it.
template <class Cfg, class TOut, Epilogue kEpilogue, class TmaStore, class Accumulator>
__device__ __forceinline__ void store_tile_tma_fixed(TmaStore const& tma, int rows, int heaps, int heap,
                                                     int64_t row_base, const TOut* bias, int64_t n_out,
                                                     TileCoord const& tc, int consumer_thread,
                                                     Accumulator const& accum, char* staging) {
  using namespace epilogue_math;
  using SS = StagingShape<TOut>;
  static_assert(sizeof(TOut) == 2, "TMA-store epilogue: 16-bit outputs");
  const int lane = consumer_thread % 32;
  const int warp_row0 = (consumer_thread / 32) * SS::kRows;
  const int64_t warp_row_begin = tc.row_begin + warp_row0;
  if (warp_row_begin >= tc.row_end) return;  // warp-uniform
  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(consumer_thread);
  Tensor coord = thr_mma.partition_C(
      make_identity_tensor(make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{})));
  // TMA coordinates of (row, column, heap), in the descriptor's own order.
  Tensor mC = tma.get_tma_tensor(make_shape(rows, int(n_out), heaps));
  const int col_base = tc.n_tile * Cfg::kOutBlockN;
  constexpr int kSize = decltype(size(accum))::value;
  constexpr int kHalf = kSize / 2;
  constexpr int kChunks = Cfg::kOutBlockN / SS::kChunkCols;
  constexpr int kRegsPerChunk = 16;
  static_assert(kChunks * kRegsPerChunk == (Cfg::kGated ? kHalf : kSize));
  auto bias_pair = [&](int tile_col, int64_t offset) {
    const int col = col_base + tile_col;
    if (bias == nullptr || col >= n_out) return make_float2(0.0f, 0.0f);  // n_out even
    return make_float2(to_float(bias[offset + col]), to_float(bias[offset + col + 1]));
  };
  CUTE_UNROLL
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int col0 = col_base + chunk * SS::kChunkCols;
    if (col0 >= n_out) break;  // warp-uniform
    // Buffer chunk % 2, once the store issued two chunks ago (from it) has read it.
    if (chunk >= 2) {
      if (lane == 0) tma_store_wait<1>();
      __syncwarp();
    }
    char* buffer = staging + (chunk % 2) * 1024;
    CUTE_UNROLL
    for (int q = 0; q < kRegsPerChunk; q += 2) {
      const int i = chunk * kRegsPerChunk + q;
      const int r = get<0>(coord(i)) - warp_row0;  // 0..15
      const int tile_col = get<1>(coord(i));
      const float2 b = bias_pair(tile_col, 0);
      float out0, out1;
      if constexpr (Cfg::kGated) {
        const float2 b_up = bias_pair(tile_col, n_out);
        out0 = gate_up<kEpilogue>(accum(i) + b.x, accum(i + kHalf) + b_up.x);
        out1 = gate_up<kEpilogue>(accum(i + 1) + b.y, accum(i + kHalf + 1) + b_up.y);
      } else {
        out0 = activate<kEpilogue>(accum(i) + b.x);
        out1 = activate<kEpilogue>(accum(i + 1) + b.y);
      }
      store_pair(reinterpret_cast<TOut*>(buffer + chunk_tma_offset(r, tile_col - chunk * SS::kChunkCols)), out0, out1);
    }
    tma_store_fence();  // the warp's generic-proxy writes -> visible to the TMA unit
    __syncwarp();
    if (lane == 0) {
      const auto crd = mC(row_base + warp_row_begin, col0, heap);
      SM90_TMA_STORE_3D::copy(tma.get_tma_descriptor(), buffer, get<0>(crd), get<1>(crd), get<2>(crd));
      tma_store_arrive();
    }
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  __syncwarp();
}

// The same, dispatched once per tile to the instantiation of its activation.
template <class Cfg, class TOut, class TmaStore, class Accumulator>
__device__ __forceinline__ void store_tile_tma_typed(Epilogue epilogue, TmaStore const& tma, int rows, int heaps,
                                                     int heap, int64_t row_base, const TOut* bias, int64_t n_out,
                                                     TileCoord const& tc, int consumer_thread,
                                                     Accumulator const& accum, char* staging) {
  auto fixed = [&]<Epilogue kEpilogue>() {
    store_tile_tma_fixed<Cfg, TOut, kEpilogue>(tma, rows, heaps, heap, row_base, bias, n_out, tc, consumer_thread,
                                              accum, staging);
  };
  if constexpr (Cfg::kGated) {
    if (epilogue == Epilogue::kGeGlu) fixed.template operator()<Epilogue::kGeGlu>();
    else fixed.template operator()<Epilogue::kSwiGlu>();
  } else {
    switch (epilogue) {
      case Epilogue::kRelu: return fixed.template operator()<Epilogue::kRelu>();
      case Epilogue::kGelu: return fixed.template operator()<Epilogue::kGelu>();
      default: return fixed.template operator()<Epilogue::kIdentity>();
    }
  }
}

// The k*Backward epilogues (dgrad of GEMM1 + activation backward; see Epilogue): the fp32 dact
// chunk goes through the staging buffer as in store_tile_typed, then each lane takes 4
// consecutive columns of one row (a pass covers 4 rows x 32 columns: 64-B row segments): reads
// the pre-activation there (and the up half at + n), stores dpre (both halves). The reads hit
// L2 (prefetch_activation_input at the start of the tile) and all of a chunk's reads are issued
// before its dact is staged: a read per pass, waited for one after the other, left this
// epilogue 5x slower than the GEMM.
template <class Cfg>
__device__ __forceinline__ void prefetch_activation_input(TileStore const& params, TileCoord const& tc,
                                                          int consumer_thread) {
  // Thread t: row t / 2 of the tile; gated: the gate (t even) or up (t odd) half of the tile's
  // 256 columns, else columns [128 (t % 2), + 128). One bulk L2 prefetch of up to 512 B.
  const bool gated = is_gated(forward_of(params.epilogue));
  const int64_t n = params.n, width = gated ? 2 * n : n;
  const int64_t row = tc.row_begin + consumer_thread / 2;
  const int piece = consumer_thread % 2;
  int64_t col = int64_t(tc.n_tile) * Cfg::kOutBlockN + (gated ? 0 : 128 * piece);
  const int64_t cols = std::min<int64_t>(gated ? Cfg::kOutBlockN : 128, n - col);
  if (gated) col += piece * n;
  if (row >= tc.row_end || cols <= 0) return;
  const char* src = static_cast<const char*>(params.activation_input) + (row * width + col) * 2;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(uint32_t(cols * 2)) : "memory");
}

// act(x) and act'(x) of a compile-time activation, fast intrinsics (the epilogue is unrolled over
// a whole chunk: with a runtime activation every element carried all of them, and the kernel
// stalled on instruction fetch).
template <Epilogue kAct>
__device__ __forceinline__ float2 activation_and_grad(float x) {
  if constexpr (kAct == Epilogue::kRelu) {
    return make_float2(fmaxf(x, 0.f), x > 0.f ? 1.f : 0.f);
  } else if constexpr (kAct == Epilogue::kSwiGlu) {
    const float s = __fdividef(1.f, 1.f + __expf(-x));
    return make_float2(x * s, s * (1.f + x * (1.f - s)));
  } else {  // kGelu, kGeGlu (exact erf)
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    return make_float2(x * cdf, cdf + x * 0.39894228040143268f * __expf(-0.5f * x * x));
  }
}

// With a ring (kPreRing kernels) the chunk's pre-activation is read from its ring slot instead
// of global memory (see PreRing); ring_count is the consumer's running chunk count.
template <class Cfg, class T, Epilogue kAct, class Accumulator>
__device__ __forceinline__ void store_tile_activation_backward(TileStore const& params,
                                                               TileCoord const& tc,
                                                               int consumer_thread,
                                                               Accumulator const& accum,
                                                               char* staging,
                                                               PreRing<Cfg>* ring = nullptr,
                                                               uint32_t* ring_count = nullptr) {
  using namespace epilogue_math;
  using SS = StagingShape<float>;
  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(consumer_thread);
  Tensor coord = thr_mma.partition_C(
      make_identity_tensor(make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{})));
  constexpr bool gated = is_gated(kAct);
  const int64_t n = params.n;
  const int64_t width = gated ? 2 * n : n;
  const int col_base = tc.n_tile * Cfg::kOutBlockN;
  const int lane = consumer_thread % 32;
  const int warp_row0 = (consumer_thread / 32) * SS::kRows;
  const T* input = static_cast<const T*>(params.activation_input);
  T* out = static_cast<T*>(params.c);
  constexpr int kChunks = Cfg::kOutBlockN / SS::kChunkCols;
  constexpr int kRegsPerChunk = 16;
  // This lane's reads of a chunk (all of them in flight at once), issued one chunk ahead: chunk
  // c + 1's reads are in flight while chunk c is computed and stored.
  uint2 gate_next[SS::kPasses], up_next[SS::kPasses];
  auto issue_reads = [&](int chunk) {
    CUTE_UNROLL
    for (int pass = 0; pass < SS::kPasses; ++pass) {
      const int64_t row = tc.row_begin + warp_row0 + pass * SS::kRowsPerPass + lane / SS::kLanesPerRow;
      const int64_t col = col_base + chunk * SS::kChunkCols + (lane % SS::kLanesPerRow) * 4;
      gate_next[pass] = up_next[pass] = make_uint2(0, 0);
      if (row < tc.row_end && col < n) {
        gate_next[pass] = *reinterpret_cast<const uint2*>(input + row * width + col);
        if constexpr (gated) up_next[pass] = *reinterpret_cast<const uint2*>(input + row * width + col + n);
      }
    }
  };
  static_assert(SS::kChunkCols == 32, "pre_ring_chunks counts 32-column chunks");
  const int chunks = pre_ring_chunks<Cfg>(n, col_base);
  if constexpr (!Cfg::kPreRing) issue_reads(0);
  CUTE_UNROLL
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    if (chunk >= chunks) break;
    uint2 gate_raw[SS::kPasses], up_raw[SS::kPasses];
    if constexpr (Cfg::kPreRing) {
      // The chunk from its ring slot (every warp takes every chunk, valid rows or not: the
      // producer loads the same sequence), then the slot goes back to the producer.
      const uint32_t slot = *ring_count % PreRing<Cfg>::kSlots;
      cutlass::arch::ClusterTransactionBarrier::wait(&ring->full[slot], (*ring_count / PreRing<Cfg>::kSlots) & 1);
      CUTE_UNROLL
      for (int pass = 0; pass < SS::kPasses; ++pass) {
        const int r = warp_row0 + pass * SS::kRowsPerPass + lane / SS::kLanesPerRow;
        const int offset = r * SS::kChunkCols + (lane % SS::kLanesPerRow) * 4;
        gate_raw[pass] = *reinterpret_cast<const uint2*>(&ring->data[slot][0][offset]);
        up_raw[pass] = gated ? *reinterpret_cast<const uint2*>(&ring->data[slot][1][offset]) : make_uint2(0, 0);
      }
      __syncwarp();
      if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&ring->empty[slot]);
      ++*ring_count;
    } else {
      CUTE_UNROLL
      for (int pass = 0; pass < SS::kPasses; ++pass) {
        gate_raw[pass] = gate_next[pass];
        up_raw[pass] = up_next[pass];
      }
      if (chunk + 1 < kChunks) issue_reads(chunk + 1);
    }
    CUTE_UNROLL
    for (int q = 0; q < kRegsPerChunk; q += 2) {
      const int i = chunk * kRegsPerChunk + q;
      const int r = get<0>(coord(i)) - warp_row0;
      const int tile_col = get<1>(coord(i));
      store_pair(reinterpret_cast<float*>(staging + r * SS::kPitch) + (tile_col - chunk * SS::kChunkCols),
                 accum(i), accum(i + 1));
    }
    __syncwarp();
    CUTE_UNROLL
    for (int pass = 0; pass < SS::kPasses; ++pass) {
      const int r = pass * SS::kRowsPerPass + lane / SS::kLanesPerRow;
      const int segment = lane % SS::kLanesPerRow;
      const int64_t row = tc.row_begin + warp_row0 + r;
      const int64_t col = col_base + chunk * SS::kChunkCols + segment * 4;
      if (row < tc.row_end && col < n) {
        const float4 da = *reinterpret_cast<const float4*>(staging + r * SS::kPitch + segment * 16);
        const float dact[4] = {da.x, da.y, da.z, da.w};
        const T* gate = reinterpret_cast<const T*>(&gate_raw[pass]);
        const T* up = reinterpret_cast<const T*>(&up_raw[pass]);
        float d0[4], d1[4];
        CUTE_UNROLL
        for (int e = 0; e < 4; ++e) {
          const float2 ag = activation_and_grad<kAct>(to_float(gate[e]));
          d0[e] = dact[e] * ag.y * (gated ? to_float(up[e]) : 1.0f);
          d1[e] = dact[e] * ag.x;
        }
        // One 8-B (16-bit types) store per half: 8 lanes write a row's 64-B segment in one
        // instruction (as 4-B pairs, two instructions each wrote every other 4 B of it).
        T* dst = out + row * width + col;
        store_quad(dst, d0[0], d0[1], d0[2], d0[3]);
        if constexpr (gated) store_quad(dst + n, d1[0], d1[1], d1[2], d1[3]);
      }
    }
    __syncwarp();
  }
}

template <class Cfg, class Accumulator>
__device__ __forceinline__ void store_tile(TileStore const& params, TileCoord const& tc,
                                           int consumer_thread, Accumulator const& accum,
                                           char* staging, PreRing<Cfg>* ring = nullptr,
                                           uint32_t* ring_count = nullptr) {
  if constexpr (Cfg::kOperands == Operands::kDgrad) {
    if (Cfg::kPreRing || is_activation_backward(params.epilogue)) {
      auto with_type = [&]<class T>(T*) {
        switch (forward_of(params.epilogue)) {
          case Epilogue::kRelu:
            return store_tile_activation_backward<Cfg, T, Epilogue::kRelu>(params, tc, consumer_thread, accum, staging,
                                                                           ring, ring_count);
          case Epilogue::kGelu:
            return store_tile_activation_backward<Cfg, T, Epilogue::kGelu>(params, tc, consumer_thread, accum, staging,
                                                                           ring, ring_count);
          case Epilogue::kSwiGlu:
            return store_tile_activation_backward<Cfg, T, Epilogue::kSwiGlu>(params, tc, consumer_thread, accum,
                                                                             staging, ring, ring_count);
          default:
            return store_tile_activation_backward<Cfg, T, Epilogue::kGeGlu>(params, tc, consumer_thread, accum,
                                                                            staging, ring, ring_count);
        }
      };
      if (params.c_type == ElementType::kBF16) with_type(static_cast<__nv_bfloat16*>(nullptr));
      else with_type(static_cast<__half*>(nullptr));
      return;
    }
  }
  if constexpr (!Cfg::kPreRing) {  // a kPreRing kernel runs only the k*Backward epilogues
    switch (params.c_type) {
      case ElementType::kBF16:
        store_tile_typed<Cfg, __nv_bfloat16>(params, tc, consumer_thread, accum, staging);
        break;
      case ElementType::kF16:
        store_tile_typed<Cfg, __half>(params, tc, consumer_thread, accum, staging);
        break;
      case ElementType::kF32:
        store_tile_typed<Cfg, float>(params, tc, consumer_thread, accum, staging);
        break;
    }
  }
}

template <class Cfg, class Accumulator>
__device__ __forceinline__ void store_tile(Params<Cfg> const& params, TileCoord const& tc,
                                           int consumer_thread, Accumulator const& accum,
                                           char* staging, PreRing<Cfg>* ring = nullptr,
                                           uint32_t* ring_count = nullptr) {
  store_tile<Cfg>(tile_store_of(params), tc, consumer_thread, accum, staging, ring, ring_count);
}

// Producer warp of the pre-activation ring (kPreRing; warp 1 of the producer warpgroup, see
// PreRing). Publishes its CTA's copy of tma_pre with the real row extent (as warp 0 does for A:
// the pre-activation, like A, need only hold row_offsets[num_groups] rows), then loads every
// chunk of every tile of the CTA in the consumers' order.
template <class Cfg>
__device__ __forceinline__ void produce_pre_ring(Params<Cfg> const& params, GroupTables tables,
                                                 PreRing<Cfg>& ring, int rows_total, int total_tiles) {
  using ElementAB = typename Cfg::ElementAB;
  const auto* pre = static_cast<ElementAB const*>(params.activation_input);
  cute::TmaDescriptor* desc = params.tensormap_workspace + gridDim.x + blockIdx.x;
  publish_tma_descriptor(params.tma_pre, Cfg::make_gmem_pre(pre, rows_total, params.pre_width), ring.tensormap, desc);
  if (threadIdx.x % 32 != 0) return;
  const bool gated = is_gated(forward_of(params.epilogue));
  const uint32_t chunk_bytes = uint32_t(PreRing<Cfg>::kChunkElems * sizeof(ElementAB)) * (gated ? 2 : 1);
  Tensor mP = params.tma_pre.get_tma_tensor(make_shape(rows_total, params.pre_width));
  Tensor sP = make_tensor(make_smem_ptr(&ring.data[0][0][0]),
                          make_layout(make_shape(_128{}, _32{}, Int<2 * PreRing<Cfg>::kSlots>{}),
                                      make_stride(_32{}, _1{}, Int<PreRing<Cfg>::kChunkElems>{})));
  uint32_t count = 0;
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord tc = decode_tile<Cfg::kBlockM>(tables, params.num_groups, tile);
    const int col_base = tc.n_tile * Cfg::kOutBlockN;
    const int chunks = pre_ring_chunks<Cfg>(params.n, col_base);
    // (128, 32, CHUNKS) views of the tile's gate (or only) half and of its up half.
    auto chunk_tiles = [&](int col) {
      return local_tile(domain_offset(make_coord(int(tc.row_begin), col), mP), make_shape(_128{}, _32{}),
                        make_coord(0, _));
    };
    auto [tGg, tGs] = tma_partition(params.tma_pre, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sP),
                                    group_modes<0, 2>(chunk_tiles(col_base)));
    auto [tUg, tUs] = tma_partition(params.tma_pre, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sP),
                                    group_modes<0, 2>(chunk_tiles(col_base + params.n)));
    for (int c = 0; c < chunks; ++c, ++count) {
      const uint32_t slot = count % PreRing<Cfg>::kSlots;
      cutlass::arch::ClusterBarrier::wait(&ring.empty[slot], ((count / PreRing<Cfg>::kSlots) & 1) ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ring.full[slot], chunk_bytes);
      copy(params.tma_pre.with(desc, ring.full[slot]), tGg(_, c), tGs(_, 2 * slot));
      if (gated) copy(params.tma_pre.with(desc, ring.full[slot]), tUg(_, c), tUs(_, 2 * slot + 1));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumThreads, 1)
    grouped_gemm_kernel(CUTE_GRID_CONSTANT Params<Cfg> const params) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Pipeline = typename Cfg::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<Cfg>*>(smem_raw);
  // kPreRing: the pre-activation ring after SharedStorage (1024-B aligned: sizeof(SharedStorage)
  // is a multiple of its alignment).
  auto* ring = reinterpret_cast<PreRing<Cfg>*>(smem_raw + sizeof(SharedStorage<Cfg>));
  char* tables_raw = smem_raw + sizeof(SharedStorage<Cfg>) + pre_ring_bytes<Cfg>();
  GroupTables tables{reinterpret_cast<int64_t*>(tables_raw),
                     reinterpret_cast<int*>(tables_raw +
                                            sizeof(int64_t) * (params.num_groups + 1))};

  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warpgroup_idx = cutlass::canonical_warp_group_idx();
  const int lane_predicate = cute::elect_one_sync();

  if (warp_idx == 0 && lane_predicate) {
    cute::prefetch_tma_descriptor(params.tma_b.get_tma_descriptor());
  }

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Cfg::kStageBytes;
  pipeline_params.role = warpgroup_idx == 0 ? Pipeline::ThreadCategory::Producer
                                            : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = (threadIdx.x == 0);
  pipeline_params.num_consumers = 128 * Cfg::kNumConsumerWarpgroups;
  Pipeline pipeline(smem.pipeline, pipeline_params, Shape<_1, _1, _1>{});
  if constexpr (Cfg::kPreRing) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < PreRing<Cfg>::kSlots; ++s) {
        cutlass::arch::ClusterTransactionBarrier::init(&ring->full[s], 1);
        cutlass::arch::ClusterBarrier::init(&ring->empty[s], kNumConsumerWarps);
      }
      cutlass::arch::fence_barrier_init();
    }
  }

  build_group_tables<Cfg::kBlockM>(tables, params.row_offsets, params.num_groups,
                                   params.n_tiles);  // contains __syncthreads
  const int total_tiles = tables.tile_prefix[params.num_groups];
  const int64_t rows_total64 = tables.row_offsets[params.num_groups];
  const int rows_total = int(rows_total64 > 0 ? rows_total64 : 1);

  if (warpgroup_idx == 0) {
    // ---------------- producer warpgroup: one warp issues every TMA ----------------
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
    if (warp_idx == 0 && total_tiles > blockIdx.x) {
      // Publish this CTA's A descriptor with the real row extent.
      cute::TmaDescriptor* tensormap_a = params.tensormap_workspace + blockIdx.x;
      publish_tma_descriptor(params.tma_a, Cfg::make_gmem_a(params.a, rows_total, params.k), smem.tensormap_a,
                             tensormap_a);

      // NOTE: thread 0 is the pipeline's leader (arrive_and_expect_tx) and issues every TMA.
      if (threadIdx.x == 0) {
        auto write_state = cutlass::make_producer_start_state<Pipeline>();
        for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
          const TileCoord tc = decode_tile<Cfg::kBlockM>(tables, params.num_groups, tile);
          produce_tile(params, smem, pipeline, write_state, tensormap_a, rows_total, tc);
        }
      }
    }
    if constexpr (Cfg::kPreRing) {
      if (warp_idx == 1 && total_tiles > blockIdx.x)
        produce_pre_ring<Cfg>(params, tables, *ring, rows_total, total_tiles);
    }
  } else {
    // ---------------- consumer warpgroups: wgmma mainloop + epilogue ----------------
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
    const int consumer_thread = int(threadIdx.x) - 128;
    typename Cfg::TiledMma tiled_mma;
    Tensor accum = partition_fragment_C(
        tiled_mma, make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}));
    typename Cfg::PipelineState read_state;
    uint32_t ring_count = 0;  // kPreRing: chunks taken from the ring so far
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
      const TileCoord tc = decode_tile<Cfg::kBlockM>(tables, params.num_groups, tile);
      if constexpr (Cfg::kOperands == Operands::kDgrad)
        if (is_activation_backward(params.epilogue))
          prefetch_activation_input<Cfg>(tile_store_of(params), tc, consumer_thread);
      consume_tile<Cfg>(smem, pipeline, read_state, params.k_tiles, consumer_thread, accum);
      store_tile(params, tc, consumer_thread, accum,
                 smem.staging[consumer_thread / 32], ring, &ring_count);
    }
  }
#elif defined(__CUDA_ARCH__)
  // Built for a target without wgmma/setmaxnreg (not sm_90a): fail loudly, never silently.
  if (threadIdx.x == 0 && blockIdx.x == 0)
    printf("fusedmoe grouped_gemm: kernel not compiled for sm_90a (build with "
           "-gencode=arch=compute_90a,code=sm_90a)\n");
  __trap();
#endif
}

}  // namespace fusedmoe::cuda::sm90
