// fusedmoe — Hopper (sm_90a) grouped weight-gradient GEMM ("wgrad", varying K): device pieces.
//
// For every group g with rows [row_offsets[g], row_offsets[g+1]):
//   C_g[m, n] = sum over rows r of g of A[r, m] * B[r, n]      (C_g = A_gᵀ · B_g)
// A [rows, M] and B [rows, N] are row-major, so both wgmma operands are MN-major (M resp. N
// contiguous) and the reduction dimension K is the group's row range, of a different length per
// group. Built from the same pieces as the forward engine (grouped_gemm_sm90.cuh):
// Config<ElementAB, false, Operands::kWgrad> (MN-major SW128 shared-memory layouts for both
// operands, wgmma with both transpose bits), the same PipelineTmaAsync producer/consumer
// pipeline, the same 128 x 256 x 64 tile and the same epilogue (store_tile).
//
// Scheduler (persistent, static): tiles are (group, m_tile, n_tile), group-major, with the tile
// index along the smaller of M and N running fastest (n_fastest when M > N): the tiles resident
// at one time then sweep the smaller operand of the group (A_g is rows x M, B_g rows x N) and
// share a few blocks of the larger one, so both stay in L2. With m fastest on mixtral's dW2
// (M = 14336, N = 4096) every wave re-read all of A_g from DRAM (2.2 TB/s, 582 TFLOP/s, against
// 727 for dW1 of the same FLOPs). Every group has m_tiles * n_tiles tiles, also empty groups (their tiles store zeros,
// or add zeros when accumulating). CTA b takes tiles b, b + grid, ... . Row offsets are copied
// from the DEVICE array into shared memory at kernel start (no host synchronisation; graph
// capturable).
//
// Ragged K: a group with `rows` rows has k_tiles = ceil(rows / 64) k tiles. Tile j < k_tiles-1
// loads rows [row_begin + 64 j, +64); the last one loads [row_end - 64, row_end), i.e. it is
// shifted back so that it never reads past the group's end (and therefore never past
// row_offsets[num_groups]; rows before row 0 are TMA out-of-bounds zeros). Its first
// mask_rows = 64 * k_tiles - rows rows belong to the previous k tile or the previous group and
// are zeroed in shared memory (A and B) by warps 1-3 of the producer warpgroup (extra consumers
// of the pipeline that wait for every stage and release it), which zero, fence.proxy.async and
// bar.arrive on a named
// barrier that the consumers bar.sync on before their wgmmas read the stage. (Zeroing in the
// consumers themselves made them spill: their 168 registers hold the 128 accumulators.)
#pragma once

#include "grouped_gemm_sm90.cuh"

namespace fusedmoe::cuda::sm90 {

// TMA-store epilogue (16-bit C of the operands' type, no accumulation): the consumers write
// the tile's accumulators, converted, into SharedStorage::output_tile (128 x 256, four 64-column
// blocks of 128 rows x 128 B, 128-B swizzle: the K-major SW128 atom of GMMA, so a warp's 4-B
// stores of one accumulator register hit 32 different banks), and one thread hands the tile to
// the TMA unit (cp.async.bulk.tensor store, bounds-clipped per group by a 3-D view (m, n,
// groups)). The consumers go straight on to the next tile's wgmmas while the store drains: with
// few k steps per tile (~512 rows per expert) a synchronous epilogue, in step on every SM, left
// the tensor cores idle for about as long as the mainloop (the whole GPU writing 64 KiB per SM
// at once). Before the buffer is written again its previous store must have been read
// (cp.async.bulk.wait_group.read by the issuing thread, then a consumer barrier).
template <class Cfg>
struct WgradStore {
  using Element = typename Cfg::ElementAB;
  using SmemLayoutC = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}),
                                             Step<_1, _2>{}));
  static_assert(cosize_v<SmemLayoutC> * sizeof(Element) == sizeof(SharedStorage<Cfg>::output_tile));
  // C as (m, n, groups) : (n, 1, m * n).
  static auto make_gmem_c(Element* ptr, int m, int n, int groups) {
    return make_tensor(make_gmem_ptr(ptr), make_shape(m, n, groups),
                       make_stride(int64_t(n), _1{}, int64_t(m) * n));
  }
  static auto make_tma_c(Element* ptr, int m, int n, int groups) {
    return make_tma_copy(SM90_TMA_STORE{}, make_gmem_c(ptr, m, n, groups), SmemLayoutC{},
                         make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}), _1{});
  }
  using TmaC = decltype(make_tma_c(nullptr, 128, 256, 1));
};

template <class Cfg>
struct WgradParams {
  Params<Cfg> base;  // tma_a: A as (m, rows) MN-major; tma_b: B as (n, rows, 1) MN-major;
                     // row_offsets, num_groups; epilogue fields with n = n_out = N, kIdentity
  typename WgradStore<Cfg>::TmaC tma_c;  // the TMA-store epilogue's C (kTmaStore kernels)
  int m;             // M (rows of each C_g)
  int rows_bound;    // extent of the rows dimension in the TMA views (>= row_offsets[G])
  int m_tiles;       // ceil(M / 128)
  int n_tiles;       // ceil(N / 256)
  bool n_fastest;    // M > N: the n tile runs fastest in a group (see the header comment)
};

// Named barrier of the 256 consumer threads around the output tile (ids 0 = __syncthreads,
// kWgradMaskBarrierId.. = the masking barriers).
inline constexpr int kWgradEpilogueBarrierId = 2;

struct WgradTile {
  int group, m_tile, n_tile;
  int row_begin, row_end;  // the group's rows
  int k_tiles;             // ceil(rows / 64)
  int mask_rows;           // rows to zero at the start of the last k tile
};

// Bytes after SharedStorage in dynamic shared memory: the row-offset table.
inline size_t wgrad_table_bytes(int num_groups) { return size_t(num_groups + 1) * sizeof(int64_t); }

// Named barriers kWgradMaskBarrierId + stage (one per pipeline stage) between the masking
// threads and the two consumer warpgroups.
// NOTE: one barrier per stage, not one in all: the masking threads only bar.arrive, so with a
// single barrier they could arrive for the next stage's tile before the consumers had synced on
// the previous one — two arrivals of the same warps in one barrier phase, which desynchronises
// the barrier and hung the kernel when every tile needed masking (~32 rows per group, decode).
// Per stage it cannot happen: fill n + 1 of a stage exists only after the consumers released
// fill n, which they do after their bar.sync on it.
inline constexpr int kWgradMaskBarrierId = 8;

__device__ __forceinline__ WgradTile decode_wgrad_tile(const int64_t* row_offsets, int m_tiles,
                                                       int n_tiles, bool n_fastest,
                                                       int tiles_per_group, int tile) {
  WgradTile t;
  t.group = tile / tiles_per_group;
  const int local = tile - t.group * tiles_per_group;
  t.m_tile = n_fastest ? local / n_tiles : local % m_tiles;
  t.n_tile = n_fastest ? local % n_tiles : local / m_tiles;
  t.row_begin = int(row_offsets[t.group]);
  t.row_end = int(row_offsets[t.group + 1]);
  const int rows = t.row_end > t.row_begin ? t.row_end - t.row_begin : 0;
  t.k_tiles = (rows + 63) / 64;
  t.mask_rows = t.k_tiles * 64 - rows;
  return t;
}

// First row of k tile j of a tile (see the header comment).
__device__ __forceinline__ int wgrad_k_tile_row(WgradTile const& t, int j) {
  return j + 1 < t.k_tiles ? t.row_begin + 64 * j : t.row_end - 64;
}

// ---------------------------------------------------------------------------------------------
// Producer (one thread): TMA loads of one wgrad tile
// ---------------------------------------------------------------------------------------------
template <class Cfg>
__device__ __forceinline__ void produce_wgrad_tile(WgradParams<Cfg> const& params,
                                                   SharedStorage<Cfg>& smem,
                                                   typename Cfg::Pipeline& pipeline,
                                                   typename Cfg::PipelineState& write_state,
                                                   WgradTile const& t) {
  using BlockM = typename Cfg::BlockM;
  using BlockK = typename Cfg::BlockK;
  using HalfN = typename Cfg::HalfN;
  Tensor sA = make_tensor(make_smem_ptr(smem.tensors.a.data()), typename Cfg::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(smem.tensors.b.data()), typename Cfg::SmemLayoutB{});
  Tensor sB_halves = flat_divide(sB, make_shape(HalfN{}, BlockK{}));  // (128,64,2,1,STAGES)
  Tensor mA = params.base.tma_a.get_tma_tensor(make_shape(params.m, params.rows_bound));
  Tensor mB = params.base.tma_b.get_tma_tensor(make_shape(params.base.n, params.rows_bound, 1));
  Tensor mB0 = mB(_, _, 0);
  const int m0 = t.m_tile * Cfg::kBlockM;
  const int n0 = t.n_tile * Cfg::kBlockN;

  for (int j = 0; j < t.k_tiles; ++j) {
    const int row0 = wgrad_k_tile_row(t, j);  // may be negative: TMA fills zeros there
    Tensor gA = local_tile(domain_offset(make_coord(m0, row0), mA),
                           make_shape(BlockM{}, BlockK{}), make_coord(0, _));
    Tensor gB0 = local_tile(domain_offset(make_coord(n0, row0), mB0),
                            make_shape(HalfN{}, BlockK{}), make_coord(0, _));
    Tensor gB1 = local_tile(domain_offset(make_coord(n0 + Cfg::kHalfN, row0), mB0),
                            make_shape(HalfN{}, BlockK{}), make_coord(0, _));
    auto [tAgA, tAsA] = tma_partition(params.base.tma_a, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sA), group_modes<0, 2>(gA));
    auto [tBgB0, tBsB0] =
        tma_partition(params.base.tma_b, Int<0>{}, Layout<_1>{},
                      group_modes<0, 2>(sB_halves(_, _, 0, 0, _)), group_modes<0, 2>(gB0));
    auto [tBgB1, tBsB1] =
        tma_partition(params.base.tma_b, Int<0>{}, Layout<_1>{},
                      group_modes<0, 2>(sB_halves(_, _, 1, 0, _)), group_modes<0, 2>(gB1));
    pipeline.producer_acquire(write_state);
    auto* barrier = pipeline.producer_get_barrier(write_state);
    const int stage = write_state.index();
    copy(params.base.tma_a.with(*barrier), tAgA(_, 0), tAsA(_, stage));
    copy(params.base.tma_b.with(*barrier), tBgB0(_, 0), tBsB0(_, stage));
    copy(params.base.tma_b.with(*barrier), tBgB1(_, 0), tBsB1(_, stage));
    ++write_state;
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers: zero the first mask_rows k rows of one stage (this warpgroup's share)
// ---------------------------------------------------------------------------------------------
// Byte offset of element (mn, k) of one stage in an MN-major SW128 operand tiled K-first
// (Config's SmemLayoutA/B for kWgrad): 64 x 64 blocks of 8 KiB, each 64 x 8 atom = 8 rows of
// 128 B (one k per row), the 16-B chunks of row r XOR-ed with r % 8. Checked against CuTe's
// layout in tests/gpu/gemm/layout_probe.cu.
// NOTE: 8 consecutive mn elements starting at a multiple of 8 form one 16-B chunk (the swizzle
// permutes whole chunks), so each store below is one aligned 16-B vector.
__host__ __device__ __forceinline__ uint32_t mn_sw128_byte_offset(int mn, int k) {
  const uint32_t linear = uint32_t((mn / 64) * 8192 + k * 128 + (mn % 64) * 2);
  return linear ^ (((linear >> 7) & 7u) << 4);
}

// Zeroes the first mask_rows k rows of one stage, A (all 128 M) and B (all 256 N), by the
// 96 masking threads (warps 1-3 of the producer warpgroup, helper = 0..95), then hands the stage
// to the consumers. The stores are generic-proxy writes read next by wgmma (async proxy):
// fence.proxy.async in every writing thread, then bar.arrive on the named barrier that the
// 256 consumer threads bar.sync on (352 threads in all) before their wgmmas.
inline constexpr int kNumMaskThreads = 96;

template <class Cfg>
__device__ __forceinline__ void zero_stage_rows(SharedStorage<Cfg>& smem, int stage,
                                                int mask_rows, int helper) {
  constexpr uint32_t kStageBytesA = Cfg::kBlockM * Cfg::kBlockK * sizeof(typename Cfg::ElementAB);
  constexpr uint32_t kStageBytesB = Cfg::kBlockN * Cfg::kBlockK * sizeof(typename Cfg::ElementAB);
  char* stage_a = reinterpret_cast<char*>(smem.tensors.a.data()) + stage * kStageBytesA;
  char* stage_b = reinterpret_cast<char*>(smem.tensors.b.data()) + stage * kStageBytesB;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = helper; i < 16 * mask_rows; i += kNumMaskThreads)  // A: 16 chunks per k row
    *reinterpret_cast<uint4*>(stage_a + mn_sw128_byte_offset((i % 16) * 8, i / 16)) = zero;
  for (int i = helper; i < 32 * mask_rows; i += kNumMaskThreads)  // B: 32 chunks per k row
    *reinterpret_cast<uint4*>(stage_b + mn_sw128_byte_offset((i % 32) * 8, i / 32)) = zero;
  cutlass::arch::fence_view_async_shared();
  asm volatile("bar.arrive %0, %1;" ::"r"(kWgradMaskBarrierId + stage), "r"(256 + kNumMaskThreads)
               : "memory");
}

// Mainloop of one wgrad tile (256 consumer threads): as consume_tile, plus the masking of the
// last k tile and zero accumulators for empty groups.
template <class Cfg, class Accumulator>
__device__ __forceinline__ void consume_wgrad_tile(SharedStorage<Cfg>& smem,
                                                   typename Cfg::Pipeline& pipeline,
                                                   typename Cfg::PipelineState& read_state,
                                                   WgradTile const& t, int consumer_thread,
                                                   Accumulator& accum) {
  if (t.k_tiles == 0) {
    CUTE_UNROLL
    for (int i = 0; i < size(accum); ++i) accum(i) = 0.0f;
    return;
  }
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
  for (int k_tile = 0; k_tile < t.k_tiles; ++k_tile) {
    pipeline.consumer_wait(read_state);
    const int stage = read_state.index();
    if (k_tile + 1 == t.k_tiles && t.mask_rows > 0)  // wait for the masking threads
      asm volatile("bar.sync %0, %1;" ::"r"(kWgradMaskBarrierId + stage), "r"(256 + kNumMaskThreads)
                   : "memory");
    warpgroup_fence_operand(accum);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
      cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
      tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
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
  pipeline.consumer_release(release_state);
}

// ---------------------------------------------------------------------------------------------
// TMA-store epilogue of one tile (256 consumer threads; see WgradStore)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void wgrad_epilogue_barrier() {
  asm volatile("bar.sync %0, %1;" ::"r"(kWgradEpilogueBarrierId), "r"(256) : "memory");
}

// Byte offset of element (row, col) of the output tile in SmemLayoutC (128-B rows of 64
// columns, 16-B chunks XOR-ed with row % 8, 64-column blocks of 16 KiB; checked against CuTe's
// layout in tests/gpu/gemm/layout_probe.cu).
__host__ __device__ __forceinline__ uint32_t output_tile_byte_offset(int row, int col) {
  return uint32_t((col / 64) * 16384 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2);
}

template <class Cfg, class Accumulator>
__device__ __forceinline__ void store_wgrad_tile_tma(WgradParams<Cfg> const& params,
                                                     SharedStorage<Cfg>& smem, WgradTile const& t,
                                                     int consumer_thread, Accumulator const& accum) {
  using Store = WgradStore<Cfg>;
  using Element = typename Store::Element;
  using Native = std::conditional_t<std::is_same_v<Element, cute::bfloat16_t>, __nv_bfloat16, __half>;
  // The previous tile's store has read the buffer.
  if (consumer_thread == 0) tma_store_wait<0>();
  wgrad_epilogue_barrier();
  // Accumulator register i of consumer thread ct (wgmma 64 x 256 per warpgroup, see
  // store_tile_typed): row 16 * (ct / 32) + lane / 4 + 8 * ((i / 2) % 2), column
  // 8 * (i / 4) + 2 * (lane % 4) + i % 2. Registers i, i + 1 (i even) are one 4-B store; the
  // row's swizzle phase row % 8 = lane / 4 is the same for all of a thread's registers.
  const int lane = consumer_thread % 32;
  char* tile = smem.output_tile;
  const int row0 = 16 * (consumer_thread / 32) + lane / 4;
  CUTE_UNROLL
  for (int i = 0; i < size(accum); i += 2) {
    const int row = row0 + 8 * ((i / 2) % 2);
    const int col = 8 * (i / 4) + 2 * (lane % 4);
    epilogue_math::store_pair(reinterpret_cast<Native*>(tile + output_tile_byte_offset(row, col)),
                              accum(i), accum(i + 1));
  }
  tma_store_fence();  // generic-proxy writes -> visible to the TMA unit
  wgrad_epilogue_barrier();
  if (consumer_thread == 0) {
    Tensor sC = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(tile)),
                            typename Store::SmemLayoutC{});
    Tensor mC = params.tma_c.get_tma_tensor(make_shape(params.m, params.base.n, params.base.num_groups));
    Tensor gC = local_tile(mC(_, _, t.group),
                           make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}),
                           make_coord(t.m_tile, t.n_tile));
    auto thr_tma = params.tma_c.get_slice(Int<0>{});
    copy(params.tma_c, thr_tma.partition_S(sC), thr_tma.partition_D(gC));
    tma_store_arrive();
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
// kTmaStore: the TMA-store epilogue (launch_wgrad picks it), else store_tile's (a template argument,
// not a runtime branch: both epilogues in one body cost the consumers spills).
template <class Cfg, bool kTmaStore>
__global__ void __launch_bounds__(Cfg::kNumThreads, 1)
    grouped_wgrad_kernel(CUTE_GRID_CONSTANT WgradParams<Cfg> const params) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(Cfg::kOperands == Operands::kWgrad && !Cfg::kGated);
  static_assert(kWgradMaskBarrierId + Cfg::kStages <= 16, "one named barrier per stage");
  using Pipeline = typename Cfg::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<Cfg>*>(smem_raw);
  int64_t* row_offsets = reinterpret_cast<int64_t*>(smem_raw + sizeof(SharedStorage<Cfg>));

  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warpgroup_idx = cutlass::canonical_warp_group_idx();
  if (warp_idx == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(params.base.tma_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.base.tma_b.get_tma_descriptor());
  }

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Cfg::kStageBytes;
  pipeline_params.role = warpgroup_idx == 0 ? Pipeline::ThreadCategory::Producer
                                            : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = (threadIdx.x == 0);
  // NOTE: the masking threads are consumers of the pipeline too (they wait on every stage's
  // full barrier and release every stage, in order), so that they can neither run ahead of the
  // fill they mean (an mbarrier parity wait cannot tell fill i from fill i - 2) nor be lapped.
  // With a cluster of 1 the empty barriers count one arrival per consumer thread.
  pipeline_params.num_consumers = 128 * Cfg::kNumConsumerWarpgroups + kNumMaskThreads;
  Pipeline pipeline(smem.pipeline, pipeline_params, Shape<_1, _1, _1>{});

  const int num_groups = params.base.num_groups;
  for (int g = threadIdx.x; g <= num_groups; g += blockDim.x)
    row_offsets[g] = params.base.row_offsets[g];
  __syncthreads();  // also publishes the pipeline's barrier initialisation
  const int tiles_per_group = params.m_tiles * params.n_tiles;
  const int total_tiles = num_groups * tiles_per_group;

  if (warpgroup_idx == 0) {
    // ---------------- producer: thread 0 (the pipeline's leader) issues every TMA ----------
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
    if (threadIdx.x == 0) {
      auto write_state = cutlass::make_producer_start_state<Pipeline>();
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const WgradTile t = decode_wgrad_tile(row_offsets, params.m_tiles, params.n_tiles, params.n_fastest,
                                                      tiles_per_group, tile);
        produce_wgrad_tile(params, smem, pipeline, write_state, t);
      }
    } else if (warp_idx >= 1) {
      // Masking threads: follow the consumers' pipeline state; for each tile whose last k tile
      // overlaps rows outside the group, wait for that stage's TMA, zero those rows.
      typename Cfg::PipelineState state;
      const int helper = int(threadIdx.x) - 32;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const WgradTile t = decode_wgrad_tile(row_offsets, params.m_tiles, params.n_tiles, params.n_fastest,
                                                      tiles_per_group, tile);
        for (int j = 0; j < t.k_tiles; ++j) {
          pipeline.consumer_wait(state);
          if (j + 1 == t.k_tiles && t.mask_rows > 0)
            zero_stage_rows<Cfg>(smem, state.index(), t.mask_rows, helper);
          pipeline.consumer_release(state);
          ++state;
        }
      }
    }
  } else {
    // ---------------- consumers: wgmma mainloop + epilogue ----------------
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
    const int consumer_thread = int(threadIdx.x) - 128;
    typename Cfg::TiledMma tiled_mma;
    Tensor accum = partition_fragment_C(
        tiled_mma, make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}));
    typename Cfg::PipelineState read_state;
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
      const WgradTile t = decode_wgrad_tile(row_offsets, params.m_tiles, params.n_tiles, params.n_fastest,
                                                      tiles_per_group, tile);
      consume_wgrad_tile<Cfg>(smem, pipeline, read_state, t, consumer_thread, accum);
      if constexpr (kTmaStore) {
        store_wgrad_tile_tma(params, smem, t, consumer_thread, accum);
        continue;
      }
      // C_g is rows [g*M, (g+1)*M) of one [G*M, N] row-major matrix.
      TileCoord tc;
      tc.group = t.group;
      tc.m_tile = t.m_tile;
      tc.n_tile = t.n_tile;
      tc.row_begin = int64_t(t.group) * params.m + int64_t(t.m_tile) * Cfg::kBlockM;
      tc.row_end = int64_t(t.group + 1) * params.m;
      store_tile(params.base, tc, consumer_thread, accum, smem.staging[consumer_thread / 32]);
    }
    // The last tile's store complete (not only read) before the block exits.
    if (kTmaStore && consumer_thread == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
#elif defined(__CUDA_ARCH__)
  if (threadIdx.x == 0 && blockIdx.x == 0)
    printf("fusedmoe grouped_gemm_wgrad: kernel not compiled for sm_90a (build with "
           "-gencode=arch=compute_90a,code=sm_90a)\n");
  __trap();
#endif
}

}  // namespace fusedmoe::cuda::sm90
