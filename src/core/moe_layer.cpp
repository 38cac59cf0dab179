// src/core/moe_layer.cpp — MoeLayer: argument checks, backend choice, load statistics.
// Every view is checked here (presence, dtype, shape) so that backends see well-formed input.
#include "fusedmoe/moe_layer.hpp"
#include "fusedmoe/transport.hpp"

#include <sstream>

#include "core/backend.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/layout.hpp"
#include "fusedmoe/planner.hpp"
#include "fusedmoe/saved_state.hpp"

namespace fusedmoe {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_string() const {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

std::string to_string(Backend backend) {
  switch (backend) {
    case Backend::kAuto: return "auto";
    case Backend::kCpu: return "cpu";
    case Backend::kNaive: return "naive";
    case Backend::kCuda: return "cuda";
    case Backend::kThreads: return "threads";
    case Backend::kFused: return "fused";
  }
  return "?";
}

Backend parse_backend(const std::string& text) {
  if (text == "auto") return Backend::kAuto;
  if (text == "cpu") return Backend::kCpu;
  if (text == "naive") return Backend::kNaive;
  if (text == "cuda" || text == "gpu") return Backend::kCuda;
  if (text == "threads") return Backend::kThreads;
  if (text == "fused") return Backend::kFused;
  FUSEDMOE_CHECK(false, "backend: unknown backend '" << text << "' (allowed: auto, cpu, naive, cuda, threads, fused)");
}

namespace {

// Backends whose tensors (and every pointer of the call) live in GPU memory.
bool on_device(Backend b) { return b == Backend::kCuda || b == Backend::kFused; }

std::string shape_str(const std::vector<int64_t>& shape) {
  return TensorView{.data = nullptr, .dtype = DType::kFloat32, .shape = shape}.shape_string();
}

// Checks a view: present iff `required`, dtype, exact shape. `name` is the argument's name.
void check_view(const TensorView& view, const char* name, bool required, DType dtype,
                const std::vector<int64_t>& shape, const char* why_absent = nullptr) {
  if (!required) {
    FUSEDMOE_CHECK(!view.defined(), name << ": given, but " << (why_absent ? why_absent : "not used by this config"));
    return;
  }
  FUSEDMOE_CHECK(view.defined(), name << ": missing (expected shape " << shape_str(shape) << ")");
  FUSEDMOE_CHECK(view.dtype == dtype, name << ": dtype " << to_string(view.dtype)
                                           << ", expected " << to_string(dtype) << " (config dtype)");
  FUSEDMOE_CHECK(view.shape == shape, name << ": shape " << view.shape_string() << ", expected "
                                           << shape_str(shape));
}

// Optional outputs / gradients: absent is fine, present must match.
void check_optional(const TensorView& view, const char* name, bool allowed, DType dtype,
                    const std::vector<int64_t>& shape) {
  if (!view.defined()) return;
  check_view(view, name, allowed, dtype, shape, "this config has no such tensor");
}

// Experts held by the expert weights: all E, or — with the fused backend and several ranks —
// the local experts of one rank (the NCCL transport: each process holds only its own experts;
// the fused backend checks that the count is its rank's).
int64_t weight_experts(const MoeConfig& c, const MoeWeights& w, Backend backend) {
  const int64_t E = c.num_experts;
  if (!w.w1.defined() || w.w1.shape.size() != 3 || w.w1.shape[0] == E) return E;
  if (backend != Backend::kFused || c.world_size == 1) return E;
  for (int r = 0; r < c.world_size; ++r)
    if (w.w1.shape[0] == c.num_local_experts(r)) return w.w1.shape[0];
  return E;
}

void check_weights(const MoeConfig& c, const MoeWeights& w, Backend backend) {
  const DType dt = c.dtype;
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.ffn_size, N1 = c.ffn_in_width();
  const int64_t Ew = weight_experts(c, w, backend);
  const int64_t S = c.num_shared_experts, Is = c.shared_size(), Ns1 = c.shared_in_width();
  check_view(w.gate_weight, "gate_weight", true, dt, {E, H});
  check_view(w.gate_bias, "gate_bias", c.gate_bias, dt, {E}, "config.gate_bias is off");
  check_view(w.noise_weight, "noise_weight", c.gate == GateKind::kNoisyTopK, dt, {E, H},
             "only the noisy gate has a noise weight");
  if (w.selection_bias.defined())
    check_view(w.selection_bias, "selection_bias", c.gate == GateKind::kSigmoidTopK, dt, {E},
               "only the sigmoid gate has a selection bias");
  check_view(w.w1, "w1", true, dt, {Ew, H, N1});
  check_view(w.w2, "w2", true, dt, {Ew, I, H});
  check_view(w.b1, "b1", c.expert_bias, dt, {Ew, N1}, "config.expert_bias is off");
  check_view(w.b2, "b2", c.expert_bias, dt, {Ew, H}, "config.expert_bias is off");
  check_view(w.shared_w1, "shared_w1", S > 0, dt, {S, H, Ns1}, "config.num_shared_experts is 0");
  check_view(w.shared_w2, "shared_w2", S > 0, dt, {S, Is, H}, "config.num_shared_experts is 0");
  check_view(w.shared_b1, "shared_b1", S > 0 && c.expert_bias, dt, {S, Ns1},
             "no shared experts or config.expert_bias is off");
  check_view(w.shared_b2, "shared_b2", S > 0 && c.expert_bias, dt, {S, H},
             "no shared experts or config.expert_bias is off");
}

}  // namespace

std::vector<int64_t> resolve_tokens_per_rank(const MoeConfig& config, int64_t num_tokens,
                                             const std::vector<int64_t>& requested) {
  const int W = config.world_size;
  if (requested.empty()) {
    FUSEDMOE_CHECK(num_tokens % W == 0, "tokens_per_rank: empty, so x's " << num_tokens
                   << " tokens are split evenly, but they are not a multiple of world_size = " << W
                   << " (give tokens_per_rank)");
    return std::vector<int64_t>(static_cast<size_t>(W), num_tokens / W);
  }
  FUSEDMOE_CHECK(static_cast<int>(requested.size()) == W,
                 "tokens_per_rank: " << requested.size() << " entries, expected world_size = " << W);
  int64_t sum = 0;
  for (size_t r = 0; r < requested.size(); ++r) {
    FUSEDMOE_CHECK(requested[r] >= 0, "tokens_per_rank[" << r << "] = " << requested[r] << ": must be >= 0");
    sum += requested[r];
  }
  FUSEDMOE_CHECK(sum == num_tokens, "tokens_per_rank: entries sum to " << sum
                                    << ", expected x's token count " << num_tokens);
  return requested;
}

// With the NCCL transport the fused layer runs one rank per process: x holds this rank's
// tokens and every rank has as many.
std::vector<int64_t> MoeLayer::tokens_of_ranks(int64_t num_tokens, const std::vector<int64_t>& requested) const {
  if (backend_ != Backend::kFused || !fused_transport().nccl) return resolve_tokens_per_rank(config_, num_tokens, requested);
  for (const int64_t n : requested)
    FUSEDMOE_CHECK(n == num_tokens, "tokens_per_rank: with the NCCL transport x holds this rank's tokens and every "
                   "rank has the same count (" << num_tokens << "); got " << n);
  return std::vector<int64_t>(static_cast<size_t>(config_.world_size), num_tokens);
}

MoeLayer::MoeLayer(MoeConfig config, MoeWeights weights, Backend backend)
    : config_(std::move(config)), backend_(backend) {
  config_.validate();
  if (backend_ == Backend::kAuto) backend_ = cuda_available() ? Backend::kCuda : Backend::kCpu;
  switch (backend_) {
    case Backend::kCpu: impl_ = make_cpu_backend(); break;
    case Backend::kNaive: impl_ = make_naive_backend(); break;
    case Backend::kThreads: impl_ = make_threads_backend(); break;
    case Backend::kCuda:
    case Backend::kFused: {
      const std::string name = to_string(backend_);
      impl_ = backend_ == Backend::kCuda ? make_cuda_backend() : make_fused_backend();
      FUSEDMOE_CHECK(impl_ != nullptr, "backend: " << name << " requested, but this build of fusedmoe has no CUDA backend");
      FUSEDMOE_CHECK(cuda_device_present(), "backend: " << name << " requested, but no CUDA device is present");
      FUSEDMOE_CHECK(config_.dtype != DType::kFloat64, "backend: " << name << " supports fp32, bf16 and fp16, not the config's dtype = fp64");
      break;
    }
    case Backend::kAuto: break;
  }
  if (backend_ != Backend::kCuda && backend_ != Backend::kFused) {
    FUSEDMOE_CHECK(config_.dtype == DType::kFloat32 || config_.dtype == DType::kFloat64,
                   "dtype = " << to_string(config_.dtype) << ": the " << to_string(backend_)
                              << " backend supports fp32 and fp64");
  }
  set_weights(std::move(weights));
  reset_load_stats();
}

MoeLayer::~MoeLayer() = default;
MoeLayer::MoeLayer(MoeLayer&&) noexcept = default;
MoeLayer& MoeLayer::operator=(MoeLayer&&) noexcept = default;

void MoeLayer::set_weights(MoeWeights weights) {
  check_weights(config_, weights, backend_);
  weights_ = std::move(weights);
}

void MoeLayer::reset_load_stats() {
  stats_ = LoadStats{};
  stats_.routed.assign(static_cast<size_t>(config_.num_experts), 0);
  stats_.kept.assign(static_cast<size_t>(config_.num_experts), 0);
}

bool MoeLayer::cuda_available() { return cuda_device_present(); }

void MoeLayer::check_forward(const ForwardArgs& args, const char* what) const {
  FUSEDMOE_CHECK(args.x.defined(), what << ": x is missing (expected shape [T, " << config_.hidden_size << "])");
  FUSEDMOE_CHECK(args.x.shape.size() == 2 && args.x.shape[1] == config_.hidden_size && args.x.shape[0] >= 0,
                 "x: shape " << args.x.shape_string() << ", expected [T, hidden_size = "
                             << config_.hidden_size << "]");
  FUSEDMOE_CHECK(args.x.dtype == config_.dtype, "x: dtype " << to_string(args.x.dtype) << ", expected "
                                                            << to_string(config_.dtype) << " (config dtype)");
  FUSEDMOE_CHECK(args.token_offset >= 0, "token_offset = " << args.token_offset << ": must be >= 0");
  if (args.forced_topk_idx && !on_device(backend_)) {  // device memory otherwise
    const int64_t n = args.x.shape[0] * config_.top_k;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = args.forced_topk_idx[i];
      FUSEDMOE_CHECK(e >= -1 && e < config_.num_experts,
                     "forced_topk_idx[" << i / config_.top_k << ", " << i % config_.top_k << "] = " << e
                     << ": must be an expert in [0, " << config_.num_experts << ") or -1");
      for (int64_t j = i - i % config_.top_k; j < i; ++j)
        FUSEDMOE_CHECK(e < 0 || args.forced_topk_idx[j] != e,
                       "forced_topk_idx[" << i / config_.top_k << "]: expert " << e << " appears twice");
    }
  }
}

void MoeLayer::forward(const ForwardArgs& args, const ForwardOutputs& out) {
  check_forward(args, "forward");
  const int64_t T = args.x.shape[0];
  const auto tokens_per_rank = tokens_of_ranks(T, args.tokens_per_rank);
  check_view(out.y, "y", true, config_.dtype, {T, config_.hidden_size});
  check_optional(out.topk_weight, "topk_weight", true, config_.dtype, {T, config_.top_k});
  if (on_device(backend_)) {
    // Counts stay on the device (reading them would synchronise): per-expert statistics come
    // from the expert_counts / kept_counts outputs.
    impl_->forward(config_, weights_, args, tokens_per_rank, out);
  } else {
    std::vector<int64_t> routed(static_cast<size_t>(config_.num_experts)), kept(routed.size());
    ForwardOutputs o = out;
    if (!o.expert_counts) o.expert_counts = routed.data();
    if (!o.kept_counts) o.kept_counts = kept.data();
    impl_->forward(config_, weights_, args, tokens_per_rank, o);
    for (int64_t e = 0; e < config_.num_experts; ++e) {
      stats_.routed[static_cast<size_t>(e)] += o.expert_counts[e];
      stats_.kept[static_cast<size_t>(e)] += o.kept_counts[e];
    }
  }
  stats_.tokens += T;
  stats_.calls += 1;
}

void MoeLayer::backward(const BackwardArgs& args, const MoeGrads& g) {
  check_forward(args.forward, "backward");
  const int64_t T = args.forward.x.shape[0];
  const auto tokens_per_rank = resolve_tokens_per_rank(config_, T, args.forward.tokens_per_rank);
  check_view(args.dy, "dy", true, config_.dtype, {T, config_.hidden_size});
  const DType dt = config_.dtype;
  const int64_t E = config_.num_experts, H = config_.hidden_size, I = config_.ffn_size;
  const int64_t N1 = config_.ffn_in_width(), S = config_.num_shared_experts;
  const int64_t Is = config_.shared_size(), Ns1 = config_.shared_in_width();
  check_optional(g.dx, "dx", true, dt, {T, H});
  check_optional(g.d_gate_weight, "d_gate_weight", true, dt, {E, H});
  check_optional(g.d_gate_bias, "d_gate_bias", config_.gate_bias, dt, {E});
  check_optional(g.d_noise_weight, "d_noise_weight", config_.gate == GateKind::kNoisyTopK, dt, {E, H});
  check_optional(g.d_w1, "d_w1", true, dt, {E, H, N1});
  check_optional(g.d_w2, "d_w2", true, dt, {E, I, H});
  check_optional(g.d_b1, "d_b1", config_.expert_bias, dt, {E, N1});
  check_optional(g.d_b2, "d_b2", config_.expert_bias, dt, {E, H});
  check_optional(g.d_shared_w1, "d_shared_w1", S > 0, dt, {S, H, Ns1});
  check_optional(g.d_shared_w2, "d_shared_w2", S > 0, dt, {S, Is, H});
  check_optional(g.d_shared_b1, "d_shared_b1", S > 0 && config_.expert_bias, dt, {S, Ns1});
  check_optional(g.d_shared_b2, "d_shared_b2", S > 0 && config_.expert_bias, dt, {S, H});
  impl_->backward(config_, weights_, args, tokens_per_rank, g);
}

size_t MoeLayer::saved_bytes(int64_t num_tokens) const {
  FUSEDMOE_CHECK(num_tokens >= 0, "saved_bytes: num_tokens = " << num_tokens << ": must be >= 0");
  // The fused backend keeps a training forward's state through the modular forward (W = 1).
  const bool saves = backend_ == Backend::kCuda || (backend_ == Backend::kFused && config_.world_size == 1);
  if (!saves) return 0;
  return static_cast<size_t>(SavedLayout::make(config_, num_tokens).total);
}

size_t MoeLayer::workspace_size(int64_t max_tokens_per_rank) const {
  FUSEDMOE_CHECK(max_tokens_per_rank >= 0, "max_tokens_per_rank = " << max_tokens_per_rank << ": must be >= 0");
  TilePlan plan = make_plan(config_, max_tokens_per_rank, DeviceInfo{});
  return static_cast<size_t>(WorkspaceLayout::make(plan.layout).total_bytes);
}

}  // namespace fusedmoe
