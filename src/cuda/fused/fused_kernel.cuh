// src/cuda/fused/fused_kernel.cuh — the single persistent kernel of the fused MoE forward.
//
// One cooperative launch per GPU runs router -> dispatch -> expert GEMM0 (+ activation) ->
// GEMM1 -> return -> combine for W ranks. With emulated ranks, W ranks are W slices of the grid
// over one allocation of W symmetric heaps (heap q at base + q * heap_stride); a real transport
// gives the same peer pointers for peer GPUs. Every buffer of a heap is addressed through
// WorkspaceLayout (fusedmoe/layout.hpp), flags are {epoch:32 | count:32} words.
//
// Rank r's blocks (B = gridDim.x / W of them), in order:
//   P1 router   token chunks of 128: logits on tensor cores (fp32), gate + top-k per warp
//               (router_device.cuh), per-chunk expert counts per choice j. Then the ONE barrier
//               of the kernel (rank r's blocks only): slots need all of the rank's counts.
//   P2 dispatch per chunk: choice-major capacity slots, every kept row copied (16-B vectors)
//               into the owner's recv_rows with its token.k + j in recv_meta. The block whose
//               rows complete (source r, expert e) — a per-(r, e) arrival counter — raises the
//               owner's recv_flags[r][e_local] = {epoch, count} with a system-scope release;
//               experts with no rows get {epoch, 0} from chunk 0. P2 never waits.
//   P3 experts  segments (source s, local expert) are claimed one by one; the claimer waits for
//               the segment's flag (and, dropless, the flags before it, for the row offset),
//               then pushes one GEMM0 task per (128-row tile, column tile) into rank r's task
//               queue. A GEMM0 tile runs the up projection with the activation fused into
//               `hidden`; the last GEMM0 tile of a segment (counter) pushes the segment's GEMM1
//               tasks, row tile fastest (tiles sharing a block of w2[e] run together). GEMM1
//               tiles store their rows straight into the source's ret_rows[token.k + j]; the
//               last tile of a segment raises the source's ret_flags[e] = {epoch, count}.
//   P4 combine  warp per token: wait for the return flag of each kept choice (count checked),
//               y = sum_j w_j * row_j in fixed j order, fp32 accumulation.
//
// Why no cycle of waits can form (all blocks are resident: cooperative launch):
//   - the barrier after P1 waits only for P1 of the same rank, which never waits;
//   - P2 never waits; every dispatch flag of every rank is raised once all ranks passed P1;
//   - a segment claimer waits only for dispatch flags (P2);
//   - a queue slot is filled either by a claimer (waits only on P2) or by the completion of a
//     GEMM0 task with a smaller slot, and a task, once taken, runs without waiting; a block
//     leaves P3 only when every segment is claimed and every task index is taken, so what it
//     leaves behind is running;
//   - P4 waits for return flags, raised by P3 tasks that are running or queued (above).
// Every wait is bounded (globaltimer) and polls a shared abort word; the first failure records
// {code, rank, block, what, a, b, expected, seen} for the host, which raises it.
//
// Epochs: the epoch of a launch is (device epoch word) + 1, read by every block at entry; the
// last block to finish resets the per-rank control words and bumps the epoch word, so
// back-to-back launches and CUDA-graph replays need no reset kernel and no host argument.
// Launches: that last block also raises launch_flags[s] = {epoch, 0} in every rank's heap for
// each rank s of the grid, and P2 starts by waiting until every rank's entry in its own heap
// reached the previous epoch. With real ranks (one grid per GPU) a rank that sent nothing to a
// slower peer could otherwise start the next launch and raise that peer's dispatch flags while
// the peer still claims segments of the current one (reading the next launch's count, and in
// dropless mode offsets mixed from two launches). No cycle: launch n + 1 waits on the end of
// launch n, which never waits on launch n + 1. With emulated ranks the wait passes at once.
//
// Engines (who runs P3's tiles): the portable engine here — 128 x 128 x 64 tiles on mma.sync
// (nvcuda::wmma; fp32 data as TF32; gated tiles interleave gate and up columns per 16), 8 warps
// of 64 x 32 outputs, 256 threads, any GPU of compute capability >= 8.0 — and the Hopper engine
// of fused_sm90.cuh (wgmma + TMA tiles of src/cuda/gemm, a scheduler warpgroup, 384 threads).
// P1, P2 and P4 are the same code for both: P1 and P2 on threads 0-255, named barrier 1
// (team_sync); P4 on every warp of the block.
#pragma once

#include <mma.h>

#include <cstdint>

#include "cuda/fused/gin_link.cuh"
#include "cuda/router_device.cuh"
#include "cuda/wmma_gemm.cuh"
#include "fusedmoe/layout.hpp"

namespace fusedmoe::cuda::fused {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileM = 128, kTileN = 128, kTileK = 64;
constexpr int kChunk = 128;       // tokens per router / dispatch chunk
constexpr int kMaxTopK = 8;
constexpr int kMaxExperts = 256;
constexpr int kMaxWorld = 64;
constexpr int kMaxSegments = 1024;  // W * max_local_experts
constexpr int kMaxShared = 8;       // shared experts

// ---------------------------------------------------------------------------- error record --
enum ErrorCode : uint32_t { kNoError = 0, kTimeout = 1, kCountMismatch = 2 };
enum EventKind : int32_t {
  kEventRouter = 0, kEventDispatch = 1, kEventGemm0 = 2, kEventGemm1 = 3, kEventCombine = 4, kEventSchedule = 5,
  kEventRouterLogits = 6, kEventDispatchCopy = 7  // parts of P1 and P2 (thread 0 records them)
};
enum WaitWhat : uint32_t {
  kDispatchFlag = 1, kReturnFlag = 2, kRankBarrier = 3, kQueueSlot = 4,
  kTaskRing = 5,      // Hopper engine: a task ring slot (a = 0, 1: scheduler -> consumers; 2, 3: consumers -> finisher)
  kPipelineStage = 6,  // Hopper engine: a TMA stage (a = 0 consumer wait, 1 producer acquire)
  kSharedTiles = 7,    // combine: the rank's shared-expert GEMM1 tiles (a = rank)
  kLaunchFlag = 8      // dispatch: the end of rank a's previous launch
};

struct ErrorRecord {
  uint32_t code;
  uint32_t what;
  int32_t rank;
  int32_t block;
  int64_t a, b;           // dispatch flag: source, local expert; return flag: expert; slot: index
  uint32_t expected;      // epoch (timeout) or count (mismatch)
  uint32_t pad;
  uint64_t seen;          // last value seen
  uint64_t waited_ns;
};

// Per-rank control words (rank-local memory, reset by the last block of each launch).
struct RankControl {
  uint32_t barrier;       // P1 arrivals
  uint32_t seg_next;      // next segment to claim
  uint32_t segs_done;     // segments whose tasks are counted and pushed
  uint32_t total_tasks;   // tasks of all pushed segments (GEMM0 + GEMM1)
  uint32_t q_head;        // next task index to take
  uint32_t q_tail;        // next task index to reserve
  uint32_t dispatched;    // blocks of the rank past P2 (combine reads the rank's kept flags)
  uint32_t logits_done;   // blocks past the split logits of P1 (router_splits > 1)
  uint32_t shared_gemm0[kMaxShared];  // GEMM0 tiles done per shared expert
  uint32_t shared_gemm1;  // shared-expert GEMM1 tiles done (all of the rank's shared experts)
};

// One timeline record (debug timeline, fusedmoe/timeline.hpp); kind = FusedEventKind.
struct TimelineRecord {
  uint64_t start, end;
  int32_t block, sm, rank, kind;
};
static_assert(sizeof(TimelineRecord) == 32);

struct Task {
  int32_t row_begin;  // first row of the tile in the rank's recv_rows / hidden
  int32_t row_end;    // end of the segment's rows
  int32_t seg;        // segment (source * E_local + local expert); bit 30 set: GEMM1
  int32_t tile;       // m_tile << 16 | n_tile
};
constexpr int32_t kGemm1Bit = 1 << 30;
// seg with bit 29 set: shared expert (seg & 0xffff) of the rank, rows = the rank's tokens
// (row_begin, row_end relative to its first token).
constexpr int32_t kSharedBit = 1 << 29;

// ------------------------------------------------------------------------------- params --
template <class T>
struct Params {
  // Problem
  int world, num_experts, max_local, top_k;
  // Ranks this grid runs: [rank_base, rank_base + grid_ranks). Emulated ranks: 0 and W (the
  // grid is W slices); real ranks (NCCL, one process per GPU): this process's rank and 1.
  int rank_base, grid_ranks;
  int64_t hidden, ffn, ffn_in;   // H, I, N1
  FfnKind ffn_kind;
  bool gated;
  RouterParams router;           // num_tokens = all ranks' tokens
  // Placement tables travel in the parameters (no host-to-device copies: capturable).
  int64_t rank_begin[kMaxWorld + 1];     // token range of each rank
  int64_t capacity[kMaxWorld];           // rows per (source rank, expert)
  int16_t owner[kMaxExperts];            // owning rank of each expert
  int16_t local_index[kMaxExperts];      // index among the owner's experts
  int16_t global_expert[kMaxSegments];   // [W][max_local] (-1 past a rank's experts)
  // Leading dimension of w1 / w2 (b1, b2): num_experts (indexed by global expert) or — NCCL
  // transport — this process's rank's local experts only (indexed by local expert).
  int weight_experts;
  int32_t num_local[kMaxWorld];
  int max_chunks;                // chunks of the largest rank (>= 1)
  int tile_n0, tile_n1;          // output columns of one GEMM0 / GEMM1 tile (engine's tile widths)
  // Split routing (few tokens, no noisy gate): the logits GEMM of a chunk runs as
  // router_splits slices of split_k along H on different blocks into logit_parts
  // [router_splits][T][E] (fp32); after a rank barrier a warp per token (all blocks) sums them
  // in slice order and runs the gate.
  int router_splits;
  int64_t split_k;
  float* logit_parts;
  bool aligned;                  // x, y, weights and the heaps are 16-B aligned (vector access)
  // Tensors
  const T* x;                    // [T, H]
  T* y;                          // [T, H]
  const T* gate_weight;          // [E, H]
  const T* gate_bias;            // [E] or null
  const T* noise_weight;         // [E, H] (noisy gate in training) or null
  const T* selection_bias;       // [E] or null
  const T* w1;                   // [E, H, N1]
  const T* b1;                   // [E, N1] or null
  const T* w2;                   // [E, I, H]
  const T* b2;                   // [E, H] or null
  // Shared experts (num_shared = S > 0): every token of the rank through S dense FFNs in this
  // kernel, as segments of their own (the first ones claimed: their rows are the rank's x, there
  // is no dispatch to wait for); GEMM0 into shared_hidden, GEMM1 into shared_out, which the
  // combine adds (weight 1) once all of the rank's shared GEMM1 tiles are done.
  int num_shared;
  int64_t shared_ffn, shared_in;  // Is, Ns1
  int64_t shared_rows_cap;        // rows of one (rank, shared expert) block: max tokens of a rank
  const T* shared_w1;             // [S, H, Ns1]
  const T* shared_b1;             // [S, Ns1] or null
  const T* shared_w2;             // [S, Is, H]
  const T* shared_b2;             // [S, H] or null
  T* shared_hidden;               // [grid ranks][S][rows_cap][Is]
  T* shared_out;                  // [grid ranks][S][rows_cap][H]
  RoutingBuffers r;              // logits/probs/lse/prob_sum/renorm_sum/selected/idx/weight/kept [T...]
  int32_t* chunk_counts;         // [W][k][max_chunks][E]
  int64_t* kept_rank;            // [W][E] kept rows of (source rank, expert)
  uint32_t* dispatch_written;    // [W][E] arrival counters (reset by their completer)
  uint32_t* seg_done;            // [W][W * max_local] GEMM1 tiles done per segment of each rank
  unsigned long long* routed;    // [E] routed counts, all ranks (workspace: the last block of a
  unsigned long long* kept_total;// [E]  launch copies them out and zeroes them for the next)
  int64_t* routed_out;           // [E] where the launch's routed and kept counts go
  int64_t* kept_out;             // [E]
  // Heaps
  unsigned char* heap_base;
  int64_t heap_stride;
  WorkspaceLayout layout;
  GinLink gin;                   // peers on other nodes (gin_link.cuh); gin.on false otherwise
  int32_t* sent_row;             // GIN: [T][k] recv_rows index the dispatch gave each kept row
  // Control
  RankControl* control;          // [W]
  Task* tasks;                   // [W][task_capacity]
  uint32_t* task_ready;          // [W][task_capacity] epoch of the launch that published it
  int64_t task_capacity;
  uint32_t* epoch_word;
  uint32_t* blocks_done;
  uint32_t* abort_word;
  ErrorRecord* error;
  uint64_t timeout_ns;
  // Debug timeline (null: off): per block `timeline_capacity` records, count in timeline_count.
  TimelineRecord* timeline;
  uint32_t* timeline_count;
  int timeline_capacity;
  // Faults (tests)
  int silent_rank;
  bool flag_before_data;
  bool drop_shared_tiles;  // FusedOptions::drop_shared_tiles
  int unfinished_rank;     // FusedOptions::unfinished_rank
  int stall;  // FusedOptions::Stall (Hopper engine, block 0)
  // Emulated ranks: heaps of the workspace (>= world: it is shared by layers of other worlds).
  int launch_slots;
};

// ------------------------------------------------------------------------- memory order --
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// The router, dispatch and combine phases run on threads 0 .. kThreads-1 (the whole block of the
// portable kernel; the two consumer warpgroups of the Hopper kernel, whose third warpgroup only
// takes part in the expert phase): their barrier is named barrier 1 over kThreads threads.
__device__ __forceinline__ void team_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }
// team_sync that also tells every thread of the team whether any of them passed `v`: a decision
// all of them take alike (a thread leaving alone would strand the others at the next team_sync).
__device__ __forceinline__ bool team_any(bool v) {
  uint32_t any;
  asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, %2, p;\n selp.u32 %0, 1, 0, q;\n}"
               : "=r"(any) : "r"(static_cast<uint32_t>(v)), "n"(kThreads) : "memory");
  return any != 0;
}
// Orders this thread's generic-proxy global writes before later async-proxy (TMA) accesses.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async;" ::: "memory"); }
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ------------------------------------------------------------------------------- context --
template <class T, bool kGin>
struct Ctx {
  const Params<T>& p;
  uint32_t epoch;
  int rank, blocks_per_rank, local_block;
  // Some peers may be remote (GIN): false at compile time in the kernels built without GIN, so
  // that their code is the code of a world without it (inlined GIN calls cost registers).
  static constexpr bool gin_on = kGin;

  __device__ bool remote(int q) const { return kGin && p.gin.remote(rank, q); }

  __device__ unsigned char* heap(int q) const { return p.heap_base + q * p.heap_stride; }
  // Shared expert s of this rank: its GEMM0 output rows and GEMM1 output rows (token order).
  __device__ T* shared_hidden(int s) const {
    return p.shared_hidden + (static_cast<int64_t>(rank - p.rank_base) * p.num_shared + s) * p.shared_rows_cap * p.shared_ffn;
  }
  __device__ T* shared_out(int s) const {
    return p.shared_out + (static_cast<int64_t>(rank - p.rank_base) * p.num_shared + s) * p.shared_rows_cap * p.hidden;
  }
  __device__ int64_t rank_tokens() const { return p.rank_begin[rank + 1] - p.rank_begin[rank]; }
  __device__ uint64_t* recv_flag(int owner, int source, int local) const {
    return reinterpret_cast<uint64_t*>(heap(owner) + p.layout.recv_flags.offset) +
           p.layout.recv_flag_index(source, local);
  }
  // In rank q's heap: the epoch of the last launch rank s finished.
  __device__ uint64_t* launch_flag(int q, int s) const {
    return reinterpret_cast<uint64_t*>(heap(q) + p.layout.launch_flags.offset) + p.layout.launch_flag_index(s);
  }
  __device__ uint64_t* ret_flag(int source, int expert) const {
    return reinterpret_cast<uint64_t*>(heap(source) + p.layout.ret_flags.offset) + p.layout.ret_flag_index(expert, 0);
  }
  // Thread 0 of the block: one timeline record [start, now) of `kind`.
  __device__ void record(int32_t kind, uint64_t start) const {
    if (p.timeline == nullptr) return;
    const uint32_t i = atomicAdd(&p.timeline_count[blockIdx.x], 1u);  // the scheduler thread records too
    if (i >= static_cast<uint32_t>(p.timeline_capacity)) return;
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    p.timeline[static_cast<int64_t>(blockIdx.x) * p.timeline_capacity + i] =
        TimelineRecord{start, global_ns(), static_cast<int32_t>(blockIdx.x), static_cast<int32_t>(sm), rank, kind};
  }
  __device__ bool aborted() const { return *reinterpret_cast<volatile uint32_t*>(p.abort_word) != 0; }

  __device__ void fail(uint32_t code, uint32_t what, int64_t a, int64_t b, uint32_t expected, uint64_t seen,
                       uint64_t waited) const {
    if (atomicCAS(p.abort_word, 0u, 1u) == 0u) {
      ErrorRecord e{code, what, rank, static_cast<int32_t>(blockIdx.x), a, b, expected, 0u, seen, waited};
      *p.error = e;
      __threadfence_system();
    }
  }

  // Acquire-waits until the flag's epoch reaches this launch's; false on timeout or abort.
  __device__ bool wait_flag(const uint64_t* flag, uint64_t* value, uint32_t what, int64_t a, int64_t b) const {
    return wait_epoch(flag, epoch, value, what, a, b);
  }
  __device__ bool wait_epoch(const uint64_t* flag, uint32_t expected, uint64_t* value, uint32_t what, int64_t a,
                             int64_t b) const {
    return wait_loaded([flag] { return ld_acquire_sys(flag); }, expected, value, what, a, b);
  }
  // The same on this rank's GIN signal `signal` (a remote writer's flag word).
  __device__ bool wait_signal(int64_t signal, uint32_t expected, uint64_t* value, uint32_t what, int64_t a,
                              int64_t b) const {
    return wait_loaded([&] { return gin_read(p.gin, heap(rank), signal); }, expected, value, what, a, b);
  }
  // Dispatch flag of (source, local expert) of this rank; return flag of expert e of this rank.
  __device__ bool wait_dispatch(int source, int local, uint64_t* value) const {
    if (remote(source))
      return wait_signal(p.layout.gin_dispatch_signal(source, local), epoch, value, kDispatchFlag, source, local);
    return wait_flag(recv_flag(rank, source, local), value, kDispatchFlag, source, local);
  }
  __device__ bool wait_return(int e, uint64_t* value) const {
    if (remote(p.owner[e]))
      return wait_signal(p.layout.gin_return_signal(p.owner[e], p.local_index[e]), epoch, value, kReturnFlag, e, 0);
    return wait_flag(ret_flag(rank, e), value, kReturnFlag, e, 0);
  }
  // This rank's record of what it last published on a remote rank's signal (gin_sent).
  __device__ uint64_t* gin_sent(int64_t slot) const {
    return reinterpret_cast<uint64_t*>(heap(rank) + p.layout.gin_sent.offset) + slot;
  }
  template <class Load>
  __device__ bool wait_loaded(Load load, uint32_t expected, uint64_t* value, uint32_t what, int64_t a,
                              int64_t b) const {
    const uint64_t start = global_ns();
    for (uint32_t spins = 0;; ++spins) {
      const uint64_t v = load();
      if (epoch_reached(flag_epoch(v), expected)) {
        *value = v;
        return true;
      }
      if ((spins & 31u) == 31u) {
        if (aborted()) return false;
        const uint64_t waited = global_ns() - start;
        if (waited > p.timeout_ns) {
          fail(kTimeout, what, a, b, expected, v, waited);
          return false;
        }
        __nanosleep(64);
      }
    }
  }
  // Waits until ready() (a block-local condition, e.g. an mbarrier phase; ready() may itself
  // suspend the thread for a while); false on abort, or on timeout after recording it. The
  // limit is twice the launch's timeout: these waits sit behind the cross-block waits, which
  // report first.
  // The abort word and the clock (a load from L2 and a timer read) are looked at every 16th
  // unsuccessful try: a thread that checked them after every try could be reading the abort
  // word when its mbarrier phase completes, and wake late.
  template <class Ready>
  __device__ bool wait_local(Ready ready, uint32_t what, int64_t a, uint32_t expected) const {
    if (ready()) return true;
    const uint64_t start = global_ns();
    for (uint32_t spins = 0;; ++spins) {
      if (ready()) return true;
      if ((spins & 15u) != 15u) continue;
      if (aborted()) return false;
      const uint64_t waited = global_ns() - start;
      if (waited > 2 * p.timeout_ns) {
        fail(kTimeout, what, a, 0, expected, 0, waited);
        return false;
      }
    }
  }
  // Acquire-waits until *word >= target (wrap-safe); false on timeout or abort.
  __device__ bool wait_count(const uint32_t* word, uint32_t target, uint32_t what, int64_t a) const {
    const uint64_t start = global_ns();
    for (uint32_t spins = 0;; ++spins) {
      const uint32_t v = ld_acquire_gpu(word);
      if (static_cast<int32_t>(v - target) >= 0) return true;
      if ((spins & 31u) == 31u) {
        if (aborted()) return false;
        const uint64_t waited = global_ns() - start;
        if (waited > p.timeout_ns) {
          fail(kTimeout, what, a, 0, target, v, waited);
          return false;
        }
        __nanosleep(64);
      }
    }
  }
};

// ---------------------------------------------------------------------- shared memory --
template <class T>
struct GemmSmem {
  cuda::detail::SmemTile<T, kTileM, kTileK> a;         // [128][64 + pad]
  union {
    cuda::detail::SmemTile<T, kTileK, kTileN> b;       // [64][128 + pad]: B with N contiguous
    cuda::detail::SmemTile<T, kTileN, kTileK> bk;      // [128][64 + pad]: B with K contiguous
  };
  float stage[kWarps][16][16 + 4];
};
// The chunk's gate runs kGateLanes lanes per token: a warp takes 32 / kGateLanes tokens at once
// (the gate's chain of loads and shuffles is latency-bound; a warp per token over the 16 tokens
// of each warp in turn was most of paper-64's routing).
constexpr int kGateLanes = 8;
constexpr int kGateGroups = kThreads / kGateLanes;
struct RouterSmem {
  float score[kGateGroups][kMaxExperts];
  int32_t counts[kMaxTopK][kMaxExperts];
};
struct DispatchSmem {
  int32_t base[kMaxTopK][kMaxExperts];   // choice-major prefix of this chunk, per (j, e)
  int32_t kept[kMaxExperts];             // kept rows of (rank, e)
  int32_t psum[kMaxExperts];             // segment spans before e among its owner's experts (dropless)
  int32_t written[kMaxExperts];          // rows this block wrote per expert
  int32_t running[kWarps][kMaxExperts];  // per-warp ranks within the chunk
  int32_t list_dst[kChunk * kMaxTopK];   // destination row (owner's recv_rows) or -1
  int32_t list_owner[kChunk * kMaxTopK];
};
// The router's logits tile loop for 16-bit types: three stages of cp.async (the next two k
// steps' operands are in flight while this one computes; the router reads x once, from HBM, so
// its loads must overlap its tensor-core work). A and B both K-contiguous: x rows, gate weight rows.
// The portable kernel keeps it small (32-wide k steps, 3 stages: ~71 KB for bf16, within the
// shared memory of every sm_80+ GPU); the Hopper kernel, whose expert phase has ~200 KB of
// shared memory anyway, runs 64-wide k steps with 4 stages (three steps, 48 KB, in flight), or
// with at most 64 experts a 64-column tile with 128-wide k steps and 3 stages (two steps, 64 KB
// of x in flight, 256 B of each row per step). The loop is bound by how fast each SM's x bytes
// arrive, not by the tensor cores: paper-64's logits took 66-70 us with three 16-KB steps in
// flight, 55-57 us with five, and 52 us with two steps of 256-B row pieces (perf.md v0.19).
template <class T, int kKSteps = 32, int kStageCount = 3, int kColumns = kTileN>
struct RouterPipeSmem {
  static constexpr int kK = kKSteps, kPad = 8, kStages = kStageCount, kN = kColumns;
  static_assert(kN == 64 || kN == 128, "8 warps over 128 x kN outputs");
  T a[kStages][kTileM][kK + kPad];
  T b[kStages][kN][kK + kPad];
  float stage[kWarps][16][16 + 4];
};
struct NoSmem {};
template <class T>
using RouterPipe = std::conditional_t<sizeof(T) == 2, RouterPipeSmem<T>, NoSmem>;

template <class T>
union SharedUnion {
  GemmSmem<T> gemm;
  RouterSmem router;
  DispatchSmem dispatch;
  RouterPipe<T> router_pipe;
};
struct TaskSmem {
  Task task;
  int32_t state;  // 0: run task, 1: exit loop, 2: segment handled (loop again)
};

// -------------------------------------------------------------------- tile main loop --
// acc (per warp 4 x 2 fragments of 16 x 16) = A[rows of the tile, 0:K] · B[0:K, columns],
// A row-major with row stride lda (rows >= row_count read as zero), B[k][col] = b_col(k, c)
// given by `load_b` (fills the shared tile). Must be called by all 256 threads.
template <class T>
using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, std::is_same_v<T, float> ? 8 : 16, float>;

template <class T, bool kBNContig, class LoadB>
__device__ __forceinline__ void mma_tile(GemmSmem<T>& s, const T* a, int64_t lda, int64_t row_count, int64_t K,
                                         bool vector_a, LoadB load_b, Frag<T> (&acc)[4][2]) {
  using namespace nvcuda;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kStepK = kTf32 ? 8 : 16;
  using FragElement = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  using BLayout = std::conditional_t<kBNContig, wmma::row_major, wmma::col_major>;
  const int warp = threadIdx.x / 32, warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    cuda::detail::load_tile<kThreads>(s.a, a, lda, 0, row_count, k0, K, vector_a);
    load_b(k0);
    team_sync();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kStepK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStepK, FragElement, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, kStepK, FragElement, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &s.a.data[warp_m * 64 + i * 16][kk], kTileK + cuda::detail::kWmmaPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int nn = warp_n * 32 + j * 16;
        if constexpr (kBNContig) {
          wmma::load_matrix_sync(fb[j], &s.b.data[kk][nn], kTileN + cuda::detail::kWmmaPad);
        } else {
          wmma::load_matrix_sync(fb[j], &s.bk.data[nn][kk], kTileK + cuda::detail::kWmmaPad);
        }
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
    team_sync();
  }
}

// B tile from a row-major [K][ldb] matrix, tile column c <- source column col_of(c) (-1: zero),
// in runs of 8 consecutive columns (16-B loads when `vector`).
template <class T, class ColOf>
__device__ __forceinline__ void load_b_rows(GemmSmem<T>& s, const T* b, int64_t ldb, int64_t k0, int64_t K, ColOf col_of,
                                            bool vector) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kRuns = kTileK * kTileN / kVec;
  for (int i = threadIdx.x; i < kRuns; i += kThreads) {
    const int kk = i / (kTileN / kVec), c = (i % (kTileN / kVec)) * kVec;
    const int64_t gk = k0 + kk;
    T* dst = &s.b.data[kk][c];
    const int64_t col = col_of(c);  // first column of the run; runs never straddle a boundary
    if (vector && gk < K && col >= 0 && col_of(c + kVec - 1) == col + kVec - 1) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(b + gk * ldb + col);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t ce = col_of(c + e);
        dst[e] = (gk < K && ce >= 0) ? b[gk * ldb + ce] : from_f32<T>(0.f);
      }
    }
  }
}

// B tile from a [N][ldb] matrix with K contiguous (the router weight [E, H]): stored [N][K].
template <class T>
__device__ __forceinline__ void load_b_kmajor(GemmSmem<T>& s, const T* b, int64_t ldb, int64_t n0, int64_t N,
                                              int64_t k0, int64_t K, bool vector) {
  cuda::detail::load_tile<kThreads>(s.bk, b, ldb, n0, N, k0, K, vector);
}

// Each warp's 16 x 16 output blocks through its staging tile: visit(row, col, value) for the
// fragment (i, j) with tile-relative coordinates.
template <class T, class Visit>
__device__ __forceinline__ void store_frag(GemmSmem<T>& s, const Frag<T>& f, int row0, int col0, Visit visit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  nvcuda::wmma::store_matrix_sync(&s.stage[warp][0][0], f, 16 + 4, nvcuda::wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 256; e += 32) visit(row0 + e / 16, col0 + e % 16, s.stage[warp][e / 16][e % 16]);
  __syncwarp();
}

__device__ __forceinline__ float act_of(FfnKind kind, float x) {
  switch (kind) {
    case FfnKind::kReluMlp: return x > 0.f ? x : 0.f;
    case FfnKind::kSwiGlu: return x / (1.f + expf(-x));
    default: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  }
}

// ------------------------------------------------------------------------------- phases --
// Chunk c of rank r's tokens: first token and row count (0 for a rank without tokens, which
// still has its one chunk of zero counts).
template <class T, bool G>
__device__ __forceinline__ void chunk_rows(const Ctx<T, G>& ctx, int64_t c, int64_t* t0, int64_t* rows) {
  const int64_t begin = ctx.p.rank_begin[ctx.rank], tokens = ctx.rank_tokens();
  *t0 = begin + c * kChunk;
  *rows = tokens > 0 ? (tokens - c * kChunk < kChunk ? tokens - c * kChunk : int64_t(kChunk)) : int64_t(0);
}
template <class T, bool G>
__device__ __forceinline__ int64_t rank_chunks(const Ctx<T, G>& ctx) {
  const int64_t tokens = ctx.rank_tokens();
  return tokens > 0 ? (tokens + kChunk - 1) / kChunk : 1;
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

// logits tile (rows of x from `a`, experts [n0, n0 + P::kN) of `wg`) over columns
// [k_begin, k_begin + k_len) of H, visit(row, col, value) per output. 16-bit types, 16-B aligned
// rows, k_len and H multiples of 8. All kThreads threads.
template <class P, class T, class Visit>
__device__ void router_tile_pipelined(P& s, const T* a, int64_t rows, const T* wg, int64_t n0,
                                      int64_t E, int64_t H, int64_t k_begin, int64_t k_len, Visit visit) {
  using namespace nvcuda;
  // Warps: kWarpsM x kWarpsN, each 32 columns x kFragM 16-row fragments.
  constexpr int kWarpsN = P::kN / 32, kWarpsM = kWarps / kWarpsN, kWarpRows = kTileM / kWarpsM;
  constexpr int kFragM = kWarpRows / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  constexpr int kChunksPerRow = P::kK / 8;  // 16-B chunks
  const int nk = static_cast<int>((k_len + P::kK - 1) / P::kK);
  auto load = [&](int kt, int buf) {
#pragma unroll 1
    for (int c = threadIdx.x; c < (kTileM + P::kN) * kChunksPerRow; c += kThreads) {
      const bool is_b = c >= kTileM * kChunksPerRow;
      const int cc = is_b ? c - kTileM * kChunksPerRow : c;
      const int r = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8;
      const int64_t k = static_cast<int64_t>(kt) * P::kK + col;
      const bool in_k = k < k_len;
      if (!is_b) {
        const bool valid = in_k && r < rows;
        cp_async16(&s.a[buf][r][col], valid ? a + r * H + k_begin + k : a, valid);
      } else {
        const bool valid = in_k && n0 + r < E;
        cp_async16(&s.b[buf][r][col], valid ? wg + (n0 + r) * H + k_begin + k : wg, valid);
      }
    }
    cp_async_commit();
  };
  Frag<T> acc[kFragM][2];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  // kStages - 1 k steps in flight ahead of the one computed; a step's buffer is refilled only
  // after the barrier that closes its computation.
  for (int kt = 0; kt < P::kStages - 1; ++kt) {
    if (kt < nk) load(kt, kt);
    else cp_async_commit();  // empty group: the wait counts stay uniform
  }
  for (int kt = 0; kt < nk; ++kt) {
    const int buf = kt % P::kStages;
    cp_async_wait<P::kStages - 2>();  // step kt has landed (this thread's copies)
    team_sync();                      // ... and every thread's
    const int next = kt + P::kStages - 1;
    if (next < nk) load(next, next % P::kStages);  // refills the buffer computed at kt - 1
    else cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < P::kK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
        wmma::load_matrix_sync(fa[i], &s.a[buf][warp_m * kWarpRows + i * 16][kk], P::kK + P::kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &s.b[buf][warp_n * 32 + j * 16][kk], P::kK + P::kPad);
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&s.stage[warp][0][0], acc[i][j], 16 + 4, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32)
        visit(warp_m * kWarpRows + i * 16 + e / 16, warp_n * 32 + j * 16 + e % 16, s.stage[warp][e / 16][e % 16]);
      __syncwarp();
    }
  team_sync();
}

// One logits tile: rows [t0, t0 + rows) of x times experts [n0, n0 + 128) of wg over columns
// [k0, k0 + kn) of H; visit(row, expert, value) for every output in range. 16-bit aligned
// operands take the cp.async pipeline, anything else the synchronous mma.sync tile.
template <class Pipe, class T, class Visit>
__device__ void router_logits_tile(const Params<T>& p, SharedUnion<T>& sm, int64_t t0, int64_t rows, const T* wg,
                                   int64_t n0, int64_t k0, int64_t kn, Visit visit) {
  const int64_t E = p.num_experts, H = p.hidden;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec = p.aligned && (H % kVec) == 0;
  auto in_range = [&](int row, int col, float v) {
    if (row < rows && n0 + col < E) visit(row, n0 + col, v);
  };
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      // The pipeline's buffers start at the union's first byte, like its other members.
      router_tile_pipelined(*reinterpret_cast<Pipe*>(&sm), p.x + t0 * H, rows, wg, n0, E, H, k0, kn, in_range);
      return;
    }
  }
  const int warp = threadIdx.x / 32, warp_m = warp / 4, warp_n = warp % 4;
  Frag<T> acc[4][2];
  mma_tile<T, false>(sm.gemm, p.x + t0 * H + k0, H, rows, kn, vec,
                     [&](int64_t kk) { load_b_kmajor(sm.gemm, wg + k0, H, n0, E, kk, kn, vec); }, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) store_frag(sm.gemm, acc[i][j], warp_m * 64 + i * 16, warp_n * 32 + j * 16, in_range);
  team_sync();
}

// P1, portable logits of one chunk: x·Wgᵀ (+ bg) on mma.sync tensor cores (fp32), and the noisy
// gate's noise term.
template <class Pipe, class T, bool G>
__device__ void router_logits(const Ctx<T, G>& ctx, SharedUnion<T>& sm, int64_t t0, int64_t rows) {
  const Params<T>& p = ctx.p;
  const int E = p.num_experts;
  const int64_t H = p.hidden;
  const bool noisy = p.noise_weight != nullptr;
  for (int pass = 0; pass < (noisy ? 2 : 1); ++pass) {
    const T* wg = pass == 0 ? p.gate_weight : p.noise_weight;
    float* out = pass == 0 ? p.r.logits : p.r.noise_pre;
    for (int n0 = 0; n0 < E; n0 += kTileN)
      router_logits_tile<Pipe>(p, sm, t0, rows, wg, n0, 0, H, [&](int row, int64_t e, float v) {
        if (pass == 0 && p.gate_bias) v += to_f32(p.gate_bias[e]);
        out[(t0 + row) * E + e] = v;
      });
  }
  team_sync();
  if (noisy) {  // logits += eps * softplus(x·Wnᵀ)
    for (int64_t i = threadIdx.x; i < rows * E; i += kThreads) {
      const int64_t t = t0 + i / E, e = i % E;
      const double eps = noise::normal(p.router.seed, noise::kNoisyGate,
                                       static_cast<uint64_t>(p.router.token_offset + t), static_cast<uint64_t>(e));
      const float pre = p.r.noise_pre[t * E + e];
      const float softplus = pre > 30.f ? pre : log1pf(expf(pre));
      p.r.logits[t * E + e] += static_cast<float>(eps) * softplus;
    }
    team_sync();
  }
}

// P1, after the chunk's logits: gate + top-k per token (warp per token) and the chunk's expert
// counts per choice j (choice-major slots need them for every chunk of the rank).
template <class T, bool G>
__device__ void router_gate(const Ctx<T, G>& ctx, RouterSmem& rs, int64_t c, int64_t t0, int64_t rows) {
  const Params<T>& p = ctx.p;
  const int E = p.num_experts, k = p.top_k;
  // Every lane of a warp runs the gate (its shuffles span the warp); groups past the chunk's
  // last token repeat the warp's first token without writing.
  const int group = threadIdx.x / kGateLanes;
  constexpr int kPerWarp = 32 / kGateLanes;
  for (int64_t base = static_cast<int64_t>(threadIdx.x / 32) * kPerWarp; base < rows; base += kWarps * kPerWarp) {
    const int64_t i = base + (threadIdx.x % 32) / kGateLanes;
    const bool active = i < rows;
    gate_topk_token<T, kGateLanes>(p.router, p.selection_bias, p.r, t0 + (active ? i : base), rs.score[group], active);
  }
  for (int i = threadIdx.x; i < k * E; i += kThreads) rs.counts[i / E][i % E] = 0;
  team_sync();
  for (int64_t i = threadIdx.x; i < rows * k; i += kThreads) {
    const int32_t e = p.r.idx[(t0 + i / k) * k + i % k];
    if (e >= 0) atomicAdd(&rs.counts[i % k][e], 1);
  }
  team_sync();
  for (int i = threadIdx.x; i < k * E; i += kThreads) {
    const int j = i / E, e = i % E;
    p.chunk_counts[((static_cast<int64_t>(ctx.rank) * k + j) * p.max_chunks + c) * E + e] = rs.counts[j][e];
  }
  team_sync();
}

// P1 with split routing, step 1: partial logits of (chunk, 128 experts, H slice) units over all
// of the rank's blocks (a decode batch is one chunk: one block would run the whole gate GEMM).
template <class Pipe, class T, bool G>
__device__ void router_split_logits(const Ctx<T, G>& ctx, SharedUnion<T>& sm) {
  const Params<T>& p = ctx.p;
  const int E = p.num_experts, splits = p.router_splits;
  const int64_t H = p.hidden;
  const int64_t e_tiles = (E + kTileN - 1) / kTileN, units = rank_chunks(ctx) * e_tiles * splits;
  for (int64_t u = ctx.local_block; u < units; u += ctx.blocks_per_rank) {
    const int64_t c = u / (e_tiles * splits), n0 = (u / splits) % e_tiles * kTileN, ks = u % splits;
    int64_t t0, rows;
    chunk_rows(ctx, c, &t0, &rows);
    const int64_t k0 = ks * p.split_k, kn = (H - k0 < p.split_k ? H - k0 : p.split_k);
    if (rows == 0 || kn <= 0) continue;
    float* part = p.logit_parts + ks * p.router.num_tokens * E;
    router_logits_tile<Pipe>(p, sm, t0, rows, p.gate_weight, n0, k0, kn,
                       [&](int row, int64_t e, float v) { part[(t0 + row) * E + e] = v; });
  }
}

// Step 2, after the rank's blocks finished step 1, a warp per token over all of them: logits =
// sum of the parts in slice order (+ gate bias), gate + top-k, and the token's choices added to
// its chunk's counts (zeroed in step 1; integer atomics, so the counts are exact).
template <class T, bool G>
__device__ void router_split_gate(const Ctx<T, G>& ctx, RouterSmem& rs) {
  const Params<T>& p = ctx.p;
  const int E = p.num_experts, k = p.top_k, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = p.rank_begin[ctx.rank], tokens = p.rank_begin[ctx.rank + 1] - begin;
  const int64_t stride = p.router.num_tokens * E;
  int32_t* counts = p.chunk_counts + static_cast<int64_t>(ctx.rank) * k * p.max_chunks * E;
  for (int64_t t = static_cast<int64_t>(ctx.local_block) * kWarps + warp; t < tokens;
       t += static_cast<int64_t>(ctx.blocks_per_rank) * kWarps) {
    const int64_t g = begin + t;
    for (int e = lane; e < E; e += 32) {
      const float* part = p.logit_parts + g * E + e;
      float v = 0.f;
#pragma unroll 8
      for (int ks = 0; ks < p.router_splits; ++ks) v += part[ks * stride];
      if (p.gate_bias) v += to_f32(p.gate_bias[e]);
      p.r.logits[g * E + e] = v;
    }
    __syncwarp();
    gate_topk_token<T>(p.router, p.selection_bias, p.r, g, rs.score[warp * (32 / kGateLanes)]);
    __syncwarp();
    if (lane < k) {
      const int32_t e = p.r.idx[g * k + lane];
      if (e >= 0) atomicAdd(&counts[(static_cast<int64_t>(lane) * p.max_chunks + t / kChunk) * E + e], 1);
    }
  }
}

// Pipe: the logits tile loop's cp.async buffers (RouterPipeSmem), over the first bytes of the
// block's shared memory.
template <class Pipe, class T, bool G>
__device__ void router_phase(const Ctx<T, G>& ctx, SharedUnion<T>& sm) {
  if (ctx.p.router_splits > 1) {
    const Params<T>& p = ctx.p;
    const int64_t n = static_cast<int64_t>(p.top_k) * p.max_chunks * p.num_experts;
    int32_t* counts = p.chunk_counts + ctx.rank * n;
    for (int64_t i = static_cast<int64_t>(ctx.local_block) * kThreads + threadIdx.x; i < n;
         i += static_cast<int64_t>(ctx.blocks_per_rank) * kThreads)
      counts[i] = 0;
    router_split_logits<Pipe>(ctx, sm);
    __threadfence();
    team_sync();
    RankControl& ctl = p.control[ctx.rank];
    if (threadIdx.x == 0) {
      atomicAdd(&ctl.logits_done, 1u);
      ctx.wait_count(&ctl.logits_done, static_cast<uint32_t>(ctx.blocks_per_rank), kRankBarrier, ctx.rank);
    }
    team_sync();
    router_split_gate(ctx, sm.router);
    return;
  }
  for (int64_t c = ctx.local_block; c < rank_chunks(ctx); c += ctx.blocks_per_rank) {
    int64_t t0, rows;
    chunk_rows(ctx, c, &t0, &rows);
    const uint64_t start = global_ns();
    if (rows > 0) router_logits<Pipe>(ctx, sm, t0, rows);
    if (threadIdx.x == 0) ctx.record(kEventRouterLogits, start);
    router_gate(ctx, sm.router, c, t0, rows);
  }
}

// Raises the owner's dispatch flag of (this rank, e) = {epoch, count}. A remote owner (GIN) gets
// the segment's staged rows and metadata put first (`psum`: rows this rank sends to the owner's
// earlier local experts, dropless).
template <class T, bool G>
__device__ void signal_dispatch(const Ctx<T, G>& ctx, int e, int64_t count, int64_t psum) {
  const Params<T>& p = ctx.p;
  const int owner = p.owner[e], local = p.local_index[e];
  const uint64_t flag = make_flag(ctx.epoch, static_cast<uint32_t>(count));
  if (ctx.remote(owner)) {
    const WorkspaceLayout& l = p.layout;
    const int64_t first = l.recv_row(ctx.rank, local, psum, 0), out = l.out_row(owner, ctx.rank, first);
    const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
    unsigned char *self = ctx.heap(ctx.rank), *peer = ctx.heap(owner);
    gin_put(p.gin, owner, self, peer, l.recv_rows.offset + first * row_bytes, l.out_rows.offset + out * row_bytes,
            count * row_bytes);
    gin_publish(p.gin, owner, self, peer, l.gin_dispatch_signal(ctx.rank, local),
                ctx.gin_sent(l.gin_sent_dispatch(owner, local)), flag, l.recv_meta.offset + first * 4,
                l.out_meta.offset + out * 4, count * 4);
    return;
  }
  st_release_sys(ctx.recv_flag(owner, ctx.rank, local), flag);
}

template <class T, bool G>
__device__ void dispatch_phase(const Ctx<T, G>& ctx, SharedUnion<T>& sm) {
  const Params<T>& p = ctx.p;
  DispatchSmem& s = sm.dispatch;
  const int r = ctx.rank;
  const int64_t begin = p.rank_begin[r], tokens = p.rank_begin[r + 1] - begin;
  const int64_t chunks = tokens > 0 ? (tokens + kChunk - 1) / kChunk : 1;
  const int E = p.num_experts, k = p.top_k;
  const int64_t H = p.hidden, cap = p.capacity[r];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* counts = p.chunk_counts + static_cast<int64_t>(r) * k * p.max_chunks * E;
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(T));
  // With fewer chunks than blocks (decode), `parts` blocks share a chunk: each computes the
  // chunk's slots (cheap) and copies every parts-th group of kWarps rows, so the copies of a
  // small batch run on all of the rank's SMs rather than on one.
  const int64_t parts = chunks < ctx.blocks_per_rank ? ctx.blocks_per_rank / chunks : 1;
  // Nothing goes into a peer's heap before every rank finished the previous launch (see the
  // file comment, "Launches").
  for (int q = threadIdx.x; q < p.world; q += kThreads) {
    uint64_t seen = 0;
    if (ctx.remote(q)) ctx.wait_signal(p.layout.gin_launch_signal(q), previous_epoch(ctx.epoch), &seen, kLaunchFlag, q, 0);
    else ctx.wait_epoch(ctx.launch_flag(r, q), previous_epoch(ctx.epoch), &seen, kLaunchFlag, q, 0);
  }
  if (team_any(ctx.aborted())) return;  // nothing goes into a heap of a launch that failed
  for (int64_t u = ctx.local_block; u < chunks * parts; u += ctx.blocks_per_rank) {
    const int64_t c = u % chunks, part = u / chunks;
    const bool lead = part == 0;  // the chunk's first part writes the chunk-wide results
    // Choice-major prefix of this chunk and the rank's kept counts: `group` consecutive lanes
    // per expert, each summing every group-th chunk count (several loads in flight), combined
    // with shuffles. (One thread per expert summing all k x chunks counts one after the other
    // took ~40 us of paper-64's 100 us dispatch: a chain of L2 round trips.)
    const int group = E >= kThreads ? 1 : (kThreads / E >= 32 ? 32 : 1 << (31 - __clz(kThreads / E)));
    for (int e0 = 0; e0 < E; e0 += kThreads / group) {
      const int e = e0 + static_cast<int>(threadIdx.x) / group, g = static_cast<int>(threadIdx.x) % group;
      const bool active = e < E;  // every lane takes part in the shuffles
      int64_t running = 0;
      for (int j = 0; j < k; ++j) {
        int64_t before = 0, total = 0;
        if (active) {
          const int32_t* column = counts + static_cast<int64_t>(j) * p.max_chunks * E + e;
#pragma unroll 4
          for (int64_t c2 = g; c2 < chunks; c2 += group) {
            const int64_t v = column[c2 * E];
            total += v;
            before += c2 < c ? v : 0;
          }
        }
        for (int offset = 1; offset < group; offset <<= 1) {
          before += __shfl_xor_sync(0xffffffffu, before, offset);
          total += __shfl_xor_sync(0xffffffffu, total, offset);
        }
        if (active && g == 0) s.base[j][e] = static_cast<int32_t>(running + before);
        running += total;
      }
      if (active && g == 0) {
        s.kept[e] = static_cast<int32_t>(running < cap ? running : cap);
        s.written[e] = 0;
        if (c == 0 && lead) {
          p.kept_rank[static_cast<int64_t>(r) * E + e] = s.kept[e];
          atomicAdd(p.routed + e, static_cast<unsigned long long>(running));
          atomicAdd(p.kept_total + e, static_cast<unsigned long long>(s.kept[e]));
        }
      }
    }
    team_sync();
    for (int e = threadIdx.x; e < E; e += kThreads) {
      int64_t before = 0;
      const int owner = p.owner[e], local = p.local_index[e];
      for (int e2 = 0; e2 < E; ++e2)
        if (p.owner[e2] == owner && p.local_index[e2] < local) before += WorkspaceLayout::segment_span(s.kept[e2]);
      s.psum[e] = static_cast<int32_t>(before);
    }
    team_sync();
    const bool planted = p.flag_before_data;
    if (c == 0 && lead) {
      // Experts this rank sends nothing to still get their {epoch, 0} flag (from chunk 0); with
      // the planted fault every flag is raised here, before any row is written.
      for (int e = threadIdx.x; e < E; e += kThreads)
        if (s.kept[e] == 0 || planted) signal_dispatch(ctx, e, s.kept[e], s.psum[e]);
      if (planted) {
        const uint64_t start = global_ns();
        while (global_ns() - start < 2000000ull) __nanosleep(1000);
      }
    }
    // Slots: warp j ranks choice j over the chunk's tokens in token order.
    const int64_t t0 = begin + c * kChunk;
    const int64_t rows = tokens > 0 ? (tokens - c * kChunk < kChunk ? tokens - c * kChunk : int64_t(kChunk)) : int64_t(0);
    for (int j = warp; j < k; j += kWarps) {
      for (int e = lane; e < E; e += 32) s.running[warp][e] = 0;
      __syncwarp();
      for (int g = 0; g < kChunk / 32; ++g) {
        const int64_t i_local = g * 32 + lane;
        const int64_t t = t0 + i_local;
        const int32_t e = i_local < rows ? p.r.idx[t * k + j] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank_in = __popc(peers & ((1u << lane) - 1u));
        const int32_t base = e >= 0 ? s.running[warp][e] : 0;
        __syncwarp();
        if (e >= 0 && rank_in == 0) s.running[warp][e] = base + __popc(peers);
        __syncwarp();
        if (i_local >= rows) continue;
        const int slot = i_local * k + j;
        if (e < 0) {
          if (lead) p.r.kept[t * k + j] = 0;
          s.list_dst[slot] = -1;
          continue;
        }
        const int64_t pos = static_cast<int64_t>(s.base[j][e]) + base + rank_in;
        const bool kept = pos < cap;
        if (lead) p.r.kept[t * k + j] = kept ? 1 : 0;
        if (kept) {
          s.list_dst[slot] = static_cast<int32_t>(p.layout.recv_row(r, p.local_index[e], s.psum[e], pos));
          if (lead && ctx.gin_on) p.sent_row[t * k + j] = s.list_dst[slot];
          s.list_owner[slot] = p.owner[e];
          if ((slot / kWarps) % parts == part) atomicAdd(&s.written[e], 1);  // this part copies it
        } else {
          s.list_dst[slot] = -1;
        }
      }
    }
    team_sync();
    // Rows (16-B vectors when aligned) and their token·k + j, one warp per row.
    const uint64_t copy_start = global_ns();
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    for (int64_t i = part * kWarps + warp; i < rows * k; i += parts * kWarps) {
      const int32_t dst = s.list_dst[i];
      if (dst < 0) continue;
      const int64_t t = t0 + i / k;
      const int owner = s.list_owner[i];
      // A remote owner's rows are staged here (out_rows / out_meta), put with the flag.
      const bool staged = ctx.remote(owner);
      unsigned char* h = staged ? ctx.heap(r) : ctx.heap(owner);
      const int64_t row = staged ? p.layout.out_row(owner, r, dst) : dst;
      T* out = reinterpret_cast<T*>(h + (staged ? p.layout.out_rows.offset : p.layout.recv_rows.offset) + row * row_bytes);
      const T* in = p.x + t * H;
      if (p.aligned && H % kVec == 0) {
        // 8 loads in flight per lane before their stores (a warp moves 4 KB per step).
        constexpr int kUnroll = 8, kStep = 32 * kVec;
        int64_t col = lane * kVec;
        for (; col + (kUnroll - 1) * kStep < H; col += kUnroll * kStep) {
          uint4 v[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) v[u] = *reinterpret_cast<const uint4*>(in + col + u * kStep);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) *reinterpret_cast<uint4*>(out + col + u * kStep) = v[u];
        }
        for (; col < H; col += kStep) *reinterpret_cast<uint4*>(out + col) = *reinterpret_cast<const uint4*>(in + col);
      } else {
        for (int64_t col = lane; col < H; col += 32) out[col] = in[col];
      }
      if (lane == 0)
        reinterpret_cast<int32_t*>(h + (staged ? p.layout.out_meta.offset : p.layout.recv_meta.offset))[row] =
            static_cast<int32_t>((t - begin) * k + i % k);
    }
    fence_proxy_async();  // the owner's GEMM may read the rows with TMA
    __threadfence_system();
    team_sync();
    if (threadIdx.x == 0) ctx.record(kEventDispatchCopy, copy_start);
    if (!planted) {
      for (int e = threadIdx.x; e < E; e += kThreads) {
        const int32_t n = s.written[e];
        if (n == 0) continue;
        uint32_t* counter = p.dispatch_written + static_cast<int64_t>(r) * E + e;
        const uint32_t before = atomicAdd(counter, static_cast<uint32_t>(n));
        if (static_cast<int64_t>(before) + n == s.kept[e]) {  // this block completed (r, e)
          *counter = 0;  // nobody adds to it again in this launch
          __threadfence_system();
          signal_dispatch(ctx, e, s.kept[e], s.psum[e]);
        }
      }
    }
    team_sync();
  }
}

// --------------------------------------------------------------------------- expert tasks --
// Column tiles of GEMM0 (over the I outputs) and GEMM1 (over H); the widths depend on the
// engine (Params::tile_n0 / tile_n1).
template <class T>
__device__ __forceinline__ int n_tiles0(const Params<T>& p) {
  return static_cast<int>((p.ffn + p.tile_n0 - 1) / p.tile_n0);
}
template <class T>
__device__ __forceinline__ int n_tiles1(const Params<T>& p) {
  return static_cast<int>((p.hidden + p.tile_n1 - 1) / p.tile_n1);
}
template <class T>
__device__ __forceinline__ int shared_n_tiles0(const Params<T>& p) {
  return static_cast<int>((p.shared_ffn + p.tile_n0 - 1) / p.tile_n0);
}
// Segments of a rank: its S shared experts, then W sources x its local experts.
template <class T, bool G>
__device__ __forceinline__ uint32_t rank_segments(const Ctx<T, G>& ctx) {
  return static_cast<uint32_t>(ctx.p.num_shared + ctx.p.world * ctx.p.num_local[ctx.rank]);
}

// Reserves `count` queue slots and publishes tasks produced by make(i).
template <class T, class Make, bool G>
__device__ void push_tasks(const Ctx<T, G>& ctx, int count, Make make) {
  const Params<T>& p = ctx.p;
  RankControl& ctl = p.control[ctx.rank];
  const uint32_t first = atomicAdd(&ctl.q_tail, static_cast<uint32_t>(count));
  Task* tasks = p.tasks + static_cast<int64_t>(ctx.rank) * p.task_capacity;
  uint32_t* ready = p.task_ready + static_cast<int64_t>(ctx.rank) * p.task_capacity;
  for (int i = 0; i < count; ++i) tasks[first + i] = make(i);
  // One fence orders every task before every ready word (a release per word would serialise).
  __threadfence();
  for (int i = 0; i < count; ++i) reinterpret_cast<volatile uint32_t*>(ready)[first + i] = ctx.epoch;
}

// Thread 0 of the block: claims and handles one segment. Returns false when none is left.
template <class T, bool G>
__device__ bool claim_segment(const Ctx<T, G>& ctx) {
  const Params<T>& p = ctx.p;
  RankControl& ctl = p.control[ctx.rank];
  const int W = p.world;
  const int nl = p.num_local[ctx.rank];
  const uint32_t segments = rank_segments(ctx);
  if (ld_acquire_gpu(&ctl.seg_next) >= segments) return false;
  uint32_t claimed = atomicAdd(&ctl.seg_next, 1u);
  if (claimed >= segments) return false;
  if (claimed < static_cast<uint32_t>(p.num_shared)) {
    // A shared expert: GEMM0 tasks over the rank's tokens, nothing to wait for.
    const int64_t tokens = ctx.rank_tokens();
    const int m_tiles = static_cast<int>((tokens + kTileM - 1) / kTileM), n0 = shared_n_tiles0(p);
    const uint32_t total = static_cast<uint32_t>(m_tiles) * static_cast<uint32_t>(n0 + n_tiles1(p));
    if (total > 0) {
      atomicAdd(&ctl.total_tasks, total);
      push_tasks(ctx, m_tiles * n0, [&](int i) {
        const int m = i % m_tiles, n = i / m_tiles;
        return Task{static_cast<int32_t>(int64_t(m) * kTileM), static_cast<int32_t>(tokens),
                    kSharedBit | static_cast<int32_t>(claimed), (m << 16) | n};
      });
    }
    __threadfence();
    atomicAdd(&ctl.segs_done, 1u);
    return true;
  }
  claimed -= static_cast<uint32_t>(p.num_shared);
  // Order: our own rows first, then the other sources.
  const int source = (ctx.rank + static_cast<int>(claimed) / nl) % W;
  const int local = static_cast<int>(claimed) % nl;
  uint64_t flag = 0;
  int64_t psum = 0;
  const bool dropless = p.layout.p.capacity == 0;
  bool ok = true;
  for (int l = dropless ? 0 : local; l <= local && ok; ++l) {
    ok = ctx.wait_dispatch(source, l, &flag);
    if (ok && l < local) psum += WorkspaceLayout::segment_span(flag_count(flag));
  }
  uint32_t total = 0;
  if (ok) {
    const int64_t count = flag_count(flag);
    const int64_t first = p.layout.recv_row(source, local, psum, 0);
    const int m_tiles = static_cast<int>((count + kTileM - 1) / kTileM);
    const int n0 = n_tiles0(p);
    total = static_cast<uint32_t>(m_tiles) * static_cast<uint32_t>(n0 + n_tiles1(p));
    const int seg = source * p.max_local + local;
    if (total > 0) {
      atomicAdd(&ctl.total_tasks, total);
      push_tasks(ctx, m_tiles * n0, [&](int i) {
        const int m = i % m_tiles, n = i / m_tiles;
        return Task{static_cast<int32_t>(first + int64_t(m) * kTileM), static_cast<int32_t>(first + count), seg,
                    (m << 16) | n};
      });
    }
  }
  __threadfence();
  atomicAdd(&ctl.segs_done, 1u);
  return true;
}

// A task's coordinates: the segment's source rank and local expert, the global expert, the tile.
struct TaskView {
  int source, local, expert, m_tile, n_tile;  // shared: source = this rank, local = expert = s
  bool gemm1, shared;
  int64_t rows;  // rows of the tile (<= kTileM)
};
template <class T, bool G>
__device__ __forceinline__ TaskView view_of(const Ctx<T, G>& ctx, const Task& task) {
  const Params<T>& p = ctx.p;
  const int seg = task.seg & ~(kGemm1Bit | kSharedBit);
  TaskView v;
  v.shared = (task.seg & kSharedBit) != 0;
  if (v.shared) {  // shared expert `seg` (weights: shared_w1/w2[seg]), this rank's own rows
    v.source = ctx.rank;
    v.local = seg;
    v.expert = seg;
  } else {
    v.source = seg / p.max_local;
    v.local = seg % p.max_local;
    v.expert = p.weight_experts != p.num_experts ? v.local : p.global_expert[ctx.rank * p.max_local + v.local];
  }
  v.m_tile = task.tile >> 16;
  v.n_tile = task.tile & 0xffff;
  v.gemm1 = (task.seg & kGemm1Bit) != 0;
  const int64_t left = static_cast<int64_t>(task.row_end) - task.row_begin;
  v.rows = left < kTileM ? left : static_cast<int64_t>(kTileM);
  return v;
}

template <class T, bool G>
__device__ void run_gemm0(const Ctx<T, G>& ctx, SharedUnion<T>& sm, const Task& task) {
  const Params<T>& p = ctx.p;
  const TaskView v = view_of(ctx, task);
  const int e = v.expert, n_tile = v.n_tile;
  const int64_t H = p.hidden, I = v.shared ? p.shared_ffn : p.ffn, N1 = v.shared ? p.shared_in : p.ffn_in;
  const int64_t rows = v.rows;
  unsigned char* h = ctx.heap(ctx.rank);
  // Routed: the rank's received rows into hidden. Shared: its tokens of x into shared_hidden.
  const T* a = v.shared ? p.x + (p.rank_begin[ctx.rank] + task.row_begin) * H
                        : reinterpret_cast<const T*>(h + p.layout.recv_rows.offset) + task.row_begin * H;
  T* hidden = v.shared ? ctx.shared_hidden(e) : reinterpret_cast<T*>(h + p.layout.hidden.offset);
  const T* w1 = (v.shared ? p.shared_w1 : p.w1) + static_cast<int64_t>(e) * H * N1;
  const T* bias1 = v.shared ? p.shared_b1 : p.b1;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec_a = p.aligned && H % kVec == 0, vec_b = p.aligned && N1 % kVec == 0 && I % kVec == 0;
  Frag<T> acc[4][2];
  const int warp = threadIdx.x / 32, warp_m = warp / 4, warp_n = warp % 4;
  if (p.gated) {
    // 64 output columns: tile column c -> block c / 16; even blocks gate, odd blocks up.
    const int64_t i0 = static_cast<int64_t>(n_tile) * 64;
    auto col_of = [&](int c) -> int64_t {
      const int64_t col = i0 + (c / 32) * 16 + c % 16;
      if (col >= I) return -1;
      return ((c / 16) % 2 == 0) ? col : I + col;
    };
    mma_tile<T, true>(sm.gemm, a, H, rows, H, vec_a, [&](int64_t k0) { load_b_rows(sm.gemm, w1, N1, k0, H, col_of, vec_b); },
                      acc);
    const T* b1 = bias1 ? bias1 + static_cast<int64_t>(e) * N1 : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // acc[i][0] holds gate columns i0 + warp_n*16 + [0,16), acc[i][1] the same up columns.
      const int64_t col_base = i0 + warp_n * 16;
      // Element q of both fragments is the same (row, column): the gate/up pair. The fragment
      // hides the column, so with biases both halves go through the staging tile instead.
      Frag<T> out = acc[i][0];
      if (b1 == nullptr) {
#pragma unroll
        for (int q = 0; q < out.num_elements; ++q) out.x[q] = act_of(p.ffn_kind, acc[i][0].x[q]) * acc[i][1].x[q];
        store_frag(sm.gemm, out, warp_m * 64 + i * 16, 0, [&](int row, int col, float v) {
          const int64_t gc = col_base + col;
          if (row < rows && gc < I) hidden[(task.row_begin + row) * I + gc] = from_f32<T>(v);
        });
      } else {
        // With b1: stage the up half, then combine per element with the biases.
        store_frag(sm.gemm, acc[i][1], warp_m * 64 + i * 16, 0, [&](int row, int col, float v) {
          const int64_t gc = col_base + col;
          if (row < rows && gc < I) hidden[(task.row_begin + row) * I + gc] = from_f32<T>(v + to_f32(b1[I + gc]));
        });
        __syncwarp();
        store_frag(sm.gemm, acc[i][0], warp_m * 64 + i * 16, 0, [&](int row, int col, float v) {
          const int64_t gc = col_base + col;
          if (row < rows && gc < I) {
            T* dst = hidden + (task.row_begin + row) * I + gc;
            *dst = from_f32<T>(act_of(p.ffn_kind, v + to_f32(b1[gc])) * to_f32(*dst));
          }
        });
      }
    }
  } else {
    const int64_t n0 = static_cast<int64_t>(n_tile) * kTileN;
    auto col_of = [&](int c) -> int64_t { return n0 + c < I ? n0 + c : -1; };
    mma_tile<T, true>(sm.gemm, a, H, rows, H, vec_a, [&](int64_t k0) { load_b_rows(sm.gemm, w1, N1, k0, H, col_of, vec_b); },
                      acc);
    const T* b1 = bias1 ? bias1 + static_cast<int64_t>(e) * N1 : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        store_frag(sm.gemm, acc[i][j], warp_m * 64 + i * 16, warp_n * 32 + j * 16, [&](int row, int col, float v) {
          const int64_t gc = n0 + col;
          if (row < rows && gc < I) {
            if (b1) v += to_f32(b1[gc]);
            hidden[(task.row_begin + row) * I + gc] = from_f32<T>(act_of(p.ffn_kind, v));
          }
        });
  }
}

template <class T, bool G>
__device__ void run_gemm1(const Ctx<T, G>& ctx, SharedUnion<T>& sm, const Task& task) {
  const Params<T>& p = ctx.p;
  const TaskView v = view_of(ctx, task);
  const int e = v.expert, n_tile = v.n_tile;
  const int64_t H = p.hidden, I = v.shared ? p.shared_ffn : p.ffn, rows = v.rows;
  unsigned char* h = ctx.heap(ctx.rank);
  // Routed: rows back into the source's ret_rows through recv_meta. Shared: shared_out, in order.
  const T* a = (v.shared ? ctx.shared_hidden(e) : reinterpret_cast<const T*>(h + p.layout.hidden.offset)) +
               task.row_begin * I;
  const int32_t* meta = reinterpret_cast<const int32_t*>(h + p.layout.recv_meta.offset);
  // A remote source's rows are staged in out_ret at their recv_rows index (gin_link.cuh).
  const bool staged = !v.shared && ctx.remote(v.source);
  T* ret = v.shared ? ctx.shared_out(e)
                    : reinterpret_cast<T*>(staged ? h + p.layout.out_ret.offset
                                                  : ctx.heap(v.source) + p.layout.ret_rows.offset);
  const T* w2 = (v.shared ? p.shared_w2 : p.w2) + static_cast<int64_t>(e) * I * H;
  const T* bias2 = v.shared ? p.shared_b2 : p.b2;
  const T* b2 = bias2 ? bias2 + static_cast<int64_t>(e) * H : nullptr;
  const bool in_order = v.shared || staged;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int64_t n0 = static_cast<int64_t>(n_tile) * kTileN;
  auto col_of = [&](int c) -> int64_t { return n0 + c < H ? n0 + c : -1; };
  Frag<T> acc[4][2];
  mma_tile<T, true>(sm.gemm, a, I, rows, I, p.aligned && I % kVec == 0,
                    [&](int64_t k0) { load_b_rows(sm.gemm, w2, H, k0, I, col_of, p.aligned && H % kVec == 0); }, acc);
  const int warp = threadIdx.x / 32, warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      store_frag(sm.gemm, acc[i][j], warp_m * 64 + i * 16, warp_n * 32 + j * 16, [&](int row, int col, float v) {
        const int64_t gc = n0 + col;
        if (row < rows && gc < H) {
          if (b2) v += to_f32(b2[gc]);
          const int64_t out_row = in_order ? task.row_begin + row : static_cast<int64_t>(meta[task.row_begin + row]);
          ret[out_row * H + gc] = from_f32<T>(v);
        }
      });
}

// After a task: dependency counters, GEMM1 pushes and return flags (thread 0).
template <class T, bool G>
__device__ void finish_task(const Ctx<T, G>& ctx, const Task& task) {
  const Params<T>& p = ctx.p;
  const int source = task.seg / p.max_local, local = task.seg % p.max_local;
  const int m_tile = task.tile >> 16;
  if (task.seg & kSharedBit) {
    // Shared expert s: its GEMM1 tasks once all its GEMM0 tiles are done; its GEMM1 tiles are
    // counted for the rank's combine. The counters live in RankControl (reset at launch end).
    RankControl& ctl = p.control[ctx.rank];
    const int s = task.seg & 0xffff;
    const int m_tiles = static_cast<int>((task.row_end + kTileM - 1) / kTileM);
    __threadfence();
    if (!(task.seg & kGemm1Bit)) {
      const uint32_t done = atomicAdd(&ctl.shared_gemm0[s], 1u) + 1u;
      if (done == static_cast<uint32_t>(m_tiles * shared_n_tiles0(p)))
        push_tasks(ctx, m_tiles * n_tiles1(p), [&](int i) {
          const int m = i % m_tiles, n = i / m_tiles;
          return Task{static_cast<int32_t>(int64_t(m) * kTileM), task.row_end, task.seg | kGemm1Bit, (m << 16) | n};
        });
    } else if (!p.drop_shared_tiles) {
      atomicAdd(&ctl.shared_gemm1, 1u);
    }
    return;
  }
  if (!(task.seg & kGemm1Bit)) {
    // GEMM1 of a segment starts when all its GEMM0 tiles are done (one counter per segment), and
    // its tasks are queued row tile fastest: tiles that share a column block of w2[e] run
    // together, so that block is read from HBM once, not once per row tile.
    uint32_t* counters = reinterpret_cast<uint32_t*>(ctx.heap(ctx.rank) + p.layout.counters.offset);
    uint32_t* counter = counters + p.layout.counter_index(source, local, 0);
    const int64_t seg_begin = task.row_begin - static_cast<int64_t>(m_tile) * kTileM;
    const int m_tiles = static_cast<int>((task.row_end - seg_begin + kTileM - 1) / kTileM);
    __threadfence();
    const uint32_t done = atomicAdd(counter, 1u) + 1u;
    if (done == static_cast<uint32_t>(m_tiles * n_tiles0(p))) {
      *counter = 0;
      __threadfence();
      push_tasks(ctx, m_tiles * n_tiles1(p), [&](int i) {
        const int m = i % m_tiles, n = i / m_tiles;
        return Task{static_cast<int32_t>(seg_begin + int64_t(m) * kTileM), task.row_end, task.seg | kGemm1Bit,
                    (m << 16) | n};
      });
    }
  } else {
    const int seg = task.seg & ~kGemm1Bit;
    const int src = seg / p.max_local, loc = seg % p.max_local;
    uint32_t* counter = p.seg_done + static_cast<int64_t>(ctx.rank) * p.world * p.max_local + seg;
    // Rows of the segment: the row tile's end is the segment's end; its start is recovered from
    // the tile: row_begin - m_tile * 128 is the segment's first row.
    const int64_t seg_begin = task.row_begin - static_cast<int64_t>(m_tile) * kTileM;
    const int64_t count = task.row_end - seg_begin;
    const uint32_t m_tiles = static_cast<uint32_t>((count + kTileM - 1) / kTileM);
    __threadfence_system();
    const uint32_t done = atomicAdd(counter, 1u) + 1u;
    if (done == m_tiles * static_cast<uint32_t>(n_tiles1(p))) {
      *counter = 0;
      __threadfence_system();
      const int e = p.global_expert[ctx.rank * p.max_local + loc];
      const uint64_t flag = make_flag(ctx.epoch, static_cast<uint32_t>(count));
      if (ctx.remote(src)) {  // the segment's staged results in one put, then the flag
        const WorkspaceLayout& l = p.layout;
        const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
        gin_publish(p.gin, src, ctx.heap(ctx.rank), ctx.heap(src), l.gin_return_signal(ctx.rank, loc),
                    ctx.gin_sent(l.gin_sent_return(src, loc)), flag,
                    l.ret_recv.offset + l.ret_recv_row(ctx.rank, src, seg_begin) * row_bytes,
                    l.out_ret.offset + seg_begin * row_bytes, count * row_bytes);
      } else {
        st_release_sys(ctx.ret_flag(src, e), flag);
      }
    }
  }
}

// Thread 0 of a block (portable kernel) or the scheduler thread (Hopper kernel): the block's
// next step. kRun: *task is a task to run; kSegment: a segment was claimed and its tasks pushed
// (ask again); kExit: every segment is claimed and every task index is taken (or the launch
// aborted).
enum NextStep : int32_t { kRun = 0, kExit = 1, kSegment = 2 };

template <class T, bool G>
__device__ int32_t next_step(const Ctx<T, G>& ctx, Task* task) {
  const Params<T>& p = ctx.p;
  RankControl& ctl = p.control[ctx.rank];
  if (ctx.aborted()) return kExit;
  if (claim_segment(ctx)) return kSegment;
  const uint32_t segments = rank_segments(ctx);
  const Task* tasks = p.tasks + static_cast<int64_t>(ctx.rank) * p.task_capacity;
  const uint32_t* ready = p.task_ready + static_cast<int64_t>(ctx.rank) * p.task_capacity;
  // Indices past the queue's capacity (more blocks than tasks) can never hold a task: those
  // blocks only wait for the final task count.
  const uint32_t index = atomicAdd(&ctl.q_head, 1u);
  const bool in_queue = index < static_cast<uint64_t>(p.task_capacity);
  uint64_t start = global_ns();
  for (uint32_t spins = 0;; ++spins) {
    if (in_queue && ld_acquire_gpu(ready + index) == ctx.epoch) {
      *task = tasks[index];
      return kRun;
    }
    const bool counted = ld_acquire_gpu(&ctl.segs_done) == segments;
    if (counted && index >= ld_acquire_gpu(&ctl.total_tasks)) return kExit;
    if ((spins & 31u) == 31u) {
      if (ctx.aborted()) return kExit;
      // While segments are still being claimed, the claimers' own bounded waits report a
      // missing flag; the slot's clock starts once every task is counted.
      if (!counted) start = global_ns();
      const uint64_t waited = global_ns() - start;
      if (waited > p.timeout_ns) {
        ctx.fail(kTimeout, kQueueSlot, index, 0, ctx.epoch, in_queue ? ready[index] : 0, waited);
        return kExit;
      }
      __nanosleep(32);
    }
  }
}

// The portable engine: every task runs on the whole block (256 threads, mma.sync tiles).
template <class T, bool G>
__device__ void expert_phase(const Ctx<T, G>& ctx, SharedUnion<T>& sm, TaskSmem& ts) {
  for (;;) {
    if (threadIdx.x == 0) ts.state = next_step(ctx, &ts.task);
    __syncthreads();
    const int32_t state = ts.state;
    const Task task = ts.task;
    __syncthreads();
    if (state == kExit) break;
    if (state == kSegment) continue;
    const uint64_t start = global_ns();
    if (task.seg & kGemm1Bit) run_gemm1(ctx, sm, task);
    else run_gemm0(ctx, sm, task);
    __syncthreads();
    if (threadIdx.x == 0) {
      ctx.record((task.seg & kGemm1Bit) ? kEventGemm1 : kEventGemm0, start);
      finish_task(ctx, task);
    }
  }
}

// One token's output row y = sum_j w_j * rows[j] (fp32, fixed j order) by one warp, 16-B
// vectors: G column steps of the warp at once, so G * K loads are in flight per lane (the
// combine is bound by memory latency otherwise). rows: the token's K returned rows [K][H];
// shared: the token's row of shared expert 0's output, num_shared rows shared_stride apart
// (added with weight 1 after the routed rows).
template <class T, int K>
__device__ __forceinline__ void combine_row(const T* rows, const float (&w)[kMaxTopK], const bool (&use)[kMaxTopK],
                                            const T* shared, int num_shared, int64_t shared_stride, T* y, int64_t H,
                                            int lane) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kStep = 32 * kVec;
  constexpr int G = K <= 4 ? 4 : 2;
  for (int64_t col0 = lane * kVec; col0 < H; col0 += G * kStep) {
    uint4 v[G][K];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t col = col0 + g * kStep;
        v[g][j] = use[j] && col < H ? *reinterpret_cast<const uint4*>(rows + j * H + col) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t col = col0 + g * kStep;
      if (col >= H) break;
      float acc[kVec];
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc[q] = 0.f;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (!use[j]) continue;
        const T* x = reinterpret_cast<const T*>(&v[g][j]);
#pragma unroll
        for (int q = 0; q < kVec; ++q) acc[q] = fmaf(w[j], to_f32(x[q]), acc[q]);
      }
      for (int s = 0; s < num_shared; ++s) {
        const uint4 u = *reinterpret_cast<const uint4*>(shared + s * shared_stride + col);
        const T* x = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int q = 0; q < kVec; ++q) acc[q] += to_f32(x[q]);
      }
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int q = 0; q < kVec; ++q) o[q] = from_f32<T>(acc[q]);
      *reinterpret_cast<uint4*>(y + col) = out;
    }
  }
}

template <class T, bool G>
__device__ void combine_phase(const Ctx<T, G>& ctx) {
  const Params<T>& p = ctx.p;
  const int r = ctx.rank, k = p.top_k, E = p.num_experts;
  const int64_t begin = p.rank_begin[r], tokens = p.rank_begin[r + 1] - begin, H = p.hidden;
  // Every warp of the block: the Hopper kernel's producer warpgroup, idle here, adds half as
  // many tokens in flight (a warp's token waits on its loads one row segment after the other).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = static_cast<int>(blockDim.x) / 32;
  const T* ret = reinterpret_cast<const T*>(ctx.heap(r) + p.layout.ret_rows.offset);
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  // The kept flags of the rank's tokens are written by every block of the rank in P2.
  const int S = p.num_shared;
  const int64_t shared_stride = p.shared_rows_cap * H;
  if (threadIdx.x == 0) {
    ctx.wait_count(&p.control[r].dispatched, static_cast<uint32_t>(ctx.blocks_per_rank), kRankBarrier, r);
    // Every shared-expert GEMM1 tile of the rank (S x m tiles x n tiles) is written.
    const int64_t shared_tiles = static_cast<int64_t>(S) * ((tokens + kTileM - 1) / kTileM) * n_tiles1(p);
    if (shared_tiles > 0) ctx.wait_count(&p.control[r].shared_gemm1, static_cast<uint32_t>(shared_tiles), kSharedTiles, r);
  }
  __syncthreads();
  if (ctx.aborted()) return;
  for (int64_t t = static_cast<int64_t>(ctx.local_block) * warps + warp; t < tokens;
       t += static_cast<int64_t>(ctx.blocks_per_rank) * warps) {
    const int64_t g = begin + t;
    bool ok = true;
    if (lane < k) {
      const int32_t e = p.r.idx[g * k + lane];
      if (e >= 0 && p.r.kept[g * k + lane]) {
        uint64_t flag = 0;
        ok = ctx.wait_return(e, &flag);
        const int64_t expected = p.kept_rank[static_cast<int64_t>(r) * E + e];
        if (ok && flag_count(flag) != static_cast<uint32_t>(expected)) {
          ctx.fail(kCountMismatch, kReturnFlag, e, 0, static_cast<uint32_t>(expected), flag, 0);
          ok = false;
        }
      }
    }
    if (__any_sync(0xffffffffu, !ok)) return;
    float w[kMaxTopK];
    bool use[kMaxTopK];
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      use[j] = j < k && p.r.idx[g * k + j] >= 0 && p.r.kept[g * k + j];
      w[j] = use[j] ? p.r.weight[g * k + j] : 0.f;
    }
    const T* shared = S > 0 ? ctx.shared_out(0) + t * H : nullptr;
    if (p.aligned && H % kVec == 0 && !ctx.gin_on) {
      switch (k) {
        case 1: combine_row<T, 1>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 2: combine_row<T, 2>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 3: combine_row<T, 3>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 4: combine_row<T, 4>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 5: combine_row<T, 5>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 6: combine_row<T, 6>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        case 7: combine_row<T, 7>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
        default: combine_row<T, 8>(ret + t * k * H, w, use, shared, S, shared_stride, p.y + g * H, H, lane); break;
      }
    } else {
      // Rows from remote owners (GIN) are in ret_recv, at the index the dispatch recorded.
      const T* row[kMaxTopK];
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        row[j] = ret + (t * k + j) * H;
        const int owner = use[j] ? p.owner[p.r.idx[g * k + j]] : 0;
        if (use[j] && ctx.remote(owner)) {
          row[j] = reinterpret_cast<const T*>(ctx.heap(r) + p.layout.ret_recv.offset) +
                   p.layout.ret_recv_row(owner, r, p.sent_row[g * k + j]) * H;
        }
      }
      for (int64_t col = lane; col < H; col += 32) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < kMaxTopK; ++j)
          if (use[j]) acc = fmaf(w[j], to_f32(row[j][col]), acc);
        for (int s = 0; s < S; ++s) acc += to_f32(shared[s * shared_stride + col]);
        p.y[g * H + col] = from_f32<T>(acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------- kernel --
// The body shared by both kernels. Engine::expert_phase(ctx, smem_raw) runs P3 on the whole
// block; P1 and P2 run on threads 0 .. kThreads-1 (team_sync), P4 on all; other threads only meet
// the block-wide barriers between the phases.
template <bool kGin, class T, class Engine>
__device__ __forceinline__ void fused_forward(const Params<T>& p, unsigned char* smem_raw, const Engine& engine) {
  auto& sm = *reinterpret_cast<SharedUnion<T>*>(smem_raw);
  const bool team = threadIdx.x < kThreads;
  const int blocks_per_rank = static_cast<int>(gridDim.x) / p.grid_ranks;
  uint32_t epoch = *reinterpret_cast<volatile uint32_t*>(p.epoch_word) + 1u;
  if (epoch == 0) epoch = 1;
  const Ctx<T, kGin> ctx{p, epoch, p.rank_base + static_cast<int>(blockIdx.x) / blocks_per_rank, blocks_per_rank,
                         static_cast<int>(blockIdx.x) % blocks_per_rank};
  RankControl& ctl = p.control[ctx.rank];

  uint64_t start = global_ns();
  engine.init_barriers(smem_raw);
  engine.router_phase(ctx, smem_raw);
  // The one barrier: rank r's P1 (counts of every chunk) before its slots.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    ctx.record(kEventRouter, start);
    atomicAdd(&ctl.barrier, 1u);
    ctx.wait_count(&ctl.barrier, static_cast<uint32_t>(blocks_per_rank), kRankBarrier, ctx.rank);
  }
  // Whether the launch has failed is one decision for the whole block (a block-wide vote): the
  // phases meet at team barriers, and a thread that skipped one on an abort word raised between
  // two threads' reads would leave the others waiting there.
  const bool failed_before_dispatch = __syncthreads_or(ctx.aborted()) != 0;
  start = global_ns();
  if (team && !failed_before_dispatch && ctx.rank != p.silent_rank) dispatch_phase(ctx, sm);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    ctx.record(kEventDispatch, start);
    atomicAdd(&ctl.dispatched, 1u);
  }
  engine.expert_phase(ctx, smem_raw);
  const bool failed_before_combine = __syncthreads_or(ctx.aborted()) != 0;  // one decision, as above
  start = global_ns();
  if (!failed_before_combine) combine_phase(ctx);  // every thread of the block

  // The last block of the launch hands out the expert counts and zeroes them, resets the
  // control words and publishes the next epoch.
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    ctx.record(kEventCombine, start);
    __threadfence();
    last = atomicAdd(p.blocks_done, 1u) + 1u == gridDim.x;
  }
  // (Broadcast by the barrier: a static __shared__ variable would move the dynamic shared
  // memory off the alignment that the Hopper engine's swizzled tiles need.)
  const bool last_block = __syncthreads_or(last) != 0;
  if (last_block) {
    __threadfence();
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {  // only atomics wrote them: L2
      p.routed_out[e] = static_cast<int64_t>(__ldcg(p.routed + e));
      p.kept_out[e] = static_cast<int64_t>(__ldcg(p.kept_total + e));
      p.routed[e] = 0;
      p.kept_total[e] = 0;
    }
  }
  if (threadIdx.x == 0) {
    if (last_block) {
      for (int q = 0; q < p.world; ++q) p.control[q] = RankControl{};
      *p.blocks_done = 0;
      __threadfence();
      *reinterpret_cast<volatile uint32_t*>(p.epoch_word) = epoch;
      // This grid's ranks announce the end of the launch in every rank's heap (failed or not: a
      // failure is raised on the host, and the next launch must not wait for this one). With
      // emulated ranks the whole workspace's slots: a later layer of a larger world on the same
      // workspace waits for ranks this launch did not have (one grid ran them all: all ended).
      __threadfence_system();
      const bool emulated = p.grid_ranks == p.world;
      const int slots = emulated ? p.launch_slots : p.world;
      for (int s = emulated ? 0 : p.rank_base; s < (emulated ? slots : p.rank_base + p.grid_ranks); ++s) {
        if (s == p.unfinished_rank) continue;
        for (int q = 0; q < slots; ++q) {
          if (kGin && s < p.world && q < p.world && p.gin.remote(s, q)) {
            const WorkspaceLayout& l = p.layout;
            gin_publish(p.gin, q, ctx.heap(s), ctx.heap(q), l.gin_launch_signal(s),
                        reinterpret_cast<uint64_t*>(ctx.heap(s) + l.gin_sent.offset) + l.gin_sent_launch(q),
                        make_flag(epoch, 0));
          } else {
            st_release_sys(ctx.launch_flag(q, s), make_flag(epoch, 0));
          }
        }
      }
    }
  }
}

template <class T>
struct PortableEngine {
  __device__ void init_barriers(unsigned char*) const {}
  template <bool G>
  __device__ void router_phase(const Ctx<T, G>& ctx, unsigned char* smem_raw) const {
    fusedmoe::cuda::fused::router_phase<RouterPipe<T>>(ctx, *reinterpret_cast<SharedUnion<T>*>(smem_raw));
  }
  template <bool G>
  __device__ void expert_phase(const Ctx<T, G>& ctx, unsigned char* smem_raw) const {
    auto& sm = *reinterpret_cast<SharedUnion<T>*>(smem_raw);
    auto& ts = *reinterpret_cast<TaskSmem*>(smem_raw + sizeof(SharedUnion<T>));
    fusedmoe::cuda::fused::expert_phase(ctx, sm, ts);
  }
  static constexpr size_t smem_bytes() { return sizeof(SharedUnion<T>) + sizeof(TaskSmem); }
};

// The portable kernel (any GPU of compute capability >= 8.0; fp32 as TF32).
// kGin: built with the GIN paths (a world with ranks on other nodes), else without them.
template <class T, bool kGin>
__global__ void __launch_bounds__(kThreads) fused_moe_kernel(const __grid_constant__ Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  fused_forward<kGin>(p, smem_raw, PortableEngine<T>{});
}

}  // namespace fusedmoe::cuda::fused
