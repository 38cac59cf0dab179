// src/cuda/fused/fused_backend.cu — Backend::kFused: the forward of the whole layer as ONE
// cooperative launch of the persistent kernel (fused_kernel.cuh), for W ranks emulated on one
// GPU (W slices of the grid over W symmetric heaps of one allocation). Backward (W = 1) runs the
// modular CUDA backend, which recomputes the same routing.
//
// Engines: on an sm_90 GPU, bf16/fp16 with H and I multiples of 8 and 16-B aligned tensors run
// the Hopper kernel (fused_sm90.cuh: wgmma + TMA tiles, 384 threads, one block per SM); every
// other case (fp32 as TF32, other GPUs, odd widths) runs the portable kernel (mma.sync tiles).
//
// State kept across calls (per backend object): the heaps (flags carry the epoch, so they are
// never cleared), the per-rank control words and task queues, the epoch word, the error record.
// The epoch advances on the device, so back-to-back launches and CUDA-graph replays need no
// reset. After a protocol error everything is cleared and the error is raised.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "core/backend.hpp"
#include "cuda/common.cuh"
#include "cuda/fused/fused_kernel.cuh"
#include "cuda/fused/fused_sm90.cuh"
#include "cuda/fused/fused_options.hpp"
#include "cuda/fused/nccl_transport.hpp"
#include "fusedmoe/planner.hpp"
#include "fusedmoe/timeline.hpp"

namespace fusedmoe {
namespace cuda::fused {

namespace {
std::mutex g_options_mutex;
FusedOptions g_options;
}  // namespace

void set_fused_options(const FusedOptions& options) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  g_options = options;
}
FusedOptions fused_options() {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  return g_options;
}

namespace {

// Debug timeline (fusedmoe/timeline.hpp).
constexpr int kTimelineCapacity = 2048;  // records per block
std::mutex g_timeline_mutex;
bool g_timeline_enabled = false;
std::vector<FusedEvent> g_timeline;
int g_timeline_blocks = 0;

template <class T>
const T* cptr(const TensorView& v) { return v.defined() ? static_cast<const T*>(v.data) : nullptr; }

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool resolved_renormalize(const MoeConfig& c) {
  if (c.gate == GateKind::kSwitchTop1) return false;
  if (c.gate == GateKind::kGShardTop2) return true;
  return c.renormalize;
}

const char* what_name(uint32_t what) {
  switch (what) {
    case kDispatchFlag: return "dispatch flag";
    case kReturnFlag: return "return flag";
    case kRankBarrier: return "rank barrier";
    case kQueueSlot: return "task queue slot";
    case kTaskRing: return "scheduler's task ring";
    case kPipelineStage: return "TMA pipeline stage";
    case kSharedTiles: return "shared experts' GEMM1 tiles";
    case kLaunchFlag: return "end of the previous launch";
  }
  return "?";
}

std::string describe(const ErrorRecord& e) {
  std::ostringstream os;
  os << "rank " << e.rank << " (block " << e.block << ") ";
  if (e.code == kCountMismatch) {
    os << "expected " << e.expected << " rows back from expert " << e.a << ", its return flag says "
       << flag_count(e.seen);
    return os.str();
  }
  os << "timed out after " << static_cast<double>(e.waited_ns) / 1e6 << " ms waiting for the " << what_name(e.what);
  if (e.what == kDispatchFlag) os << " (source " << e.a << ", local expert " << e.b << ")";
  if (e.what == kReturnFlag) os << " of expert " << e.a;
  if (e.what == kQueueSlot || e.what == kTaskRing) os << " " << e.a;
  if (e.what == kPipelineStage) os << (e.a == 0 ? " (consumer wait)" : " (producer acquire)");
  if (e.what == kRankBarrier || e.what == kSharedTiles || e.what == kLaunchFlag) os << " of rank " << e.a;
  if (e.what == kTaskRing || e.what == kPipelineStage)
    os << " (phase " << e.expected << ")";
  else if (e.what == kRankBarrier || e.what == kQueueSlot || e.what == kSharedTiles)
    os << ": expected " << e.expected << ", seen " << e.seen;
  else
    os << ": expected epoch " << e.expected << ", last seen flag 0x" << std::hex << e.seen << std::dec << " (epoch "
       << flag_epoch(e.seen) << ", count " << flag_count(e.seen) << ")";
  return os.str();
}

// Switches this thread to relaxed stream-capture mode for its lifetime (when `on`): allocations
// are then allowed while a stream captures (they are not stream work and stay out of the graph).
class RelaxedCaptureMode {
 public:
  explicit RelaxedCaptureMode(bool on) : on_(on) {
    if (on_) FUSEDMOE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_));
  }
  ~RelaxedCaptureMode() {
    if (on_) cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  bool on_;
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Everything that persists between launches, on one device.
// Heaps: local/emulated transport, W heaps of one cudaMalloc (heap q at heaps + q * heap_stride);
// NCCL transport, this rank's heap in an NCCL symmetric window (`shared`: the peers' mappings).
struct Workspace {
  int device = -1;
  size_t heap_stride = 0, heaps_bytes = 0, control_bytes = 0;
  int64_t task_capacity = 0;
  int world = 0, experts = 0, segments = 0;
  uint64_t generation = 0;  // transport generation the heaps belong to
  bool nccl = false;
  SharedHeaps shared;
  unsigned char* heaps = nullptr;
  unsigned char* control = nullptr;  // RankControl[W] | tasks | ready | counters | words | record | expert counts
  ErrorRecord* host_record = nullptr;  // pinned
  cudaEvent_t record_copied = nullptr;
  bool record_pending = false;
  // Where the flags and counters of the last launch were: a launch with another layout finds
  // old rows (any bits) there, which could read as a flag of its epoch, so those sections of
  // the new layout are cleared first.
  std::array<int64_t, 6> protocol_sections{};
  bool protocol_gin = false;  // the last layout had the GIN sections

  RankControl* rank_control() const { return reinterpret_cast<RankControl*>(control); }
  size_t off_tasks() const { return WorkspaceLayout::align_up(sizeof(RankControl) * world, 256); }
  size_t off_ready() const { return off_tasks() + WorkspaceLayout::align_up(sizeof(Task) * world * task_capacity, 256); }
  size_t off_dispatch() const { return off_ready() + WorkspaceLayout::align_up(4 * world * task_capacity, 256); }
  size_t off_seg_done() const { return off_dispatch() + WorkspaceLayout::align_up(4 * world * experts, 256); }
  size_t off_words() const { return off_seg_done() + WorkspaceLayout::align_up(4 * world * segments, 256); }
  size_t off_record() const { return off_words() + 256; }
  size_t off_counters() const { return off_record() + WorkspaceLayout::align_up(sizeof(ErrorRecord), 256); }
  size_t total() const { return off_counters() + WorkspaceLayout::align_up(16 * experts, 256); }
  // [2][experts]: the routed and kept counts a launch accumulates (zeroed by its last block).
  unsigned long long* expert_counters() const {
    return reinterpret_cast<unsigned long long*>(control + off_counters());
  }
  uint32_t* word(int i) const { return reinterpret_cast<uint32_t*>(control + off_words()) + i; }

  TimelineRecord* timeline = nullptr;  // [timeline_blocks][kTimelineCapacity], then counts
  int timeline_blocks = 0;

  // Buffers that captured graphs may still use (see ensure).
  bool captured = false;
  std::vector<void*> retired;
  void retire() {
    if (nccl) {
      release();  // another transport generation: the old window's graphs are invalid anyway
      return;
    }
    for (void* p : {static_cast<void*>(heaps), static_cast<void*>(control)})
      if (p) retired.push_back(p);
    heaps = control = nullptr;
  }

  void release() {
    if (nccl) nccl_free_heaps(shared);
    else if (heaps) cudaFree(heaps);
    if (control) cudaFree(control);
    heaps = control = nullptr;
    nccl = false;
  }
  // Rank q's heap as this rank's kernel addresses it.
  unsigned char* heap_base() const { return nccl ? shared.base : heaps; }
  // Peers on other nodes: NCCL's GIN, or (tests, emulated ranks) teams of `emulated_lsa` ranks
  // with GIN emulated by copies and atomics in the heaps (gin_link.cuh).
  GinLink gin_link(const WorkspaceLayout& l, int emulated_lsa) const {
    GinLink g{};
    g.lsa_size = 1;
    if (nccl && shared.gin) {
      g.on = true;
      g.lsa_size = shared.lsa_end - shared.lsa_begin;
      g.window = static_cast<ncclWindow_t>(shared.window);
      g.comm = shared.dev_comm;
    } else if (!nccl && emulated_lsa > 0) {
      g.on = g.emulated = true;
      g.lsa_size = emulated_lsa;
      g.signals_offset = l.gin_signals.offset;
    }
    return g;
  }
  int64_t kernel_heap_stride() const { return nccl ? shared.stride : static_cast<int64_t>(heap_stride); }
  // Heaps this process clears: all W (emulated) or its own (NCCL).
  int own_heaps() const { return nccl ? 1 : world; }

  // Timeline records of `blocks` blocks, counts cleared; the buffer stays for later forwards.
  void prepare_timeline(int blocks, cudaStream_t stream) {
    const size_t records = static_cast<size_t>(blocks) * kTimelineCapacity * sizeof(TimelineRecord);
    if (blocks > timeline_blocks) {
      if (timeline) FUSEDMOE_CUDA_CHECK(cudaFree(timeline));
      FUSEDMOE_CUDA_CHECK(cudaMalloc(&timeline, records + sizeof(uint32_t) * blocks));
      timeline_blocks = blocks;
    }
    FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(timeline_counts(), 0, sizeof(uint32_t) * blocks, stream));
  }
  uint32_t* timeline_counts() const {
    return reinterpret_cast<uint32_t*>(timeline + static_cast<size_t>(timeline_blocks) * kTimelineCapacity);
  }

  // Copies the records of the last launch (stream synchronised) into the process-wide timeline.
  void publish_timeline(int blocks, cudaStream_t stream) const {
    std::vector<uint32_t> counts(static_cast<size_t>(blocks));
    std::vector<TimelineRecord> records(static_cast<size_t>(blocks) * kTimelineCapacity);
    FUSEDMOE_CUDA_CHECK(cudaMemcpyAsync(counts.data(), timeline_counts(), sizeof(uint32_t) * blocks,
                                        cudaMemcpyDeviceToHost, stream));
    FUSEDMOE_CUDA_CHECK(cudaMemcpyAsync(records.data(), timeline, records.size() * sizeof(TimelineRecord),
                                        cudaMemcpyDeviceToHost, stream));
    FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<FusedEvent> events;
    for (int b = 0; b < blocks; ++b) {
      const uint32_t n = std::min<uint32_t>(counts[static_cast<size_t>(b)], kTimelineCapacity);
      for (uint32_t i = 0; i < n; ++i) {
        const TimelineRecord& r = records[static_cast<size_t>(b) * kTimelineCapacity + i];
        events.push_back(FusedEvent{static_cast<int64_t>(r.start), static_cast<int64_t>(r.end), r.block, r.sm, r.rank,
                                    static_cast<FusedEventKind>(r.kind)});
      }
    }
    std::lock_guard<std::mutex> lock(g_timeline_mutex);
    g_timeline = std::move(events);
    g_timeline_blocks = blocks;
  }
  ~Workspace() {
    release();
    if (timeline) cudaFree(timeline);
    if (host_record) cudaFreeHost(host_record);
    if (record_copied) cudaEventDestroy(record_copied);
  }

  void clear(cudaStream_t stream) {
    FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(heaps, 0, heaps_bytes, stream));
    FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(control, 0, control_bytes, stream));
  }

  static std::array<int64_t, 6> sections_of(const WorkspaceLayout& l) {
    return {l.recv_flags.offset, l.recv_flags.bytes, l.ret_flags.offset,
            l.ret_flags.bytes,  l.counters.offset,   l.counters.bytes};
  }

  void use_layout(const WorkspaceLayout& l, cudaStream_t stream) {
    const std::array<int64_t, 6> sections = sections_of(l);
    if (sections == protocol_sections && l.p.gin == protocol_gin) return;
    if (!nccl && (l.p.gin || protocol_gin)) {
      // Emulated GIN (tests) before or now: launch flags of remote peers live in signals, and
      // signals must read as what their writers recorded (gin_sent), so the state starts over:
      // everything zero, epochs from 1, as after an allocation. (Real GIN never switches: its
      // layouts always have the sections.)
      clear(stream);
      protocol_sections = sections;
      protocol_gin = l.p.gin;
      return;
    }
    for (int q = 0; q < own_heaps(); ++q)
      for (const Section& section : {l.recv_flags, l.ret_flags, l.counters})
        FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(heaps + q * heap_stride + section.offset, 0,
                                            static_cast<size_t>(section.bytes), stream));

    // Real ranks: no peer may raise a flag in this heap before it is cleared.
    if (nccl) nccl_barrier(stream);
    protocol_sections = sections;
    protocol_gin = l.p.gin;
  }

  // (Re)allocates when the sizes grow or the shape of the problem changes; `l` is the layout
  // of this launch (a fresh workspace is all zeros, so its flag sections need no clearing).
  void ensure(int dev, size_t stride, int64_t tasks, int W, int E, int segs, const WorkspaceLayout& l,
              cudaStream_t stream) {
    // Capacities: a smaller problem runs in a larger workspace (every index stays in range).
    const TransportState transport = transport_state();
    const uint64_t gen = transport_generation();
    if (host_record && heaps && dev == device && gen == generation && stride <= heap_stride &&
        tasks <= task_capacity && W <= world && E <= experts && segs <= segments)
      return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    FUSEDMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    // A stream's first forward may come under capture (torch.cuda.graph captures on a stream of
    // its own, after a warm-up on another): the new workspace is allocated outside the graph.
    // Growing one is not possible there (the old buffers may still be in use by queued work),
    // nor is a collective allocation of the NCCL window.
    // The NCCL window is allocated collectively, which capture cannot do; and a window that a
    // captured graph uses cannot be replaced.
    FUSEDMOE_CHECK(!capturing || !transport.nccl,
                   "fused backend: the NCCL window of this stream's workspace must be allocated during CUDA-graph "
                   "capture; run one eager forward of the largest shape on the capturing stream before capturing");
    FUSEDMOE_CHECK(!(nccl && captured && gen == generation),
                   "fused backend: the NCCL workspace of this stream must grow, but a captured CUDA graph uses it; "
                   "run the largest shape eagerly before capturing");
    RelaxedCaptureMode relaxed(capturing);
    if (!host_record) {
      FUSEDMOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_record), sizeof(ErrorRecord), cudaHostAllocDefault));
      *host_record = ErrorRecord{};
      FUSEDMOE_CUDA_CHECK(cudaEventCreateWithFlags(&record_copied, cudaEventDisableTiming));
    }
    if (captured || capturing) {
      // A graph captured with the old buffers may be replayed later, and under capture the
      // stream may still run eager work on them: they stay allocated (for the process's life).
      retire();
    } else {
      FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      release();
    }
    if (gen != generation) heap_stride = task_capacity = world = experts = segments = 0;
    generation = gen;
    device = dev;
    heap_stride = std::max(stride, heap_stride);
    task_capacity = std::max(tasks, task_capacity);
    world = std::max(W, world);
    experts = std::max(E, experts);
    segments = std::max(segs, segments);
    heaps_bytes = heap_stride * world;
    control_bytes = total();
    if (transport.nccl) {
      // Collective: every rank reaches this with the same sizes (same config and token count).
      nccl_allocate_heaps(shared, heap_stride, stream);
      nccl = true;
      heaps = shared.local;
      heap_stride = shared.bytes;
      heaps_bytes = heap_stride;
    } else {
      FUSEDMOE_CUDA_CHECK(cudaMalloc(&heaps, heaps_bytes));
    }
    FUSEDMOE_CUDA_CHECK(cudaMalloc(&control, control_bytes));
    if (capturing) {
      // Cleared on a private stream and waited for: nothing of it enters the graph.
      cudaStream_t side = nullptr;
      FUSEDMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
      clear(side);
      FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(side));
      FUSEDMOE_CUDA_CHECK(cudaStreamDestroy(side));
    } else {
      clear(stream);
    }
    protocol_sections = sections_of(l);
    protocol_gin = l.p.gin;
    if (nccl) nccl_barrier(stream);
  }
};

// Workspaces persist per (device, stream) for the life of the process and are shared by every
// layer object that runs the fused kernel there: a layer built per call (as the torch op does)
// must not pay an allocation, a clear and a device-synchronising free per forward. Launches on
// one stream are ordered, so sharing is safe; different streams get different workspaces.
// (Never destroyed: freeing at exit would race the CUDA runtime's own teardown.)
std::mutex g_workspaces_mutex;
auto* g_workspaces = new std::map<std::pair<int, cudaStream_t>, std::unique_ptr<Workspace>>();

Workspace& workspace_for(int device, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_workspaces_mutex);
  auto& slot = (*g_workspaces)[{device, stream}];
  if (!slot) slot = std::make_unique<Workspace>();
  return *slot;
}

template <class T>
class FusedBackend {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args,
               const std::vector<int64_t>& tokens_per_rank, const ForwardOutputs& out) {
    cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
    const FusedOptions options = fused_options();
    int device = 0;
    FUSEDMOE_CUDA_CHECK(cudaGetDevice(&device));
    Workspace& ws = workspace_for(device, stream);
    // Under capture no event may be queried or stream synchronised (it would invalidate the
    // capture): the record is still copied back by the graph, and checked by the next eager call.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    FUSEDMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    if (!capturing) check_pending_error(ws, stream);

    const int W = c.world_size;
    const int64_t Tn = args.x.shape[0], H = c.hidden_size, E = c.num_experts, k = c.top_k;
    // Real ranks (NCCL): this process runs rank `rank_base` on its tokens x; every rank has Tn.
    const TransportState transport = transport_state();
    const int rank_base = transport.nccl ? transport.rank : 0;
    const int grid_ranks = transport.nccl ? 1 : W;
    FUSEDMOE_CHECK(!transport.nccl || transport.world == W, "fused backend: the NCCL transport has "
                   << transport.world << " ranks but the layer's world_size is " << W);
    const int64_t max_tokens = *std::max_element(tokens_per_rank.begin(), tokens_per_rank.end());
    TilePlan plan = make_plan(c, max_tokens, DeviceInfo{});
    plan.layout.block_m = kTileM;
    // Peers on other nodes: staging sections (gin_link.cuh); or GIN emulated (tests).
    const int emulated_lsa = !transport.nccl && options.gin_lsa_size > 0 && options.gin_lsa_size < W ? options.gin_lsa_size : 0;
    plan.layout.gin = transport.gin || emulated_lsa > 0;
    const WorkspaceLayout layout = WorkspaceLayout::make(plan.layout);
    const int64_t max_local = c.max_local_experts();
    FUSEDMOE_CHECK(W * max_local <= kMaxSegments, "fused backend: world_size x local experts = " << W * max_local
                   << " exceeds " << kMaxSegments);
    const bool gated = c.ffn_in_width() != c.ffn_size;
    const bool hopper = use_hopper(c, args, w, out, options, device);
    // Output columns of one GEMM0 / GEMM1 tile of the engine.
    const int tile_n0 = hopper ? (gated ? 128 : 256) : (gated ? 64 : kTileN);
    const int tile_n1 = hopper ? 256 : kTileN;
    const int64_t n0 = ceil_div(c.ffn_size, tile_n0);
    const int64_t n1 = ceil_div(H, tile_n1);
    // Shared experts add S x (row tiles of a rank) x (their GEMM0 + GEMM1 column tiles) per rank.
    const int64_t shared_tasks = c.num_shared_experts * ceil_div(max_tokens, kTileM) *
                                 (ceil_div(c.shared_size(), tile_n0) + n1);
    const int64_t task_capacity =
        W * ((ceil_div(W * layout.rows_per_source, kTileM) + W * max_local) * (n0 + n1) + shared_tasks) + 1;
    ws.ensure(device, static_cast<size_t>(WorkspaceLayout::align_up(layout.total_bytes, 256)), task_capacity, W,
              static_cast<int>(E), static_cast<int>(W * max_local), layout, stream);
    ws.use_layout(layout, stream);
    if (capturing) ws.captured = true;

    Params<T> p{};
    p.world = W;
    p.rank_base = rank_base;
    p.grid_ranks = grid_ranks;
    p.num_experts = static_cast<int>(E);
    p.max_local = static_cast<int>(max_local);
    p.top_k = static_cast<int>(k);
    p.hidden = H;
    p.ffn = c.ffn_size;
    p.ffn_in = c.ffn_in_width();
    p.ffn_kind = c.ffn;
    p.gated = gated;
    p.tile_n0 = tile_n0;
    p.tile_n1 = tile_n1;
    p.router = RouterParams{.num_tokens = Tn, .num_experts = E, .top_k = k, .gate = c.gate,
                            .renormalize = resolved_renormalize(c), .training = args.training, .seed = args.seed,
                            .token_offset = args.token_offset, .forced_topk_idx = args.forced_topk_idx};
    // Token ranges in x: every rank's (emulated), or [0, Tn) for this process's rank (real).
    int64_t running = 0, max_chunks = 1;
    for (int q = 0; q < W; ++q) {
      p.rank_begin[q] = running;
      if (!transport.nccl || q == rank_base) running += tokens_per_rank[static_cast<size_t>(q)];
      p.capacity[q] = c.dropless() ? INT64_MAX / 4 : c.capacity(tokens_per_rank[static_cast<size_t>(q)]);
      p.num_local[q] = 0;
      max_chunks = std::max<int64_t>(max_chunks, ceil_div(tokens_per_rank[static_cast<size_t>(q)], kChunk));
      for (int64_t l = 0; l < max_local; ++l) p.global_expert[q * max_local + l] = -1;
    }
    p.rank_begin[W] = running;
    // The placement tables in one pass over the experts, for any placement (with an explicit
    // one MoeConfig's per-expert queries each scan the experts: filled through them the tables
    // took ~70 us of host time per call at E = 64, all of it before the launch).
    for (int64_t e = 0; e < E; ++e) {
      const int owner = c.expert_rank(e);
      const int32_t local = p.num_local[owner]++;
      p.owner[e] = static_cast<int16_t>(owner);
      p.local_index[e] = static_cast<int16_t>(local);
      p.global_expert[owner * max_local + local] = static_cast<int16_t>(e);
    }
    p.max_chunks = static_cast<int>(max_chunks);

    // Expert weights of every expert, or of this rank's local experts only (NCCL transport).
    const int64_t weight_experts = w.w1.shape[0];
    const bool weights_local = weight_experts != E;
    FUSEDMOE_CHECK(!weights_local || transport.nccl, "fused backend: w1 holds " << weight_experts
                   << " experts, not all " << E << ": one rank's experts only work with the NCCL transport (each "
                   "process runs its own rank); emulated ranks run every rank's experts in this process");
    FUSEDMOE_CHECK(!weights_local || weight_experts == p.num_local[rank_base],
                   "fused backend: w1 holds " << weight_experts << " experts; rank " << rank_base << " of the NCCL "
                   "transport owns " << p.num_local[rank_base] << " (pass those, or all " << E << ")");
    p.weight_experts = static_cast<int>(weight_experts);
    p.x = cptr<T>(args.x);
    p.y = static_cast<T*>(out.y.data);
    p.gate_weight = cptr<T>(w.gate_weight);
    p.gate_bias = cptr<T>(w.gate_bias);
    const bool noisy = c.gate == GateKind::kNoisyTopK && args.training;
    p.noise_weight = noisy ? cptr<T>(w.noise_weight) : nullptr;
    p.selection_bias = cptr<T>(w.selection_bias);
    p.w1 = cptr<T>(w.w1);
    p.b1 = cptr<T>(w.b1);
    p.w2 = cptr<T>(w.w2);
    p.b2 = cptr<T>(w.b2);
    p.aligned = aligned16(p.x) && aligned16(p.y) && aligned16(p.gate_weight) && aligned16(p.noise_weight) &&
                aligned16(p.w1) && aligned16(p.w2) && aligned16(cptr<T>(w.shared_w1)) && aligned16(cptr<T>(w.shared_w2));

    Scratch s(stream);
    RoutingBuffers& r = p.r;
    r.logits = s.alloc<float>(Tn * E);
    r.noise_pre = noisy ? s.alloc<float>(Tn * E) : nullptr;
    r.probs = s.alloc<float>(Tn * E);
    r.lse = s.alloc<float>(Tn);
    r.prob_sum = s.alloc<float>(Tn);
    r.renorm_sum = s.alloc<float>(Tn);
    r.selected = s.alloc<int32_t>(Tn * k);
    r.idx = out.topk_idx ? out.topk_idx : s.alloc<int32_t>(Tn * k);
    r.weight = s.alloc<float>(Tn * k);
    r.kept = out.kept ? out.kept : s.alloc<uint8_t>(Tn * k);
    // Shared experts: segments of every rank in the kernel (GEMM0 into shared_hidden, GEMM1
    // into shared_out, added by the combine).
    p.num_shared = static_cast<int>(c.num_shared_experts);
    p.shared_ffn = c.shared_size();
    p.shared_in = c.shared_in_width();
    // Whole 16-row blocks: GEMM0's TMA stores write 16-row boxes (WorkspaceLayout::kSegmentAlign).
    p.shared_rows_cap = WorkspaceLayout::segment_span(std::max<int64_t>(max_tokens, 1));
    p.shared_w1 = cptr<T>(w.shared_w1);
    p.shared_b1 = cptr<T>(w.shared_b1);
    p.shared_w2 = cptr<T>(w.shared_w2);
    p.shared_b2 = cptr<T>(w.shared_b2);
    p.shared_hidden = nullptr;
    p.shared_out = nullptr;
    if (p.num_shared > 0) {
      const int64_t blocks = static_cast<int64_t>(grid_ranks) * p.num_shared * p.shared_rows_cap;
      p.shared_hidden = s.alloc<T>(blocks * p.shared_ffn);
      p.shared_out = s.alloc<T>(blocks * H);
    }
    p.chunk_counts = s.alloc<int32_t>(W * k * max_chunks * E);
    p.kept_rank = s.alloc<int64_t>(W * E);
    // Counts: accumulated in the workspace (zero between launches), written out by the kernel.
    p.routed = ws.expert_counters();
    p.kept_total = p.routed + ws.experts;
    p.routed_out = out.expert_counts ? out.expert_counts : s.alloc<int64_t>(E);
    p.kept_out = out.kept_counts ? out.kept_counts : s.alloc<int64_t>(E);
    r.routed = p.routed_out;
    r.kept_count = p.kept_out;

    p.heap_base = ws.heap_base();
    p.heap_stride = ws.kernel_heap_stride();
    p.layout = layout;
    p.gin = ws.gin_link(layout, emulated_lsa);
    p.sent_row = p.gin.on ? s.alloc<int32_t>(Tn * k) : nullptr;
    p.control = ws.rank_control();
    p.task_capacity = ws.task_capacity;
    p.tasks = reinterpret_cast<Task*>(ws.control + ws.off_tasks());
    p.task_ready = reinterpret_cast<uint32_t*>(ws.control + ws.off_ready());
    p.dispatch_written = reinterpret_cast<uint32_t*>(ws.control + ws.off_dispatch());
    p.seg_done = reinterpret_cast<uint32_t*>(ws.control + ws.off_seg_done());
    p.epoch_word = ws.word(0);
    p.blocks_done = ws.word(1);
    p.abort_word = ws.word(2);
    p.error = reinterpret_cast<ErrorRecord*>(ws.control + ws.off_record());
    double timeout_ms = options.timeout_ms;
    if (timeout_ms <= 0) {
      const char* env = std::getenv("FUSEDMOE_FUSED_TIMEOUT_MS");
      timeout_ms = env ? std::atof(env) : 5000.0;
    }
    p.timeout_ns = static_cast<uint64_t>(timeout_ms * 1e6);
    p.silent_rank = options.silent_rank;
    p.flag_before_data = options.flag_before_data;
    p.drop_shared_tiles = options.drop_shared_tiles;
    p.unfinished_rank = options.unfinished_rank;
    p.launch_slots = transport.nccl ? W : ws.world;
    p.stall = options.stall;

    bool timeline = false;
    {
      std::lock_guard<std::mutex> lock(g_timeline_mutex);
      timeline = g_timeline_enabled;
    }
    FUSEDMOE_CHECK(!(timeline && capturing), "fused backend: the debug timeline cannot be recorded under CUDA-graph "
                   "capture (it synchronises the stream); turn it off with set_fused_timeline(false)");
    int grid = 0;
    if constexpr (!std::is_same_v<T, float>) {
      if (hopper)
        grid = p.gin.on ? grid_size(fused_moe_kernel_sm90<T, true>, Sm90Tiles<T>::kThreads, Sm90Engine<T>::smem_bytes(), grid_ranks)
                        : grid_size(fused_moe_kernel_sm90<T, false>, Sm90Tiles<T>::kThreads, Sm90Engine<T>::smem_bytes(), grid_ranks);
    }
    if (grid == 0)
      grid = p.gin.on ? grid_size(fused_moe_kernel<T, true>, kThreads, PortableEngine<T>::smem_bytes(), grid_ranks)
                      : grid_size(fused_moe_kernel<T, false>, kThreads, PortableEngine<T>::smem_bytes(), grid_ranks);
    plan_router_split(p, grid / grid_ranks, max_chunks, noisy, s);
    if (timeline) attach_timeline(ws, p, grid, stream);
    if constexpr (!std::is_same_v<T, float>) {
      if (hopper) launch_hopper(p, c, layout, grid, stream);
    }
    if (!hopper) {
      static_assert(sizeof(Params<T>) <= 32000, "kernel parameters too large");
      if (p.gin.on) cooperative_launch(fused_moe_kernel<T, true>, grid, kThreads, PortableEngine<T>::smem_bytes(), stream, p);
      else cooperative_launch(fused_moe_kernel<T, false>, grid, kThreads, PortableEngine<T>::smem_bytes(), stream, p);
    }
    if (timeline) ws.publish_timeline(grid, stream);

    forward_tail<T>(p.router, r,
                    ForwardTail<T>{.topk_weight = out.topk_weight.defined() ? static_cast<T*>(out.topk_weight.data) : nullptr,
                                   .aux = out.aux_loss,
                                   .z = out.z_loss,
                                   .aux_value = static_cast<T*>(out.aux_loss_value),
                                   .z_value = static_cast<T*>(out.z_loss_value)},
                    stream);

    // The error record comes back to pinned memory after the kernel; checked now (sync_check)
    // or at the next forward.
    FUSEDMOE_CUDA_CHECK(cudaMemcpyAsync(ws.host_record, p.error, sizeof(ErrorRecord), cudaMemcpyDeviceToHost, stream));
    if (capturing) return;
    FUSEDMOE_CUDA_CHECK(cudaEventRecord(ws.record_copied, stream));
    ws.record_pending = true;
    if (options.sync_check) {
      FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      check_pending_error(ws, stream);
    }
  }

 private:
  // The Hopper engine runs where its TMA and epilogue constraints hold (see the file comment).
  bool use_hopper(const MoeConfig& c, const ForwardArgs& args, const MoeWeights& w, const ForwardOutputs& out,
                  const FusedOptions& options, int device) {
    if constexpr (std::is_same_v<T, float>) {
      return false;
    } else {
      if (options.portable_engine) return false;
      const char* env = std::getenv("FUSEDMOE_FUSED_PORTABLE");
      if (env && env[0] == '1') return false;
      if (!device_is_sm90(device)) return false;
      const bool shared_ok = c.num_shared_experts == 0 || (c.shared_size() % 8 == 0 && aligned16(w.shared_w1.data) &&
                                                             aligned16(w.shared_w2.data));
      return shared_ok && c.hidden_size % 8 == 0 && c.ffn_size % 8 == 0 && aligned16(args.x.data) && aligned16(out.y.data) &&
             aligned16(w.w1.data) && aligned16(w.w2.data) && aligned16(w.gate_weight.data) &&
             aligned16(w.noise_weight.defined() ? w.noise_weight.data : nullptr);
    }
  }

  // Split routing (Params::router_splits): when the rank's chunks times 128-expert tiles would
  // leave most blocks idle in P1 (decode batches), the gate GEMM is split along H so that the
  // units cover the rank's blocks, each slice at least 4 k-steps (256 columns of H) long. Not for the noisy gate
  // (its second GEMM runs unsplit).
  static void plan_router_split(Params<T>& p, int blocks_per_rank, int64_t max_chunks, bool noisy, Scratch& s) {
    p.router_splits = 1;
    p.split_k = p.hidden;
    p.logit_parts = nullptr;
    const int64_t units = max_chunks * ceil_div(p.num_experts, kTileN);
    if (noisy || units * 4 > blocks_per_rank || p.router.num_tokens == 0) return;
    const int64_t splits = std::min<int64_t>({blocks_per_rank / units, p.hidden / (4 * kTileK), 32});
    if (splits < 2) return;
    p.split_k = ceil_div(ceil_div(p.hidden, splits), kTileK) * kTileK;
    p.router_splits = static_cast<int>(ceil_div(p.hidden, p.split_k));
    p.logit_parts = s.template alloc<float>(p.router_splits * p.router.num_tokens * p.num_experts);
  }

  // Grid of one cooperative launch: every block resident (the launch fails otherwise), a
  // multiple of the world size.
  // The resident block count of a kernel is queried once per (kernel, device).
  template <class Kernel>
  static int grid_size(Kernel kernel, int threads, size_t smem, int world) {
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, int> resident_blocks;
    int device = 0;
    FUSEDMOE_CUDA_CHECK(cudaGetDevice(&device));
    int resident = 0;
    {
      std::lock_guard<std::mutex> lock(mutex);
      int& cached = resident_blocks[{reinterpret_cast<const void*>(kernel), device}];
      if (cached == 0) {
        int sms = 0, per_sm = 0;
        FUSEDMOE_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        FUSEDMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        FUSEDMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
        cached = sms * per_sm;
      }
      resident = cached;
    }
    const int per_rank = resident / world;
    FUSEDMOE_CHECK(per_rank >= 1, "fused backend: " << world << " emulated ranks need at least one resident block "
                                   "each; this GPU holds " << resident);
    return per_rank * world;
  }

  template <class Kernel, class... Args>
  static void cooperative_launch(Kernel kernel, int grid, int threads, size_t smem, cudaStream_t stream,
                                 const Args&... args) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(grid));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    FUSEDMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
  }

  static void attach_timeline(Workspace& ws, Params<T>& p, int grid, cudaStream_t stream) {
    ws.prepare_timeline(grid, stream);
    p.timeline = ws.timeline;
    p.timeline_count = ws.timeline_counts();
    p.timeline_capacity = kTimelineCapacity;
  }

  void launch_hopper(const Params<T>& p, const MoeConfig& c, const WorkspaceLayout& layout, int grid,
                     cudaStream_t stream) {
    using Tiles = Sm90Tiles<T>;
    using Element = typename Tiles::Element;
    static_assert(sizeof(Params<T>) + sizeof(Sm90Tma<T>) <= 32000, "kernel parameters too large");
    const int W = p.world, H = static_cast<int>(p.hidden), I = static_cast<int>(p.ffn), N1 = static_cast<int>(p.ffn_in);
    const int E = p.weight_experts;  // experts held by w1 / w2 (all, or this rank's)
    const int rows_cap = static_cast<int>(std::max<int64_t>(1, W * layout.rows_per_source));
    FUSEDMOE_CHECK(p.heap_stride % 16 == 0 && layout.recv_rows.offset % 16 == 0 && layout.hidden.offset % 16 == 0,
                   "fused backend: heap sections must be 16-B aligned for TMA");
    const int64_t heap_elements = p.heap_stride / static_cast<int64_t>(sizeof(T));
    // A operands are read from the heaps of this grid's ranks only (the GEMMs run where the rows are).
    const unsigned char* first = p.heap_base + static_cast<int64_t>(p.rank_base) * p.heap_stride;
    auto at = [&](int64_t offset) { return reinterpret_cast<const Element*>(first + offset); };
    auto at_mut = [&](int64_t offset) { return const_cast<Element*>(at(offset)); };
    Sm90Tma<T> tma{
        .a0 = Tiles::make_a(at(layout.recv_rows.offset), rows_cap, H, p.grid_ranks, heap_elements),
        .a1 = Tiles::make_a(at(layout.hidden.offset), rows_cap, I, p.grid_ranks, heap_elements),
        .b0 = Tiles::Plain::make_tma_b(reinterpret_cast<const Element*>(p.w1), N1, H, E),
        .b1 = Tiles::Plain::make_tma_b(reinterpret_cast<const Element*>(p.w2), H, I, E),
        .ax = {},
        .as = {},
        .bs0 = {},
        .bs1 = {},
        .h0 = Tiles::make_store(at_mut(layout.hidden.offset), rows_cap, I, p.grid_ranks, heap_elements),
        .hs = {},
        .x_rows = static_cast<int>(std::max<int64_t>(1, p.router.num_tokens)),
        .shared_rows = static_cast<int>(std::max<int64_t>(1, p.grid_ranks * p.num_shared * p.shared_rows_cap)),
        .rows_cap = rows_cap,
        .act = epilogue_of(c.ffn),
    };
    if (p.num_shared > 0) {
      const int S = p.num_shared, Is = static_cast<int>(p.shared_ffn), Ns1 = static_cast<int>(p.shared_in);
      tma.ax = Tiles::make_a(reinterpret_cast<const Element*>(p.x), tma.x_rows, H, 1, 0);
      tma.as = Tiles::make_a(reinterpret_cast<const Element*>(p.shared_hidden), tma.shared_rows, Is, 1, 0);
      tma.bs0 = Tiles::Plain::make_tma_b(reinterpret_cast<const Element*>(p.shared_w1), Ns1, H, S);
      tma.bs1 = Tiles::Plain::make_tma_b(reinterpret_cast<const Element*>(p.shared_w2), H, Is, S);
      tma.hs = Tiles::make_store(reinterpret_cast<Element*>(p.shared_hidden), tma.shared_rows, Is, 1, 0);
    }
    if (p.gin.on)
      cooperative_launch(fused_moe_kernel_sm90<T, true>, grid, Tiles::kThreads, Sm90Engine<T>::smem_bytes(), stream, p, tma);
    else
      cooperative_launch(fused_moe_kernel_sm90<T, false>, grid, Tiles::kThreads, Sm90Engine<T>::smem_bytes(), stream, p, tma);
  }

  static void check_pending_error(Workspace& ws, cudaStream_t stream) {
    if (!ws.record_pending) return;
    if (cudaEventQuery(ws.record_copied) != cudaSuccess) return;  // not finished yet: next time
    ws.record_pending = false;
    const ErrorRecord e = *ws.host_record;
    if (e.code == kNoError) return;
    *ws.host_record = ErrorRecord{};
    ws.clear(stream);  // flags, counters and queues restart from epoch 0
    FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    FUSEDMOE_CHECK(false, "fused backend: " << describe(e));
  }
};

class FusedBackendDispatch final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& a, const std::vector<int64_t>& tpr,
               const ForwardOutputs& o) override {
    check(c, a);
    if (o.saved != nullptr) {
      // A training forward that keeps its state for backward (MoeLayer::saved_bytes > 0 only at
      // W = 1): the modular forward writes that state; the fused kernel's intermediate rows are
      // laid out per source and segment, not as backward reads them. Backward then reuses the
      // state instead of recomputing the forward after the fused kernel (one forward less per
      // step), and the output and the gradients come from the same forward.
      FUSEDMOE_CHECK(c.world_size == 1, "fused backend: a forward that saves state for backward needs world_size = 1");
      if (!modular_) modular_ = make_cuda_backend();
      modular_->forward(c, w, a, tpr, o);
      return;
    }
    switch (c.dtype) {
      case DType::kFloat32: f32_.forward(c, w, a, tpr, o); break;
      case DType::kBFloat16: bf16_.forward(c, w, a, tpr, o); break;
      case DType::kFloat16: f16_.forward(c, w, a, tpr, o); break;
      default: break;
    }
  }
  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& a, const std::vector<int64_t>& tpr,
                const MoeGrads& g) override {
    FUSEDMOE_CHECK(c.world_size == 1, "fused backend: backward with world_size = " << c.world_size
                   << " emulated ranks is not supported; the forward runs fused, backward needs world_size = 1");
    if (!modular_) modular_ = make_cuda_backend();
    modular_->backward(c, w, a, tpr, g);
  }

 private:
  static void check(const MoeConfig& c, const ForwardArgs& a) {
    FUSEDMOE_CHECK(c.dtype != DType::kFloat64, "fused backend: dtype fp64 is not supported (fp32, bf16, fp16)");
    FUSEDMOE_CHECK(c.dtype != DType::kFloat32 || c.fp32_math == Fp32Math::kTf32,
                   "fused backend: fp32 runs its GEMMs as TF32; exact fp32 (fp32_math = exact) needs backend cuda");
    FUSEDMOE_CHECK(c.world_size <= kMaxWorld, "fused backend: world_size " << c.world_size << " > " << kMaxWorld);
    FUSEDMOE_CHECK(c.num_experts <= kMaxExperts, "fused backend: num_experts " << c.num_experts << " > " << kMaxExperts);
    FUSEDMOE_CHECK(c.top_k <= kMaxTopK, "fused backend: top_k " << c.top_k << " > " << kMaxTopK);
    FUSEDMOE_CHECK(c.num_shared_experts <= kMaxShared, "fused backend: num_shared_experts " << c.num_shared_experts
                   << " > " << kMaxShared);
    FUSEDMOE_CHECK(!(c.gate == GateKind::kSwitchTop1 && a.training && c.jitter_eps > 0),
                   "fused backend: the Switch gate's router jitter (training, jitter_eps > 0) is not fused yet; "
                   "use backend cuda");
  }
  FusedBackend<float> f32_;
  FusedBackend<__nv_bfloat16> bf16_;
  FusedBackend<__half> f16_;
  std::unique_ptr<BackendImpl> modular_;
};

}  // namespace
}  // namespace cuda::fused

void set_fused_timeline(bool enabled) {
  std::lock_guard<std::mutex> lock(cuda::fused::g_timeline_mutex);
  cuda::fused::g_timeline_enabled = enabled;
}

std::vector<FusedEvent> fused_timeline(int* blocks) {
  std::lock_guard<std::mutex> lock(cuda::fused::g_timeline_mutex);
  if (blocks) *blocks = cuda::fused::g_timeline_blocks;
  return cuda::fused::g_timeline;
}

namespace cuda::fused {
// Before an NCCL communicator is destroyed: the windows registered on it go first.
void release_nccl_heaps() {
  std::lock_guard<std::mutex> lock(g_workspaces_mutex);
  for (auto& entry : *g_workspaces)
    if (entry.second && entry.second->nccl) entry.second->release();
}
}  // namespace cuda::fused

std::unique_ptr<BackendImpl> make_fused_backend() { return std::make_unique<cuda::fused::FusedBackendDispatch>(); }

}  // namespace fusedmoe
