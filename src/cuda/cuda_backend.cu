// src/cuda/cuda_backend.cu — the modular GPU backend (one GPU, world size 1): router → slots →
// gather → grouped GEMM0 → activation → grouped GEMM1 → combine, and the backward pass through
// the same stages in reverse. Every buffer is stream-ordered scratch; nothing synchronises with
// the host, so forward and backward can be captured in a CUDA graph. Backward reads the forward's
// routing, rows and activations from the buffer the forward saved them in
// (fusedmoe/saved_state.hpp), or recomputes them when it has none (routing is deterministic and
// noise is keyed).
// Test: tests/gpu/test_gpu_layer.cpp against the CPU oracle with the same routing.
#include <algorithm>
#include <cstdlib>
#include <optional>

#include "core/backend.hpp"
#include "cuda/common.cuh"
#include "fusedmoe/saved_state.hpp"
#include "cuda/shared_experts.cuh"
#include "cuda/stages.cuh"
#include "cuda/wmma_gemm.cuh"
#include "gemm/grouped_gemm.hpp"

namespace fusedmoe {
namespace cuda {
namespace {

bool resolved_renormalize(const MoeConfig& c) {
  if (c.gate == GateKind::kSwitchTop1) return false;
  if (c.gate == GateKind::kGShardTop2) return true;
  return c.renormalize;
}

template <class T>
const T* ptr(const TensorView& v) { return v.defined() ? static_cast<const T*>(v.data) : nullptr; }
template <class T>
T* mut(const TensorView& v) { return v.defined() ? static_cast<T*>(v.data) : nullptr; }

// C = A · B over groups; every operand addressed by (group stride, row stride, column stride).
struct Operand {
  const void* data;
  int64_t group = 0, rows = 0, cols = 0;  // strides (elements)
};

// TF32 for the fp32 expert GEMMs unless the config asks for exact fp32 (set per call); the
// router's GEMMs always run in exact fp32 (RouterScope).
thread_local bool g_allow_tf32 = false;

struct Fp32MathScope {
  explicit Fp32MathScope(bool allow_tf32) : saved(g_allow_tf32) { g_allow_tf32 = allow_tf32; }
  ~Fp32MathScope() { g_allow_tf32 = saved; }
  bool saved;
};
struct RouterScope : Fp32MathScope {
  RouterScope() : Fp32MathScope(false) {}
};

template <class TA, class TB, class TC>
void gemm(cudaStream_t stream, VaryDim vary, const int64_t* offsets, int groups, int64_t m, int64_t n, int64_t k,
          Operand a, Operand b, void* c, int64_t c_group, int64_t c_rows, bool accumulate = false) {
  SimpleGemmParams p;
  p.num_groups = groups;
  p.offsets = offsets;
  p.vary = vary;
  p.m = m; p.n = n; p.k = k;
  p.a = a.data; p.a_group = a.group; p.a_sm = a.rows; p.a_sk = a.cols;
  p.b = b.data; p.b_group = b.group; p.b_sk = b.rows; p.b_sn = b.cols;
  p.c = c; p.c_group = c_group; p.c_sm = c_rows; p.c_sn = 1;
  p.accumulate = accumulate;
  grouped_gemm_any<TA, TB, TC>(p, stream, g_allow_tf32);
}

// ------------------------------------------------------------------ Hopper expert GEMMs --

bool hopper_device() {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && device_is_sm90(device);
}

template <class T>
constexpr bool kIs16Bit = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

template <class T>
ElementType element_type() {
  return std::is_same_v<T, __nv_bfloat16> ? ElementType::kBF16 : std::is_same_v<T, __half> ? ElementType::kF16 : ElementType::kF32;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Switches for isolating a kernel in the field: FUSEDMOE_NO_HOPPER_BACKWARD=1 runs the backward
// GEMMs on the generic tensor-core kernel; FUSEDMOE_NO_HOPPER_WGRAD=1 only the weight gradients.
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// The wgmma + TMA engine runs the expert FFN when its constraints hold: Hopper, 16-bit data,
// K and N multiples of 8 (16 for gated), 16-B aligned weights, no b1 (its epilogue has no bias).
template <class T>
bool use_hopper_engine(const MoeConfig& c, const MoeWeights& w) {
  if constexpr (!kIs16Bit<T>) {
    return false;
  } else {
    return hopper_device() && !w.b1.defined() && c.hidden_size % 8 == 0 && c.ffn_size % 8 == 0 &&
           c.num_experts <= kMaxGroups && aligned16(w.w1.data) && aligned16(w.w2.data);
  }
}

// Shared experts on the Hopper engine too: 16-bit, no biases (the engine's epilogues add none;
// with expert_bias the shared experts have b1), H and the shared I multiples of 8, 16-B aligned
// operands. Each is a one-group GEMM over all Tn tokens. FUSEDMOE_NO_HOPPER_SHARED=1 runs them on
// the generic tensor-core kernel.
template <class T>
bool shared_on_hopper(const MoeConfig& c, const MoeWeights& w, const T* x, int64_t Tn) {
  if constexpr (!kIs16Bit<T>) {
    return false;
  } else {
    return c.num_shared_experts > 0 && Tn > 0 && hopper_device() && !w.shared_b1.defined() && !w.shared_b2.defined() &&
           c.hidden_size % 8 == 0 && c.shared_size() % 8 == 0 && aligned16(x) && aligned16(w.shared_w1.data) &&
           aligned16(w.shared_w2.data) && !env_flag("FUSEDMOE_NO_HOPPER_SHARED");
  }
}

void run_grouped_gemm(const GroupedGemmArgs& args, Scratch& scratch, cudaStream_t stream) {
  try {
    void* workspace = scratch.alloc<unsigned char>(static_cast<int64_t>(grouped_gemm_workspace_size(args)));
    grouped_gemm(args, workspace, stream);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    FUSEDMOE_CHECK(false, "grouped GEMM: " << e.what());
  }
}

void run_grouped_wgrad(const GroupedWgradArgs& args, Scratch& scratch, cudaStream_t stream) {
  try {
    const size_t bytes = grouped_gemm_wgrad_workspace_size(args);
    void* workspace = bytes ? scratch.alloc<unsigned char>(static_cast<int64_t>(bytes)) : nullptr;
    grouped_gemm_wgrad(args, workspace, stream);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    FUSEDMOE_CHECK(false, "grouped wgrad GEMM: " << e.what());
  }
}

// The router's logits by router_logits.cuh (16-bit data); FUSEDMOE_ROUTER_ENGINE=1 runs them on
// the grouped GEMM engine instead (for comparisons).
template <class T>
bool router_logits_kernel_on() {
  return kIs16Bit<T> && !env_flag("FUSEDMOE_ROUTER_ENGINE");
}

// Split-K factor of the router logits GEMM (1 = none): 16-bit data whose logits fill at most a
// quarter of the SMs with 128 x 128 tiles while H spans at least 8 slices of 256.
template <class T>
int router_splits(const MoeConfig& c, const MoeWeights& w, const T* x, int64_t Tn) {
  if constexpr (!kIs16Bit<T>) {
    return 1;
  } else {
    if (Tn == 0 || !aligned16(x) || !aligned16(w.gate_weight.data) || c.hidden_size % 8 != 0) return 1;
    int device = 0;
    FUSEDMOE_CUDA_CHECK(cudaGetDevice(&device));
    const int64_t tiles = ceil_div(Tn, int64_t{128}) * ceil_div(c.num_experts, int64_t{128});
    const int64_t sms = device_facts(device).sms;
    if (tiles * 4 > sms || c.hidden_size < 8 * 256) return 1;
    return static_cast<int>(std::min<int64_t>({sms / tiles, c.hidden_size / 256, 64}));
  }
}

// Everything forward computes, kept for backward.
template <class T>
struct ForwardState {
  explicit ForwardState(cudaStream_t s) : scratch(s) {}
  Scratch scratch;
  RouterParams rp;
  RoutingBuffers r;
  float* router_input_f32 = nullptr;  // jittered router input (Switch, training)
  int64_t capacity = 0, rows_max = 0, rows_per_expert_max = 0;
  T* xperm = nullptr;      // [rows_max, H]
  T* pre = nullptr;        // [rows_max, N1]
  T* act = nullptr;        // [rows_max, I]
  T* out_rows = nullptr;   // [rows_max, H]
  float* dense = nullptr;  // [T, H] shared experts' sum (fp32), null without shared experts
};

// Router parameters, sizes and buffers of a forward on args: from scratch, or the sections of a
// saved-state buffer (SavedLayout) when `saved` is given.
}  // namespace

// Shared experts (declared in shared_experts.cuh).
template <class T>
void shared_experts_forward(const MoeConfig& c, const MoeWeights& w, const T* x, int64_t Tn, float* dense, Scratch& s,
                            cudaStream_t stream) {
  const int64_t H = c.hidden_size, Is = c.shared_size(), Ns1 = c.shared_in_width();
  FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(dense, 0, sizeof(float) * static_cast<size_t>(std::max<int64_t>(Tn * H, 1)), stream));
  if (shared_on_hopper<T>(c, w, x, Tn)) {
    const ElementType et = element_type<T>();
    T* act_s = s.alloc<T>(Tn * Is);
    int64_t* all_rows = s.alloc<int64_t>(2);
    set_range(all_rows, Tn, stream);
    for (int64_t e = 0; e < c.num_shared_experts; ++e) {
      run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = Ns1, .k = H,
                                       .a = x, .b = ptr<T>(w.shared_w1) + e * H * Ns1, .c = act_s, .a_type = et,
                                       .c_type = et, .epilogue = epilogue_of(c.ffn)},
                       s, stream);
      run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = H, .k = Is,
                                       .a = act_s, .b = ptr<T>(w.shared_w2) + e * Is * H, .c = dense, .a_type = et,
                                       .c_type = ElementType::kF32, .accumulate = true},
                       s, stream);
    }
    return;
  }
  T* pre_s = s.alloc<T>(Tn * Ns1);
  T* act_s = s.alloc<T>(Tn * Is);
  for (int64_t e = 0; e < c.num_shared_experts; ++e) {
    gemm<T, T, T>(stream, VaryDim::kNone, nullptr, 1, Tn, Ns1, H, {x, 0, H, 1},
                  {ptr<T>(w.shared_w1) + e * H * Ns1, 0, Ns1, 1}, pre_s, 0, Ns1);
    if (w.shared_b1.defined()) add_group_bias<T, T>(pre_s, ptr<T>(w.shared_b1) + e * Ns1, nullptr, 1, Tn, Ns1, stream);
    activation_forward<T>(c.ffn, pre_s, act_s, nullptr, Tn, Is, stream);
    gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, Is, {act_s, 0, Is, 1},
                      {ptr<T>(w.shared_w2) + e * Is * H, 0, H, 1}, dense, 0, H, /*accumulate=*/true);
    if (w.shared_b2.defined()) add_group_bias<float, T>(dense, ptr<T>(w.shared_b2) + e * H, nullptr, 1, Tn, H, stream);
  }
}
template void shared_experts_forward<float>(const MoeConfig&, const MoeWeights&, const float*, int64_t, float*, Scratch&,
                                            cudaStream_t);
template void shared_experts_forward<__nv_bfloat16>(const MoeConfig&, const MoeWeights&, const __nv_bfloat16*, int64_t,
                                                    float*, Scratch&, cudaStream_t);
template void shared_experts_forward<__half>(const MoeConfig&, const MoeWeights&, const __half*, int64_t, float*,
                                             Scratch&, cudaStream_t);

namespace {

template <class T>
void prepare_state(const MoeConfig& c, const ForwardArgs& args, ForwardState<T>& st, unsigned char* saved,
                   const ForwardOutputs* out) {
  const int64_t Tn = args.x.shape[0], H = c.hidden_size, E = c.num_experts, k = c.top_k;
  const int64_t I = c.ffn_size, N1 = c.ffn_in_width();
  st.rp = RouterParams{.num_tokens = Tn, .num_experts = E, .top_k = k, .gate = c.gate,
                       .renormalize = resolved_renormalize(c), .training = args.training, .seed = args.seed,
                       .token_offset = args.token_offset, .forced_topk_idx = args.forced_topk_idx};
  st.capacity = c.capacity(Tn);
  st.rows_per_expert_max = std::max<int64_t>(st.capacity, 1);
  st.rows_max = std::min(Tn * k, c.dropless() ? Tn * k : E * st.capacity);
  const bool noisy = c.gate == GateKind::kNoisyTopK && args.training;
  const bool jitter = c.gate == GateKind::kSwitchTop1 && args.training && c.jitter_eps > 0;
  RoutingBuffers& r = st.r;
  Scratch& s = st.scratch;
  if (saved) {
    const SavedLayout l = SavedLayout::make(c, Tn);
    auto at = [&](const SavedLayout::Span& span) { return static_cast<void*>(saved + span.offset); };
    r.routed = static_cast<int64_t*>(at(l.routed));
    r.kept_count = static_cast<int64_t*>(at(l.kept_count));
    r.row_offsets = static_cast<int64_t*>(at(l.row_offsets));
    r.logits = static_cast<float*>(at(l.logits));
    r.probs = static_cast<float*>(at(l.probs));
    r.noise_pre = noisy ? static_cast<float*>(at(l.noise_pre)) : nullptr;
    r.lse = static_cast<float*>(at(l.stats));
    r.prob_sum = r.lse + Tn;
    r.renorm_sum = r.lse + 2 * Tn;
    r.selected = static_cast<int32_t*>(at(l.selected));
    r.idx = static_cast<int32_t*>(at(l.idx));
    r.weight = static_cast<float*>(at(l.weight));
    r.row_of = static_cast<int32_t*>(at(l.row_of));
    r.row_source = static_cast<int32_t*>(at(l.row_source));
    r.kept = static_cast<uint8_t*>(at(l.kept));
    st.router_input_f32 = jitter ? static_cast<float*>(at(l.router_input)) : nullptr;
    st.xperm = static_cast<T*>(at(l.xperm));
    st.pre = static_cast<T*>(at(l.pre));
    st.act = static_cast<T*>(at(l.act));
    st.out_rows = static_cast<T*>(at(l.out_rows));
    return;
  }
  r.logits = s.alloc<float>(Tn * E);
  r.probs = s.alloc<float>(Tn * E);
  r.noise_pre = noisy ? s.alloc<float>(Tn * E) : nullptr;
  r.lse = s.alloc<float>(Tn);
  r.prob_sum = s.alloc<float>(Tn);
  r.renorm_sum = s.alloc<float>(Tn);
  r.selected = s.alloc<int32_t>(Tn * k);
  // Without a saved-state buffer the routing tables the caller asked for are written in place.
  r.idx = out && out->topk_idx ? out->topk_idx : s.alloc<int32_t>(Tn * k);
  r.weight = s.alloc<float>(Tn * k);
  r.routed = out && out->expert_counts ? out->expert_counts : s.alloc<int64_t>(E);
  r.kept_count = out && out->kept_counts ? out->kept_counts : s.alloc<int64_t>(E);
  r.row_offsets = s.alloc<int64_t>(E + 1);
  r.row_of = s.alloc<int32_t>(Tn * k);
  r.kept = out && out->kept ? out->kept : s.alloc<uint8_t>(Tn * k);
  r.row_source = s.alloc<int32_t>(st.rows_max);
  st.router_input_f32 = jitter ? s.alloc<float>(Tn * H) : nullptr;
  st.xperm = s.alloc<T>(st.rows_max * H);
  st.pre = s.alloc<T>(st.rows_max * N1);
  st.act = s.alloc<T>(st.rows_max * I);
  st.out_rows = s.alloc<T>(st.rows_max * H);
}

// The forward into st (prepared by prepare_state).
template <class T>
void run_forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args, ForwardState<T>& st,
                 bool keep_pre_activation) {
  cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
  const int64_t Tn = args.x.shape[0], H = c.hidden_size, E = c.num_experts, k = c.top_k;
  const int64_t I = c.ffn_size, N1 = c.ffn_in_width();
  const T* x = ptr<T>(args.x);
  Scratch& s = st.scratch;
  RouterParams& rp = st.rp;
  RoutingBuffers& r = st.r;
  r.chunk_counts = s.alloc<int32_t>(k * ceil_div(Tn, kSlotChunk) * E);  // slot assignment only

  // Router logits (fp32) = router input · Wgᵀ + bg.
  std::optional<RouterScope> router_scope(std::in_place);
  bool logits_have_bias = false;  // the router kernel added gate_bias
  const Operand gate_b{ptr<T>(w.gate_weight), 0, 1, H};  // B(k = h, n = e) = Wg[e, h]
  if (st.router_input_f32) {  // Switch jitter (training)
    float* xr = st.router_input_f32;
    jitter_router_input<T>(x, xr, Tn, H, c.jitter_eps, args.seed, args.token_offset, stream);
    gemm<float, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, E, H, {xr, 0, H, 1}, gate_b, r.logits, 0, E);
  } else if (const int splits = router_splits<T>(c, w, x, Tn); splits > 1) {
    // Few row tiles (decode batches): one 128-row tile of all tokens would run all of H on a
    // single SM (70 us for T 128, H 7168); split H over `splits` blocks into ordered fp32
    // partials, summed in order (deterministic).
    float* partials = s.alloc<float>(splits * Tn * E);
    SimpleGemmParams p;
    p.m = Tn; p.n = E; p.k = H;
    p.a = x; p.a_sm = H; p.a_sk = 1;
    p.b = w.gate_weight.data; p.b_sk = 1; p.b_sn = H;
    p.c = partials; p.c_sm = E; p.c_sn = 1;
    p.k_splits = splits;
    p.c_split = Tn * E;
    const bool launched = wmma_gemm<T, float>(p, stream);
    FUSEDMOE_CHECK(launched, "internal: router logits layout");
    sum_partials<float>(partials, splits, r.logits, Tn * E, stream);
  } else if (router_logits_kernel_on<T>() &&
             router_logits<T>(x, ptr<T>(w.gate_weight), ptr<T>(w.gate_bias), r.logits, Tn, H, E, stream)) {
    logits_have_bias = true;
  } else if (use_hopper_engine<T>(c, w) && Tn > 0 && E % 8 == 0 && aligned16(w.gate_weight.data)) {
    // One group of all tokens; Wg [E, H] is B stored K-major. fp32 logits.
    int64_t* all_rows = s.alloc<int64_t>(2);
    set_range(all_rows, Tn, stream);
    run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = E, .k = H,
                                     .a = x, .b = w.gate_weight.data, .c = r.logits, .a_type = element_type<T>(),
                                     .c_type = ElementType::kF32, .b_k_major = true},
                     s, stream);
  } else {
    gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, E, H, {x, 0, H, 1}, gate_b, r.logits, 0, E);
  }
  if (w.gate_bias.defined() && !logits_have_bias)
    add_group_bias<float, T>(r.logits, ptr<T>(w.gate_bias), nullptr, 1, Tn, E, stream);
  if (r.noise_pre) {
    gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, E, H, {x, 0, H, 1}, {ptr<T>(w.noise_weight), 0, 1, H},
                      r.noise_pre, 0, E);
    add_gate_noise(rp, r, stream);
  }
  router_scope.reset();
  gate_topk<T>(rp, ptr<T>(w.selection_bias), r, stream);
  assign_slots(rp, st.capacity, r, stream);

  // Dispatch (local): rows in expert order; expert FFN as grouped GEMMs.
  gather_rows<T>(x, r, false, st.xperm, Tn, k, H, stream);
  if (use_hopper_engine<T>(c, w) && st.rows_max > 0) {
    // GEMM0 with the activation (gated: both halves in one tile) fused; GEMM1 plain.
    GroupedGemmArgs up{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets, .max_total_rows = st.rows_max,
                       .n = N1, .k = H, .a = st.xperm, .b = w.w1.data, .c = st.act, .a_type = element_type<T>(),
                       .c_type = element_type<T>(), .epilogue = epilogue_of(c.ffn),
                       .pre_activation = keep_pre_activation ? st.pre : nullptr};
    run_grouped_gemm(up, s, stream);
    GroupedGemmArgs down{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                         .max_total_rows = st.rows_max, .n = H, .k = I, .a = st.act, .b = w.w2.data,
                         .c = st.out_rows, .a_type = element_type<T>(), .c_type = element_type<T>(),
                         .epilogue = Epilogue::kIdentity};
    run_grouped_gemm(down, s, stream);
  } else {
    gemm<T, T, T>(stream, VaryDim::kM, r.row_offsets, static_cast<int>(E), st.rows_per_expert_max, N1, H,
                  {st.xperm, 0, H, 1}, {ptr<T>(w.w1), H * N1, N1, 1}, st.pre, 0, N1);
    if (w.b1.defined()) add_group_bias<T, T>(st.pre, ptr<T>(w.b1), r.row_offsets, E, st.rows_max, N1, stream);
    activation_forward<T>(c.ffn, st.pre, st.act, r.row_offsets + E, st.rows_max, I, stream);
    gemm<T, T, T>(stream, VaryDim::kM, r.row_offsets, static_cast<int>(E), st.rows_per_expert_max, H, I,
                  {st.act, 0, I, 1}, {ptr<T>(w.w2), I * H, H, 1}, st.out_rows, 0, H);
  }
  if (w.b2.defined()) add_group_bias<T, T>(st.out_rows, ptr<T>(w.b2), r.row_offsets, E, st.rows_max, H, stream);

  // Shared experts: dense FFNs over all tokens, summed in fp32.
  if (c.num_shared_experts > 0) {
    st.dense = s.alloc<float>(Tn * H);
    shared_experts_forward<T>(c, w, x, Tn, st.dense, s, stream);
  }
}

template <class T>
class CudaBackend final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args, const std::vector<int64_t>&,
               const ForwardOutputs& out) override {
    cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
    const int64_t Tn = args.x.shape[0], H = c.hidden_size, k = c.top_k;
    ForwardState<T> st(stream);
    // With a saved-state buffer the routing, rows and activations land there (for backward).
    auto* saved = static_cast<unsigned char*>(out.saved);
    prepare_state<T>(c, args, st, saved, &out);
    run_forward<T>(c, w, args, st, /*keep_pre_activation=*/saved != nullptr);
    combine_rows<T>(st.out_rows, st.r, false, st.dense, mut<T>(out.y), Tn, k, H, stream);
    // With a saved-state buffer the routing tables live there and are copied out.
    forward_tail<T>(st.rp, st.r,
                    ForwardTail<T>{.topk_weight = out.topk_weight.defined() ? mut<T>(out.topk_weight) : nullptr,
                                   .topk_idx = saved ? out.topk_idx : nullptr,
                                   .kept = saved ? out.kept : nullptr,
                                   .expert_counts = saved ? out.expert_counts : nullptr,
                                   .kept_counts = saved ? out.kept_counts : nullptr,
                                   .aux = out.aux_loss,
                                   .z = out.z_loss,
                                   .aux_value = static_cast<T*>(out.aux_loss_value),
                                   .z_value = static_cast<T*>(out.z_loss_value)},
                    stream);
  }

  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& args, const std::vector<int64_t>&,
                const MoeGrads& g) override {
    const ForwardArgs& fa = args.forward;
    cudaStream_t stream = static_cast<cudaStream_t>(fa.stream);
    const int64_t Tn = fa.x.shape[0], H = c.hidden_size, E = c.num_experts, k = c.top_k;
    const int64_t I = c.ffn_size, N1 = c.ffn_in_width();
    const T* x = ptr<T>(fa.x);
    const T* dy = ptr<T>(args.dy);
    ForwardState<T> st(stream);
    // The forward's state: read from its saved-state buffer, or recomputed.
    auto* saved = static_cast<unsigned char*>(const_cast<void*>(args.saved));
    prepare_state<T>(c, fa, st, saved, nullptr);
    if (!saved) run_forward<T>(c, w, fa, st, /*keep_pre_activation=*/true);
    Scratch& s = st.scratch;
    RoutingBuffers& r = st.r;

    // Router.
    float* dweight = s.alloc<float>(Tn * k);
    routing_weight_grad<T>(dy, st.out_rows, r, dweight, Tn, k, H, stream);
    float* dlogits = s.alloc<float>(Tn * E);
    const bool noisy = c.gate == GateKind::kNoisyTopK && fa.training;
    float* dnoise = noisy ? s.alloc<float>(Tn * E) : nullptr;
    router_backward(st.rp, r, dweight, args.d_aux, args.d_z, args.d_aux_device, args.d_z_device, dlogits, dnoise,
                    stream);
    // dx accumulates in fp32: the router's part, the experts' (combine backward), the shared
    // experts'. A 16-bit router without jitter writes it first (no zero fill: 134 MB of memset
    // and as many bytes read back on mixtral); every other path adds to zeros.
    const bool router_writes_dx = kIs16Bit<T> && !st.router_input_f32;
    float* dx_acc = router_writes_dx ? s.alloc<float>(Tn * H) : s.zeros<float>(Tn * H);
    std::optional<RouterScope> router_scope(std::in_place);
    const Operand dlogits_t{dlogits, 0, 1, E};  // A(m = e, k = t)
    bool router_done = false;
    if constexpr (kIs16Bit<T>) {
      if (router_writes_dx) {  // the 16-bit router without jitter: its dx GEMM writes dx_acc
        // As torch does for a 16-bit router: dlogits in T, then tensor cores. dWg = dlogitsᵀ · x
        // has K = T tokens and a small output (E x H): split-K into ordered fp32 partials.
        T* dlogits_16 = s.alloc<T>(Tn * E);
        convert<T>(dlogits, dlogits_16, Tn * E, stream);
        if (g.d_gate_weight.defined()) {
          const int splits = static_cast<int>(std::clamp<int64_t>(Tn / 1024, 1, 32));
          float* partials = s.alloc<float>(splits * E * H);
          if (use_hopper_engine<T>(c, w) && E % 8 == 0 && aligned16(dlogits_16) && aligned16(x)) {
            // The Hopper weight-gradient kernel with each split of the tokens as one group: the
            // split-K partials are its per-group outputs (the wmma kernel ran at ~13 TFLOP/s here).
            int64_t* splits_at = s.alloc<int64_t>(splits + 1);
            set_even_split(splits_at, splits, Tn, stream);
            run_grouped_wgrad(GroupedWgradArgs{.num_groups = splits, .row_offsets = splits_at, .max_total_rows = Tn,
                                               .m = E, .n = H, .a = dlogits_16, .b = x, .c = partials,
                                               .a_type = element_type<T>(), .c_type = ElementType::kF32},
                              s, stream);
            sum_partials<T>(partials, splits, mut<T>(g.d_gate_weight), E * H, stream);
          } else {
          SimpleGemmParams p;
          p.m = E; p.n = H; p.k = Tn;
          p.a = dlogits_16; p.a_sm = 1; p.a_sk = E;
          p.b = x; p.b_sk = H; p.b_sn = 1;
          p.c = partials; p.c_sm = H; p.c_sn = 1;
          p.k_splits = splits;
          p.c_split = E * H;
          const bool launched = wmma_gemm<T, float>(p, stream);
          FUSEDMOE_CHECK(launched, "internal: router weight gradient layout");
          sum_partials<T>(partials, splits, mut<T>(g.d_gate_weight), E * H, stream);
          }
        }
        if (use_hopper_engine<T>(c, w) && E % 8 == 0 && aligned16(dlogits_16) && aligned16(w.gate_weight.data)) {
          // dx = dlogits · Wg on the Hopper engine: one group of all tokens, K = E, fp32 out
          // (the generic kernel took 0.32 ms of paper-64's backward here).
          int64_t* all_rows = s.alloc<int64_t>(2);
          set_range(all_rows, Tn, stream);
          run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = H,
                                           .k = E, .a = dlogits_16, .b = w.gate_weight.data, .c = dx_acc,
                                           .a_type = element_type<T>(), .c_type = ElementType::kF32},
                           s, stream);
        } else {
          gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, E, {dlogits_16, 0, E, 1},
                            {ptr<T>(w.gate_weight), 0, H, 1}, dx_acc, 0, H, /*accumulate=*/false);
        }
        router_done = true;
      }
    }
    if (!router_done && g.d_gate_weight.defined()) {
      if (st.router_input_f32)
        gemm<float, float, T>(stream, VaryDim::kNone, nullptr, 1, E, H, Tn, dlogits_t, {st.router_input_f32, 0, H, 1},
                              mut<T>(g.d_gate_weight), 0, H);
      else
        gemm<float, T, T>(stream, VaryDim::kNone, nullptr, 1, E, H, Tn, dlogits_t, {x, 0, H, 1}, mut<T>(g.d_gate_weight), 0, H);
    }
    if (g.d_gate_bias.defined()) group_column_sums<T, float>(dlogits, nullptr, 1, E, mut<T>(g.d_gate_bias), stream, Tn);
    if (router_done) {
      // the router path's dx was accumulated above
    } else if (st.router_input_f32) {
      float* dxr = s.alloc<float>(Tn * H);
      gemm<float, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, E, {dlogits, 0, E, 1}, {ptr<T>(w.gate_weight), 0, H, 1}, dxr, 0, H);
      add_jittered(dxr, dx_acc, Tn, H, c.jitter_eps, fa.seed, fa.token_offset, stream);
    } else {
      gemm<float, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, E, {dlogits, 0, E, 1}, {ptr<T>(w.gate_weight), 0, H, 1},
                            dx_acc, 0, H, true);
    }
    if (c.gate == GateKind::kNoisyTopK) {
      if (noisy) {
        if (g.d_noise_weight.defined())
          gemm<float, T, T>(stream, VaryDim::kNone, nullptr, 1, E, H, Tn, {dnoise, 0, 1, E}, {x, 0, H, 1},
                            mut<T>(g.d_noise_weight), 0, H);
        gemm<float, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, E, {dnoise, 0, E, 1}, {ptr<T>(w.noise_weight), 0, H, 1},
                              dx_acc, 0, H, true);
      } else if (g.d_noise_weight.defined()) {
        FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(g.d_noise_weight.data, 0, sizeof(T) * E * H, stream));
      }
    }

    router_scope.reset();
    // Experts: dY out along the routes, scaled by the gate weight.
    T* grows = s.alloc<T>(st.rows_max * H);
    gather_rows<T>(dy, r, true, grows, Tn, k, H, stream);
    T* dpre = s.alloc<T>(st.rows_max * N1);
    T* dxperm = s.alloc<T>(st.rows_max * H);
    // dW2 = actᵀ · g and dW1 = xpermᵀ · dpre per expert (ragged K) on the generic kernel.
    auto generic_wgrad = [&] {
      if (g.d_w2.defined())
        gemm<T, T, T>(stream, VaryDim::kK, r.row_offsets, static_cast<int>(E), I, H, st.rows_per_expert_max,
                      {st.act, 0, 1, I}, {grows, 0, H, 1}, mut<T>(g.d_w2), I * H, H);
      if (g.d_w1.defined())
        gemm<T, T, T>(stream, VaryDim::kK, r.row_offsets, static_cast<int>(E), H, N1, st.rows_per_expert_max,
                      {st.xperm, 0, 1, H}, {dpre, 0, N1, 1}, mut<T>(g.d_w1), H * N1, N1);
    };
    const bool hopper = use_hopper_engine<T>(c, w) && st.rows_max > 0 && aligned16(g.d_w1.data) && aligned16(st.pre) &&
                        aligned16(g.d_w2.data) && !env_flag("FUSEDMOE_NO_HOPPER_BACKWARD");
    // FUSEDMOE_NO_HOPPER_WGRAD=1 runs the weight gradients on the generic tensor-core kernel.
    const bool hopper_wgrad = hopper && !env_flag("FUSEDMOE_NO_HOPPER_WGRAD");
    // The activation backward runs as the epilogue of GEMM1's dgrad (Epilogue::k*Backward; 0.65 ms
    // against 0.53 + 0.46 ms for dgrad and its own kernel on paper-64).
    // FUSEDMOE_NO_FUSED_ACTIVATION_BACKWARD=1 runs the two kernels.
    const bool fused_activation_backward = !env_flag("FUSEDMOE_NO_FUSED_ACTIVATION_BACKWARD");
    if (hopper) {
      // dgrad with the weights read K-major (no transposes), wgrad with ragged K per expert.
      const ElementType et = element_type<T>();
      if (fused_activation_backward) {  // dpre straight from the dgrad of GEMM1's epilogue
        run_grouped_gemm(GroupedGemmArgs{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                                         .max_total_rows = st.rows_max, .n = I, .k = H, .a = grows, .b = w.w2.data,
                                         .c = dpre, .a_type = et, .c_type = et,
                                         .epilogue = backward_epilogue_of(c.ffn), .b_k_major = true,
                                         .activation_input = st.pre},
                         s, stream);
      } else {
        float* dact = s.alloc<float>(st.rows_max * I);
        run_grouped_gemm(GroupedGemmArgs{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                                         .max_total_rows = st.rows_max, .n = I, .k = H, .a = grows, .b = w.w2.data,
                                         .c = dact, .a_type = et, .c_type = ElementType::kF32, .b_k_major = true},
                         s, stream);
        activation_backward<T>(c.ffn, st.pre, dact, dpre, r.row_offsets + E, st.rows_max, I, stream);
      }
      if (hopper_wgrad) {
        if (g.d_w2.defined())
          run_grouped_wgrad(GroupedWgradArgs{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                                             .max_total_rows = st.rows_max, .m = I, .n = H, .a = st.act, .b = grows,
                                             .c = g.d_w2.data, .a_type = et, .c_type = et},
                            s, stream);
        if (g.d_w1.defined())
          run_grouped_wgrad(GroupedWgradArgs{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                                             .max_total_rows = st.rows_max, .m = H, .n = N1, .a = st.xperm, .b = dpre,
                                             .c = g.d_w1.data, .a_type = et, .c_type = et},
                            s, stream);
      } else {
        generic_wgrad();
      }
      run_grouped_gemm(GroupedGemmArgs{.num_groups = static_cast<int>(E), .row_offsets = r.row_offsets,
                                       .max_total_rows = st.rows_max, .n = H, .k = N1, .a = dpre, .b = w.w1.data,
                                       .c = dxperm, .a_type = et, .c_type = et, .b_k_major = true},
                       s, stream);
    } else {
      float* dact = s.alloc<float>(st.rows_max * I);
      gemm<T, T, float>(stream, VaryDim::kM, r.row_offsets, static_cast<int>(E), st.rows_per_expert_max, I, H,
                        {grows, 0, H, 1}, {ptr<T>(w.w2), I * H, 1, H}, dact, 0, I);
      activation_backward<T>(c.ffn, st.pre, dact, dpre, r.row_offsets + E, st.rows_max, I, stream);
      generic_wgrad();
      gemm<T, T, T>(stream, VaryDim::kM, r.row_offsets, static_cast<int>(E), st.rows_per_expert_max, H, N1,
                    {dpre, 0, N1, 1}, {ptr<T>(w.w1), H * N1, 1, N1}, dxperm, 0, H);
    }
    if (g.d_b2.defined()) group_column_sums<T, T>(grows, r.row_offsets, E, H, mut<T>(g.d_b2), stream);
    if (g.d_b1.defined()) group_column_sums<T, T>(dpre, r.row_offsets, E, N1, mut<T>(g.d_b1), stream);

    // Shared experts: the forward's GEMM0 again (activation and pre-activation in one pass), the
    // dgrad of GEMM1 with the activation backward in its epilogue, both weight gradients over
    // all Tn rows, dx += dpre · W1ᵀ in fp32.
    if (shared_on_hopper<T>(c, w, x, Tn) && aligned16(dy) && aligned16(g.d_shared_w1.data) &&
        aligned16(g.d_shared_w2.data)) {
      const int64_t Is = c.shared_size(), Ns1 = c.shared_in_width();
      const ElementType et = element_type<T>();
      T* pre_s = s.alloc<T>(Tn * Ns1);
      T* act_s = s.alloc<T>(Tn * Is);
      T* dpre_s = s.alloc<T>(Tn * Ns1);
      int64_t* all_rows = s.alloc<int64_t>(2);
      set_range(all_rows, Tn, stream);
      for (int64_t e = 0; e < c.num_shared_experts; ++e) {
        const T* w1s = ptr<T>(w.shared_w1) + e * H * Ns1;
        const T* w2s = ptr<T>(w.shared_w2) + e * Is * H;
        run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = Ns1,
                                         .k = H, .a = x, .b = w1s, .c = act_s, .a_type = et, .c_type = et,
                                         .epilogue = epilogue_of(c.ffn), .pre_activation = pre_s},
                         s, stream);
        run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = Is,
                                         .k = H, .a = dy, .b = w2s, .c = dpre_s, .a_type = et, .c_type = et,
                                         .epilogue = backward_epilogue_of(c.ffn), .b_k_major = true,
                                         .activation_input = pre_s},
                         s, stream);
        if (g.d_shared_w2.defined())
          run_grouped_wgrad(GroupedWgradArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .m = Is,
                                             .n = H, .a = act_s, .b = dy, .c = mut<T>(g.d_shared_w2) + e * Is * H,
                                             .a_type = et, .c_type = et},
                            s, stream);
        if (g.d_shared_w1.defined())
          run_grouped_wgrad(GroupedWgradArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .m = H,
                                             .n = Ns1, .a = x, .b = dpre_s, .c = mut<T>(g.d_shared_w1) + e * H * Ns1,
                                             .a_type = et, .c_type = et},
                            s, stream);
        run_grouped_gemm(GroupedGemmArgs{.num_groups = 1, .row_offsets = all_rows, .max_total_rows = Tn, .n = H,
                                         .k = Ns1, .a = dpre_s, .b = w1s, .c = dx_acc, .a_type = et,
                                         .c_type = ElementType::kF32, .accumulate = true, .b_k_major = true},
                         s, stream);
      }
    } else if (c.num_shared_experts > 0) {
      const int64_t Is = c.shared_size(), Ns1 = c.shared_in_width();
      T* pre_s = s.alloc<T>(Tn * Ns1);
      T* act_s = s.alloc<T>(Tn * Is);
      float* dact_s = s.alloc<float>(Tn * Is);
      T* dpre_s = s.alloc<T>(Tn * Ns1);
      for (int64_t e = 0; e < c.num_shared_experts; ++e) {
        const T* w1s = ptr<T>(w.shared_w1) + e * H * Ns1;
        const T* w2s = ptr<T>(w.shared_w2) + e * Is * H;
        gemm<T, T, T>(stream, VaryDim::kNone, nullptr, 1, Tn, Ns1, H, {x, 0, H, 1}, {w1s, 0, Ns1, 1}, pre_s, 0, Ns1);
        if (w.shared_b1.defined()) add_group_bias<T, T>(pre_s, ptr<T>(w.shared_b1) + e * Ns1, nullptr, 1, Tn, Ns1, stream);
        activation_forward<T>(c.ffn, pre_s, act_s, nullptr, Tn, Is, stream);
        gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, Is, H, {dy, 0, H, 1}, {w2s, 0, 1, H}, dact_s, 0, Is);
        activation_backward<T>(c.ffn, pre_s, dact_s, dpre_s, nullptr, Tn, Is, stream);
        if (g.d_shared_w2.defined())
          gemm<T, T, T>(stream, VaryDim::kNone, nullptr, 1, Is, H, Tn, {act_s, 0, 1, Is}, {dy, 0, H, 1},
                        mut<T>(g.d_shared_w2) + e * Is * H, 0, H);
        if (g.d_shared_b2.defined())
          group_column_sums<T, T>(dy, nullptr, 1, H, mut<T>(g.d_shared_b2) + e * H, stream, Tn);
        if (g.d_shared_w1.defined())
          gemm<T, T, T>(stream, VaryDim::kNone, nullptr, 1, H, Ns1, Tn, {x, 0, 1, H}, {dpre_s, 0, Ns1, 1},
                        mut<T>(g.d_shared_w1) + e * H * Ns1, 0, Ns1);
        if (g.d_shared_b1.defined())
          group_column_sums<T, T>(dpre_s, nullptr, 1, Ns1, mut<T>(g.d_shared_b1) + e * Ns1, stream, Tn);
        gemm<T, T, float>(stream, VaryDim::kNone, nullptr, 1, Tn, H, Ns1, {dpre_s, 0, Ns1, 1}, {w1s, 0, 1, Ns1},
                          dx_acc, 0, H, true);
      }
    }
    // dX back along the routes, summed over k, plus the router and shared paths.
    if (g.dx.defined()) combine_rows<T>(dxperm, r, true, dx_acc, mut<T>(g.dx), Tn, k, H, stream);
  }
};

class CudaBackendDispatch final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& a, const std::vector<int64_t>& tpr,
               const ForwardOutputs& o) override {
    check(c);
    const Fp32MathScope math(c.fp32_math == Fp32Math::kTf32);
    switch (c.dtype) {
      case DType::kFloat32: f32_.forward(c, w, a, tpr, o); break;
      case DType::kBFloat16: bf16_.forward(c, w, a, tpr, o); break;
      case DType::kFloat16: f16_.forward(c, w, a, tpr, o); break;
      default: break;
    }
  }
  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& a, const std::vector<int64_t>& tpr,
                const MoeGrads& g) override {
    check(c);
    const Fp32MathScope math(c.fp32_math == Fp32Math::kTf32);
    switch (c.dtype) {
      case DType::kFloat32: f32_.backward(c, w, a, tpr, g); break;
      case DType::kBFloat16: bf16_.backward(c, w, a, tpr, g); break;
      case DType::kFloat16: f16_.backward(c, w, a, tpr, g); break;
      default: break;
    }
  }

 private:
  static void check(const MoeConfig& c) {
    FUSEDMOE_CHECK(c.dtype != DType::kFloat64, "dtype = fp64: the cuda backend supports fp32, bf16 and fp16");
    FUSEDMOE_CHECK(c.world_size == 1, "world_size = " << c.world_size
                   << ": the modular cuda backend runs one rank; use the cpu backend to emulate ranks");
  }
  CudaBackend<float> f32_;
  CudaBackend<__nv_bfloat16> bf16_;
  CudaBackend<__half> f16_;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<BackendImpl> make_cuda_backend() { return std::make_unique<cuda::CudaBackendDispatch>(); }

}  // namespace fusedmoe
