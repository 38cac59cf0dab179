// src/cuda/fused/fused_sm90.cuh — the Hopper engine of the persistent kernel: the expert phase
// (P3) on the wgmma/TMA tile functions of src/cuda/gemm/grouped_gemm_sm90.cuh, for bf16/fp16.
//
// Block: 384 threads. Warpgroups 0-1 are the consumers (wgmma mainloop + epilogue, 232
// registers each via setmaxnreg) and also run P1 and P2 of fused_kernel.cuh (threads 0-255,
// named barrier 1); P4 runs on all three warpgroups. Warpgroup 2 is the producer (40 registers
// in the expert phase); one thread of it is the block's
// scheduler: it claims segments and queue slots (next_step, fused_kernel.cuh), hands each task
// to the consumers through a two-slot ring in shared memory (mbarriers full/empty), then issues
// the task's TMA loads into the 4-stage pipeline (PipelineTmaAsync). So the scheduler looks for
// the next task and prefetches its first stages while the consumers compute the current one,
// and no block-wide barrier separates two tasks. Another thread of warpgroup 2, the finisher,
// takes each completed task from consumer thread 0 through a second two-slot ring and runs its
// finish_task (fences and counter atomics), so the consumers do not wait for those.
//
// Tiles (the Hopper engine's 128 x 256 x 64):
//   GEMM0 plain: A = the rank's recv_rows, B = w1[e] columns [256 n, 256 n + 256), activation
//                in the epilogue, stored into hidden;
//   GEMM0 gated: B halves at gate columns [128 n, +128) and up columns I + [128 n, +128): the
//                gating is register arithmetic (see grouped_gemm_sm90.cuh), 128 outputs;
//   GEMM1:       A = hidden, B = w2[e] columns [256 n, +256), rows stored through recv_meta
//                straight into the source's ret_rows.
// A is read through a 3-D TMA view (rows, K, heap) over the W heaps (emulated ranks); a tile
// that runs past its segment reads rows of the next segment (never stored: the epilogue
// predicates rows on the segment's end) or TMA's zero fill past the last row of the heap.
//
// Cross-proxy ordering: rows written with generic stores (dispatch, GEMM0 epilogue) are read by
// TMA (async proxy) in another block. Writers execute fence.proxy.async before the release that
// publishes them; the scheduler executes it after the acquire that made the task visible and
// before issuing the task's TMA loads.
//
// Waits: the ring and pipeline waits depend only on this block's own threads, which never wait
// on anything else between two ring handoffs, except the scheduler's bounded waits of
// next_step (the finisher waits only for the consumers, and finish_task does not wait). So the
// argument of fused_kernel.cuh (no cycle of waits) is unchanged. All of them
// are bounded too (Ctx::wait_local: globaltimer, abort word), so a bug here reports an error
// rather than hanging. Register reallocation (setmaxnreg.inc) also blocks; the producers take
// their registers back only after the consumers returned theirs (registers_returned_sync).
#pragma once

#include "cuda/fused/fused_kernel.cuh"
#include "cuda/fused/fused_options.hpp"
#include "grouped_gemm_sm90.cuh"

namespace fusedmoe::cuda::fused {

template <class T>
struct CuteElement;
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cute::bfloat16_t;
  static constexpr ElementType kType = ElementType::kBF16;
};
template <>
struct CuteElement<__half> {
  using type = cute::half_t;
  static constexpr ElementType kType = ElementType::kF16;
};

template <class T>
struct Sm90Tiles {
  using Element = typename CuteElement<T>::type;
  using Plain = sm90::Config<Element, false>;
  using Gated = sm90::Config<Element, true>;
  using Pipeline = typename Plain::Pipeline;
  static constexpr int kThreads = Plain::kNumThreads;  // 384
  static constexpr int kSchedulerThread = 256;         // first thread of warpgroup 2
  static constexpr int kFinisherThread = 288;          // first thread of warpgroup 2's second warp

  // (rows, k, heap) over W heaps, k contiguous; rows of one heap have stride k.
  static auto make_a(const Element* base, int rows, int k, int heaps, int64_t heap_elements) {
    using namespace cute;
    auto g = make_tensor(make_gmem_ptr(base), make_shape(rows, k, heaps),
                         make_stride(int64_t(k), _1{}, heap_elements));
    return make_tma_copy(SM90_TMA_LOAD{}, g, typename Plain::SmemLayoutA{}(_, _, 0),
                         make_shape(typename Plain::BlockM{}, typename Plain::BlockK{}), _1{});
  }
  using TmaA = decltype(make_a(nullptr, 128, 64, 1, 0));
  using TmaB = typename Plain::TmaB;
  // GEMM0's output by TMA stores of 16 x 32 chunks (sm90::store_tile_tma_fixed): (rows, width,
  // heap) over W heaps, width contiguous.
  static auto make_store(Element* base, int rows, int width, int heaps, int64_t heap_elements) {
    using namespace cute;
    auto g = make_tensor(make_gmem_ptr(base), make_shape(rows, width, heaps),
                         make_stride(int64_t(width), _1{}, heap_elements));
    return make_tma_copy(SM90_TMA_STORE{}, g, typename Plain::SmemLayoutChunk{}, make_shape(_16{}, _32{}), _1{});
  }
  using TmaStore = decltype(make_store(nullptr, 16, 32, 1, 0));
};

// The TMA descriptors of one launch (a second __grid_constant__ kernel parameter).
template <class T>
struct Sm90Tma {
  typename Sm90Tiles<T>::TmaA a0;  // recv_rows (rows_cap, H, ranks of the grid)
  typename Sm90Tiles<T>::TmaA a1;  // hidden    (rows_cap, I, ranks of the grid)
  typename Sm90Tiles<T>::TmaB b0;  // w1 as (N1, H, E)
  typename Sm90Tiles<T>::TmaB b1;  // w2 as (H, I, E)
  // Shared experts (null descriptors without them).
  typename Sm90Tiles<T>::TmaA ax;   // x (all of the grid's tokens, H, 1)
  typename Sm90Tiles<T>::TmaA as;   // shared_hidden (grid ranks x S x rows_cap, Is, 1)
  typename Sm90Tiles<T>::TmaB bs0;  // shared_w1 as (Ns1, H, S)
  typename Sm90Tiles<T>::TmaB bs1;  // shared_w2 as (H, Is, S)
  typename Sm90Tiles<T>::TmaStore h0;  // hidden as GEMM0's output (rows_cap, I, ranks of the grid)
  typename Sm90Tiles<T>::TmaStore hs;  // shared_hidden as GEMM0's output (shared_rows, Is, 1)
  int x_rows;                      // rows of x
  int shared_rows;                 // rows of shared_hidden
  int rows_cap;                    // rows of recv_rows / hidden in one heap
  Epilogue act;              // GEMM0's activation
};

template <class T>
struct Sm90Smem {
  sm90::SharedStorage<typename Sm90Tiles<T>::Plain> gemm;  // 1024-B aligned: at offset 0
  alignas(8) uint64_t full[2];
  alignas(8) uint64_t empty[2];
  Task task[2];
  int32_t step[2];
  bool ring_ok;  // consumer thread 0's ring wait succeeded (read by all consumers)
  // Finished tasks, consumer thread 0 -> the finisher thread (a second two-slot ring).
  alignas(8) uint64_t done_full[2];
  alignas(8) uint64_t done_empty[2];
  Task done[2];  // seg < 0: the consumers have left the phase
};

// Registers per thread of the 384-thread kernel outside the expert phase (restored at its end:
// P4 runs on the consumer threads, and code after the phase must not be held to the producer's
// 40 registers).
constexpr int kEvenRegisters = 168;

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 2, 256;" ::: "memory");
}
// All 384 threads, once per launch at the end of the expert phase (see expert_phase).
__device__ __forceinline__ void registers_returned_sync() {
  asm volatile("bar.sync 3, 384;" ::: "memory");
}

// Pipeline waits of the persistent kernel's tiles: bounded, and given up on the launch's abort
// (the tile then goes on with whatever the stage holds; the launch reports the error).
template <class T, bool G>
struct BoundedWait {
  const Ctx<T, G>& ctx;
  template <class Pipeline, class State>
  __device__ __forceinline__ void acquire(Pipeline& pipeline, State const& state) const {
    ctx.wait_local([&] { return pipeline.producer_try_acquire(state).get() == cutlass::BarrierStatus::WaitDone; },
                   kPipelineStage, 1, state.phase());
    pipeline.producer_acquire(state, {cutlass::BarrierStatus::WaitDone});  // arrive + expect_tx
  }
  template <class Pipeline, class State>
  __device__ __forceinline__ void wait(Pipeline& pipeline, State const& state) const {
    ctx.wait_local([&] { return pipeline.consumer_try_wait(state).get() == cutlass::BarrierStatus::WaitDone; },
                   kPipelineStage, 0, state.phase());
  }
};

// Planted faults (FusedOptions::stall): the thread idles until the launch aborts (a wait it
// starves records the timeout and raises the abort word).
template <class T, bool G>
__device__ void stall_until_abort(const Ctx<T, G>& ctx) {
  while (!ctx.aborted()) __nanosleep(1000);
}

template <class T>
struct Sm90Engine {
  const Sm90Tma<T>& tma;

  static constexpr size_t smem_bytes() {
    return sizeof(Sm90Smem<T>) > sizeof(SharedUnion<T>) ? sizeof(Sm90Smem<T>) : sizeof(SharedUnion<T>);
  }

  // The scheduler thread: TMA loads of one task into the pipeline.
  template <bool G>
  __device__ void produce(const Ctx<T, G>& ctx, Sm90Smem<T>& s, typename Sm90Tiles<T>::Pipeline& pipeline,
                          typename Sm90Tiles<T>::Plain::PipelineState& write_state, const Task& task) const {
    using namespace cute;
    using Cfg = typename Sm90Tiles<T>::Plain;
    const Params<T>& p = ctx.p;
    const TaskView v = view_of(ctx, task);
    // Routed tasks: A is the rank's recv_rows (GEMM0) or hidden (GEMM1) through a 3-D view over
    // the grid's heaps, B is w1 / w2 of E = weight_experts experts. Shared-expert tasks: A is the
    // rank's tokens of x or its block of shared_hidden (one-heap views), B is shared_w1 / w2.
    const bool sh = v.shared;
    const int H = static_cast<int>(p.hidden);
    const int I = static_cast<int>(sh ? p.shared_ffn : p.ffn), N1 = static_cast<int>(sh ? p.shared_in : p.ffn_in);
    const int experts = sh ? p.num_shared : p.weight_experts;
    const int k = v.gemm1 ? I : H;
    auto const& tma_a = v.gemm1 ? (sh ? tma.as : tma.a1) : (sh ? tma.ax : tma.a0);
    auto const& tma_b = v.gemm1 ? (sh ? tma.bs1 : tma.b1) : (sh ? tma.bs0 : tma.b0);
    // A rows: (rows of one heap, heaps, this task's heap, first row).
    const int a_rows = sh ? (v.gemm1 ? tma.shared_rows : tma.x_rows) : tma.rows_cap;
    const int a_heaps = sh ? 1 : p.grid_ranks, a_heap = sh ? 0 : ctx.rank - p.rank_base;
    const int64_t row0 = !sh ? task.row_begin
                         : v.gemm1 ? (static_cast<int64_t>(ctx.rank - p.rank_base) * p.num_shared + v.expert) *
                                             p.shared_rows_cap + task.row_begin
                                   : p.rank_begin[ctx.rank] + task.row_begin;
    Tensor mA = tma_a.get_tma_tensor(make_shape(a_rows, k, a_heaps))(_, _, a_heap);
    auto a_tiles = local_tile(domain_offset(make_coord(row0, 0), mA),
                              make_shape(typename Cfg::BlockM{}, typename Cfg::BlockK{}), make_coord(0, _));
    // B: two column halves of one expert (GEMM0 gated: gate columns and the same up columns).
    Tensor mB = tma_b.get_tma_tensor(v.gemm1 ? make_shape(H, I, experts) : make_shape(N1, H, experts));
    const int col0 = !v.gemm1 && p.gated ? v.n_tile * Sm90Tiles<T>::Gated::kOutBlockN : v.n_tile * Cfg::kOutBlockN;
    const int col1 = !v.gemm1 && p.gated ? I + col0 : col0 + Cfg::kHalfN;
    sm90::produce_k_tiles<Cfg>(s.gemm, pipeline, write_state, tma_a, nullptr, a_tiles, tma_b,
                               sm90::b_half_tiles<Cfg>(mB, v.expert, col0), sm90::b_half_tiles<Cfg>(mB, v.expert, col1),
                               (k + Cfg::kBlockK - 1) / Cfg::kBlockK, BoundedWait<T, G>{ctx});
  }

  // Consumers: mainloop and epilogue of one task.
  template <class Accumulator, bool G>
  __device__ __forceinline__ void compute(const Ctx<T, G>& ctx, Sm90Smem<T>& s, typename Sm90Tiles<T>::Pipeline& pipeline,
                          typename Sm90Tiles<T>::Plain::PipelineState& read_state, Accumulator& accum,
                          const Task& task) const {
    using Cfg = typename Sm90Tiles<T>::Plain;
    const Params<T>& p = ctx.p;
    const TaskView v = view_of(ctx, task);
    const int64_t H = p.hidden, I = v.shared ? p.shared_ffn : p.ffn, N1 = v.shared ? p.shared_in : p.ffn_in;
    const int k = static_cast<int>(v.gemm1 ? I : H);
    sm90::consume_tile<Cfg>(s.gemm, pipeline, read_state, (k + Cfg::kBlockK - 1) / Cfg::kBlockK,
                            static_cast<int>(threadIdx.x), accum, BoundedWait<T, G>{ctx});
    unsigned char* h = ctx.heap(ctx.rank);
    sm90::TileCoord tc{0, v.m_tile, v.n_tile, task.row_begin, task.row_end};
    char* staging = s.gemm.staging[threadIdx.x / 32];
    constexpr ElementType kType = CuteElement<T>::kType;
    // Routed tasks: GEMM0 into hidden, GEMM1 rows through recv_meta into the source's ret_rows.
    // Shared expert tasks: GEMM0 into shared_hidden, GEMM1 into shared_out in token order. One
    // store call site per tile kind (more inlined epilogues make ptxas serialise the wgmmas).
    const int64_t e = v.expert;
    if (!v.gemm1) {
      // By TMA stores into the rank's heap (routed: hidden; shared: its block of shared_hidden),
      // segments padded to 16 rows (store_tile_tma_fixed).
      const T* bias = v.shared ? p.shared_b1 : p.b1;
      const int64_t row_base =
          v.shared ? (static_cast<int64_t>(ctx.rank - p.rank_base) * p.num_shared + v.expert) * p.shared_rows_cap : 0;
      const int rows = v.shared ? tma.shared_rows : tma.rows_cap;
      const int heaps = v.shared ? 1 : p.grid_ranks, heap = v.shared ? 0 : ctx.rank - p.rank_base;
      auto const& store = v.shared ? tma.hs : tma.h0;
      if (p.gated)
        sm90::store_tile_tma_typed<typename Sm90Tiles<T>::Gated, T>(tma.act, store, rows, heaps, heap, row_base,
                                                                     bias ? bias + e * N1 : nullptr, I, tc,
                                                                     threadIdx.x, accum, staging);
      else
        sm90::store_tile_tma_typed<Cfg, T>(tma.act, store, rows, heaps, heap, row_base,
                                           bias ? bias + e * N1 : nullptr, I, tc, threadIdx.x, accum, staging);
    } else {
      // A remote source's rows (GIN) go to out_ret in segment order, like shared rows in order.
      const bool staged = !v.shared && ctx.remote(v.source);
      T* out = v.shared ? ctx.shared_out(v.expert)
                        : reinterpret_cast<T*>(staged ? h + p.layout.out_ret.offset
                                                      : ctx.heap(v.source) + p.layout.ret_rows.offset);
      const T* bias = v.shared ? p.shared_b2 : p.b2;
      const int32_t* row_index =
          v.shared || staged ? nullptr : reinterpret_cast<const int32_t*>(h + p.layout.recv_meta.offset);
      const sm90::TileStore st{Epilogue::kIdentity, kType, out, nullptr, nullptr, bias ? bias + e * H : nullptr,
                               row_index, H, H, false};
      sm90::store_tile_typed<Cfg, T>(st, tc, threadIdx.x, accum, staging);
    }
  }

  // At the start of the launch, before any other shared-memory traffic: one thread initialises
  // every mbarrier of the expert phase and fences its own initialisation (fence.mbarrier_init by
  // threads that initialised nothing orders nothing) — the stage pipeline's, what
  // PipelineTmaAsync's constructor would set up for one producer and 256 consumer threads in a
  // one-CTA cluster, and the task ring's. They lie past the bytes that P1, P2 and P4 use
  // (static_assert below), so the __syncthreads() after routing orders the initialisation before
  // every use. (Initialised at the start of the expert phase instead, after P1 and P2 had run
  // their named barriers on threads 0-255 only, compute-sanitizer racecheck reported the
  // scheduler thread's first arrive as a hazard against the initialisation.)
  __device__ void init_barriers(unsigned char* smem_raw) const {
    using Cfg = typename Sm90Tiles<T>::Plain;
    using Barrier = cutlass::arch::ClusterBarrier;
    static_assert(sizeof(SharedUnion<T>) <= sizeof(typename sm90::SharedStorage<Cfg>::Tensors),
                  "P1/P2/P4 shared memory must not reach the expert phase's mbarriers");
    auto& s = *reinterpret_cast<Sm90Smem<T>*>(smem_raw);
    if (threadIdx.x == 0) {
      for (int i = 0; i < Cfg::kStages; ++i) {
        s.gemm.pipeline.full_barrier_[i].init(1);
        s.gemm.pipeline.empty_barrier_[i].init(256);
      }
      for (int i = 0; i < 2; ++i) {
        Barrier::init(&s.full[i], 1);
        Barrier::init(&s.empty[i], 256);  // every consumer thread: an arrive releases only its own reads
        Barrier::init(&s.done_full[i], 1);
        Barrier::init(&s.done_empty[i], 1);
      }
      cutlass::arch::fence_barrier_init();
    }
  }

  // The router's logits pipelines (fused_kernel.cuh): 64-wide k steps, 4 stages of a 128-column
  // tile, or 128-wide k steps and 3 stages of a 64-column tile when the layer has at most 64
  // experts.
  using RouterPipe = RouterPipeSmem<T, 64, 4>;
  using RouterPipeNarrow = RouterPipeSmem<T, 128, 3, 64>;  // at most 64 experts
  static_assert(sizeof(RouterPipe) <= sizeof(typename sm90::SharedStorage<typename Sm90Tiles<T>::Plain>::Tensors) &&
                    sizeof(RouterPipeNarrow) <= sizeof(typename sm90::SharedStorage<typename Sm90Tiles<T>::Plain>::Tensors),
                "the router's buffers must not reach the expert phase's mbarriers");

  // P1 on the consumer warpgroups with the portable router (the producer warpgroup waits).
  template <bool G>
  __device__ void router_phase(const Ctx<T, G>& ctx, unsigned char* smem_raw) const {
    if (threadIdx.x >= kThreads) return;
    auto& sm = *reinterpret_cast<SharedUnion<T>*>(smem_raw);
    if (ctx.p.num_experts <= RouterPipeNarrow::kN) fusedmoe::cuda::fused::router_phase<RouterPipeNarrow>(ctx, sm);
    else fusedmoe::cuda::fused::router_phase<RouterPipe>(ctx, sm);
  }

  // The finisher thread (warpgroup 2): finish_task of every task the consumers completed — the
  // fence and the counter atomics that release GEMM1 tasks and return flags — so that the
  // consumers go on to their next task instead of waiting for those round trips to L2.
  // Ordering: the consumers' stores, their fence.proxy.async and the barrier among them precede
  // consumer thread 0's arrive on done_full (release, CTA scope), which the finisher's wait
  // acquires before finish_task's gpu/system-scope fence and atomics.
  template <bool G>
  __device__ void finisher(const Ctx<T, G>& ctx, Sm90Smem<T>& s) const {
    using Barrier = cutlass::arch::ClusterBarrier;
    int slot = 0;
    uint32_t phase = 0;
    for (;;) {
      if (!ctx.wait_local([&] { return Barrier::try_wait(&s.done_full[slot], phase); }, kTaskRing, 2 + slot, phase))
        return;
      const Task task = s.done[slot];
      Barrier::arrive(&s.done_empty[slot]);
      if (++slot == 2) { slot = 0; phase ^= 1u; }
      if (task.seg < 0) return;
      finish_task(ctx, task);
    }
  }

  template <bool G>
  __device__ __forceinline__ void expert_phase(const Ctx<T, G>& ctx, unsigned char* smem_raw) const {
    using Tiles = Sm90Tiles<T>;
    using Cfg = typename Tiles::Plain;
    using Pipeline = typename Tiles::Pipeline;
    using Barrier = cutlass::arch::ClusterBarrier;
    auto& s = *reinterpret_cast<Sm90Smem<T>*>(smem_raw);
    const int warpgroup = static_cast<int>(threadIdx.x) / 128;

    typename Pipeline::Params pipeline_params;
    pipeline_params.transaction_bytes = Cfg::kStageBytes;
    pipeline_params.role = warpgroup == 2 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pipeline_params.is_leader = threadIdx.x == Tiles::kSchedulerThread;
    pipeline_params.num_consumers = 256;
    // The mbarriers were initialised at the start of the launch (init_barriers); the barriers
    // of P1 and P2 since order that before any use here.
    Pipeline pipeline(s.gemm.pipeline, pipeline_params, cute::Shape<cute::_1, cute::_1, cute::_1>{}, cute::false_type{});

    if (warpgroup == 2) {
      cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
      if (threadIdx.x == Tiles::kSchedulerThread) {
        auto write_state = cutlass::make_producer_start_state<Pipeline>();
        int slot = 0;
        uint32_t phase = 0;
        // Planted faults: the scheduler of block 0 stalls, or every block's after its first task.
        const int stall = blockIdx.x == 0 || ctx.p.stall == FusedOptions::kStallProducer ? ctx.p.stall
                                                                                         : FusedOptions::kNoStall;
        for (;;) {
          if (stall == FusedOptions::kStallScheduler) {
            stall_until_abort(ctx);
            break;
          }
          Task task{};
          int32_t step;
          const uint64_t looked_up = global_ns();
          do step = next_step(ctx, &task);
          while (step == kSegment);
          if (step == kRun) ctx.record(kEventSchedule, looked_up);
          // The consumers free the slot after reading it; if they never do, give up (the
          // error is recorded; the consumers leave on the abort).
          if (!ctx.wait_local([&] { return Barrier::try_wait(&s.empty[slot], phase ^ 1u); }, kTaskRing, slot,
                              phase ^ 1u))
            break;
          s.task[slot] = task;
          s.step[slot] = step;
          Barrier::arrive(&s.full[slot]);
          if (++slot == 2) { slot = 0; phase ^= 1u; }
          if (step == kExit) break;
          if (stall == FusedOptions::kStallProducer) {
            stall_until_abort(ctx);
            break;
          }
          fence_proxy_async();  // the task's rows were published by generic stores
          produce(ctx, s, pipeline, write_state, task);
        }
      } else if (threadIdx.x == Tiles::kFinisherThread) {
        finisher(ctx, s);
      }
      __syncwarp();  // the scheduler's warp reconverges: setmaxnreg is .sync.aligned
      // setmaxnreg.inc blocks until the block's pool has the registers. Taking them back before
      // the consumers have returned theirs can deadlock: a producer warp that increases early
      // (possibly before the consumers' own increase at the start of the phase) leaves the
      // consumers' increase blocked, the consumers never take a task, the scheduler never
      // finishes. So the producers take their registers back only after the consumers
      // returned theirs.
      registers_returned_sync();
      cutlass::arch::warpgroup_reg_alloc<kEvenRegisters>();
    } else {
      cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
      typename Cfg::TiledMma tiled_mma;
      auto accum = cute::partition_fragment_C(tiled_mma, cute::make_shape(typename Cfg::BlockM{}, typename Cfg::BlockN{}));
      typename Cfg::PipelineState read_state;
      int slot = 0, done_slot = 0;
      uint32_t phase = 0, done_phase = 0;
      // Consumer thread 0 hands a finished task (or, with seg < 0, the end of the phase) to the
      // finisher thread.
      auto hand_over = [&](const Task& task) {
        if (!ctx.wait_local([&] { return Barrier::try_wait(&s.done_empty[done_slot], done_phase ^ 1u); },
                            kTaskRing, 2 + done_slot, done_phase ^ 1u))
          return;  // aborted: the launch reports its error, the finisher leaves on the abort
        s.done[done_slot] = task;
        Barrier::arrive(&s.done_full[done_slot]);
        if (++done_slot == 2) { done_slot = 0; done_phase ^= 1u; }
      };
      for (;;) {
        // One thread waits (bounded) for the next task and tells the others, so that giving up
        // is one decision for all 256 consumer threads (they must reach the same barriers and
        // wgmmas).
        if (threadIdx.x == 0)
          s.ring_ok = ctx.wait_local([&] { return Barrier::try_wait(&s.full[slot], phase); }, kTaskRing, slot, phase);
        consumer_sync();
        if (!s.ring_ok) break;
        Barrier::wait(&s.full[slot], phase);  // complete: makes the slot's contents visible
        const Task task = s.task[slot];
        const int32_t step = s.step[slot];
        Barrier::arrive(&s.empty[slot]);
        if (++slot == 2) { slot = 0; phase ^= 1u; }
        if (step == kExit) break;
        const uint64_t start = global_ns();
        compute(ctx, s, pipeline, read_state, accum, task);
        fence_proxy_async();  // GEMM1 tiles read hidden with TMA
        consumer_sync();
        if (threadIdx.x == 0) {
          ctx.record((task.seg & kGemm1Bit) ? kEventGemm1 : kEventGemm0, start);
          hand_over(task);
        }
      }
      if (threadIdx.x == 0) hand_over(Task{0, 0, -1, 0});
      __syncwarp();
      cutlass::arch::warpgroup_reg_dealloc<kEvenRegisters>();
      registers_returned_sync();
    }
  }
};

// The Hopper kernel (sm_90a; bf16/fp16). kGin: built with the GIN paths (fused_kernel.cuh).
template <class T, bool kGin>
__global__ void __launch_bounds__(Sm90Tiles<T>::kThreads, 1)
    fused_moe_kernel_sm90(const __grid_constant__ Params<T> p, const __grid_constant__ Sm90Tma<T> tma) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  fused_forward<kGin>(p, smem_raw, Sm90Engine<T>{tma});
#elif defined(__CUDA_ARCH__)
  if (threadIdx.x == 0 && blockIdx.x == 0)
    printf("fusedmoe fused kernel: the Hopper engine is not compiled for this GPU (needs sm_90a)\n");
  __trap();
#endif
}

}  // namespace fusedmoe::cuda::fused
