// bindings/torch/binding.cpp — the torch ops fusedmoe::moe_forward and fusedmoe::moe_backward.
//
// The only file of fusedmoe that includes torch headers. It turns torch tensors into
// fusedmoe::TensorView (raw pointer, dtype, shape), builds a fusedmoe::MoeLayer per call from
// the config string (fusedmoe::to_config_string) and runs it. Registered for the CPU and CUDA
// dispatch keys: CPU tensors run the cpu (or naive) backend, CUDA tensors the cuda backend on
// torch's current stream of the tensors' device (taken through c10's device-generic stream
// interface, so this file includes no CUDA header and never synchronises). The Python package
// (python/fusedmoe/_ops.py) adds the fake (meta) kernels and autograd.
//
// Errors: a bad tensor argument raises TypeError (dtype) or ValueError (device, layout, rank),
// a bad config string or backend name ValueError, each naming the argument; errors of the layer
// (fusedmoe::Error from MoeLayer: shapes, missing weights, routing indices, tokens_per_rank)
// become RuntimeError with the library's message.
//
// Set FUSEDMOE_POISON_OUTPUTS=1 to fill every output with NaN (indices with INT32_MIN) before
// the library runs, so that an element the library forgets to write shows up in tests.
//
// Test (from the repository root, after building with -DFUSEDMOE_BUILD_TORCH=ON):
//   PYTHONPATH=python FUSEDMOE_OPS_LIBRARY=<build>/python/fusedmoe/_fusedmoe_ops.so
//   python3 -m pytest tests/python
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fusedmoe/fusedmoe.hpp"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Non-null address for present tensors with no elements: TensorView::defined() means
// "data != nullptr", and torch gives empty tensors a null data pointer.
alignas(64) double g_empty_storage[8];

bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("FUSEDMOE_POISON_OUTPUTS");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  return enabled;
}

std::optional<fusedmoe::DType> dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return fusedmoe::DType::kFloat32;
    case at::kDouble: return fusedmoe::DType::kFloat64;
    case at::kBFloat16: return fusedmoe::DType::kBFloat16;
    case at::kHalf: return fusedmoe::DType::kFloat16;
    default: return std::nullopt;
  }
}

at::ScalarType scalar_type_of(fusedmoe::DType dtype) {
  switch (dtype) {
    case fusedmoe::DType::kFloat32: return at::kFloat;
    case fusedmoe::DType::kFloat64: return at::kDouble;
    case fusedmoe::DType::kBFloat16: return at::kBFloat16;
    case fusedmoe::DType::kFloat16: return at::kHalf;
  }
  return at::kFloat;
}

void* data_or_dummy(const Tensor& t) {
  return t.numel() == 0 ? static_cast<void*>(g_empty_storage) : t.data_ptr();
}

// The parsed call: config, backend and the contiguous tensors whose views the layer reads.
struct Call {
  fusedmoe::MoeConfig config;
  fusedmoe::Backend backend = fusedmoe::Backend::kAuto;
  c10::Device device = c10::Device(c10::kCPU);
  std::vector<Tensor> keep_alive;  // contiguous copies (when the input was not contiguous)

  bool on_cuda() const { return device.is_cuda(); }

  void check_cpu(const Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.device() == device, "fusedmoe: ", name, ": on device ", t.device(),
                      ", expected x's device ", device);
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedmoe: ", name,
                      ": must be a dense (strided) tensor, got layout ", t.layout());
  }

  // A floating-point tensor argument of the config's dtype.
  fusedmoe::TensorView view(const Tensor& t, const char* name) {
    check_cpu(t, name);
    const auto dtype = dtype_of(t.scalar_type());
    const bool supported =
        dtype.has_value() && (on_cuda() ? *dtype != fusedmoe::DType::kFloat64
                                        : (*dtype == fusedmoe::DType::kFloat32 || *dtype == fusedmoe::DType::kFloat64));
    TORCH_CHECK_TYPE(supported, "fusedmoe: ", name, ": dtype ", t.scalar_type(), " is not supported on ",
                     device.type(), on_cuda() ? " (expected float32, bfloat16 or float16)" : " (expected float32 or float64)");
    TORCH_CHECK_TYPE(*dtype == config.dtype, "fusedmoe: ", name, ": dtype ", t.scalar_type(),
                     " does not match the config dtype ", fusedmoe::to_string(config.dtype),
                     " (expected ", scalar_type_of(config.dtype), ")");
    Tensor c = t.contiguous();
    if (!c.is_same(t)) keep_alive.push_back(c);
    return fusedmoe::TensorView{.data = data_or_dummy(c), .dtype = *dtype,
                                .shape = std::vector<int64_t>(c.sizes().begin(), c.sizes().end())};
  }

  fusedmoe::TensorView view(const OptTensor& t, const char* name) {
    if (!t.has_value() || !t->defined()) return {};
    return view(*t, name);
  }
};

Call make_call(std::string_view config_text, std::string_view backend_text, const Tensor& x) {
  Call call;
  call.device = x.device();
  try {
    call.config = fusedmoe::parse_config_string(config_text);
    call.config.validate();
    call.backend = fusedmoe::parse_backend(std::string(backend_text));
  } catch (const fusedmoe::Error& e) {
    TORCH_CHECK_VALUE(false, "fusedmoe: ", e.what());
  }
  if (call.on_cuda()) {
    TORCH_CHECK_VALUE(call.backend == fusedmoe::Backend::kAuto || call.backend == fusedmoe::Backend::kCuda ||
                          call.backend == fusedmoe::Backend::kFused,
                      "fusedmoe: backend '", backend_text, "' cannot run on CUDA tensors (use 'auto', 'cuda' or 'fused')");
    if (call.backend == fusedmoe::Backend::kAuto) call.backend = fusedmoe::Backend::kCuda;
  } else {
    TORCH_CHECK_VALUE(call.backend != fusedmoe::Backend::kCuda && call.backend != fusedmoe::Backend::kFused,
                      "fusedmoe: backend '", backend_text, "' cannot run the CPU kernel of the op (the tensors are on CPU)");
    // NOTE: "auto" must not resolve to the CUDA backend (which MoeLayer would pick in a CUDA
    // build with a device present) while the tensors live in host memory.
    if (call.backend == fusedmoe::Backend::kAuto) call.backend = fusedmoe::Backend::kCpu;
  }
  return call;
}

// The inputs shared by moe_forward and moe_backward, as views.
struct Inputs {
  fusedmoe::MoeWeights weights;
  fusedmoe::ForwardArgs args;
  Tensor forced_idx;  // int32 [T, k], contiguous, when given
  int64_t num_tokens = 0;
};

Inputs make_inputs(Call& call, const Tensor& x, const Tensor& gate_weight, const OptTensor& gate_bias,
                   const OptTensor& noise_weight, const OptTensor& selection_bias, const Tensor& w1,
                   const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                   const OptTensor& shared_w1, const OptTensor& shared_b1, const OptTensor& shared_w2,
                   const OptTensor& shared_b2, const OptTensor& forced_topk_idx,
                   c10::IntArrayRef tokens_per_rank, bool training, int64_t seed,
                   int64_t token_offset) {
  Inputs in;
  const auto& c = call.config;
  TORCH_CHECK_VALUE(x.dim() == 2, "fusedmoe: x: expected a 2-D tensor [T, hidden_size = ",
                    c.hidden_size, "], got shape ", x.sizes());
  in.num_tokens = x.size(0);
  in.args.x = call.view(x, "x");
  in.weights.gate_weight = call.view(gate_weight, "gate_weight");
  in.weights.gate_bias = call.view(gate_bias, "gate_bias");
  in.weights.noise_weight = call.view(noise_weight, "noise_weight");
  in.weights.selection_bias = call.view(selection_bias, "selection_bias");
  in.weights.w1 = call.view(w1, "w1");
  in.weights.b1 = call.view(b1, "b1");
  in.weights.w2 = call.view(w2, "w2");
  in.weights.b2 = call.view(b2, "b2");
  in.weights.shared_w1 = call.view(shared_w1, "shared_w1");
  in.weights.shared_b1 = call.view(shared_b1, "shared_b1");
  in.weights.shared_w2 = call.view(shared_w2, "shared_w2");
  in.weights.shared_b2 = call.view(shared_b2, "shared_b2");
  in.args.tokens_per_rank.assign(tokens_per_rank.begin(), tokens_per_rank.end());
  in.args.training = training;
  in.args.seed = static_cast<uint64_t>(seed);
  in.args.token_offset = token_offset;
  if (call.on_cuda()) {
    const c10::impl::VirtualGuardImpl guard_impl(call.device.type());
    in.args.stream = guard_impl.getStream(call.device).native_handle();
  }
  if (forced_topk_idx.has_value() && forced_topk_idx->defined()) {
    const Tensor& f = *forced_topk_idx;
    call.check_cpu(f, "forced_topk_idx");
    TORCH_CHECK_TYPE(at::isIntegralType(f.scalar_type(), /*includeBool=*/false),
                     "fusedmoe: forced_topk_idx: dtype ", f.scalar_type(),
                     " is not an integer type (expected int32 or int64)");
    TORCH_CHECK_VALUE(f.dim() == 2 && f.size(0) == in.num_tokens && f.size(1) == c.top_k,
                      "fusedmoe: forced_topk_idx: shape ", f.sizes(), ", expected [T = ",
                      in.num_tokens, ", top_k = ", c.top_k, "]");
    in.forced_idx = f.to(at::kInt).contiguous();
    in.args.forced_topk_idx = in.num_tokens == 0 ? reinterpret_cast<const int32_t*>(g_empty_storage)
                                                 : in.forced_idx.data_ptr<int32_t>();
  }
  return in;
}

// Runs `body`, turning the library's exceptions into torch errors (Python RuntimeError).
template <typename F>
void translate_errors(const char* op, F&& body) {
  try {
    body();
  } catch (const fusedmoe::Error& e) {
    TORCH_CHECK(false, "fusedmoe.", op, ": ", e.what());
  }
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardResult moe_forward(const Tensor& x, const Tensor& gate_weight, const OptTensor& gate_bias,
                          const OptTensor& noise_weight, const OptTensor& selection_bias,
                          const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                          const OptTensor& b2, const OptTensor& shared_w1,
                          const OptTensor& shared_b1, const OptTensor& shared_w2,
                          const OptTensor& shared_b2, const OptTensor& forced_topk_idx,
                          std::string_view config, c10::IntArrayRef tokens_per_rank, bool training,
                          int64_t seed, int64_t token_offset, std::string_view backend,
                          bool save_for_backward) {
  const c10::DeviceGuard device_guard(x.device());
  Call call = make_call(config, backend, x);
  Inputs in = make_inputs(call, x, gate_weight, gate_bias, noise_weight, selection_bias, w1, b1, w2,
                          b2, shared_w1, shared_b1, shared_w2, shared_b2, forced_topk_idx,
                          tokens_per_rank, training, seed, token_offset);
  const int64_t T = in.num_tokens, H = call.config.hidden_size, E = call.config.num_experts;
  const int64_t k = call.config.top_k;
  const auto float_options = x.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor y = at::empty({T, H}, float_options);
  Tensor topk_idx = at::empty({T, k}, x.options().dtype(at::kInt));
  Tensor topk_weight = at::empty({T, k}, float_options);
  Tensor kept = at::empty({T, k}, x.options().dtype(at::kBool));
  Tensor expert_counts = at::empty({E}, x.options().dtype(at::kLong));
  Tensor kept_counts = at::empty({E}, x.options().dtype(at::kLong));
  // Losses: the CUDA backends write both straight into the two 0-dim outputs in x's dtype (no
  // conversion launches after the layer); the CPU ones write two doubles, converted below, and
  // may leave one unwritten, which then reads NaN.
  Tensor aux = at::empty({}, x.options());
  Tensor z = at::empty({}, x.options());
  Tensor losses = call.on_cuda() ? Tensor() : at::empty({2}, x.options().dtype(at::kDouble));
  if (poison_outputs()) {
    y.fill_(std::numeric_limits<double>::quiet_NaN());
    topk_weight.fill_(std::numeric_limits<double>::quiet_NaN());
    topk_idx.fill_(std::numeric_limits<int32_t>::min());
    expert_counts.fill_(std::numeric_limits<int64_t>::min());
    kept_counts.fill_(std::numeric_limits<int64_t>::min());
  }
  if (poison_outputs()) {
    aux.fill_(std::numeric_limits<double>::quiet_NaN());
    z.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (!call.on_cuda()) losses.fill_(std::numeric_limits<double>::quiet_NaN());
  Tensor saved = at::empty({0}, x.options().dtype(at::kByte));
  translate_errors("moe_forward", [&] {
    fusedmoe::MoeLayer layer(call.config, in.weights, call.backend);
    fusedmoe::ForwardOutputs out;
    // What backward needs, kept by the backends that can (uint8 [saved_bytes(T)]; [0] otherwise).
    const size_t saved_bytes = save_for_backward ? layer.saved_bytes(T) : 0;
    if (saved_bytes > 0) {
      saved = at::empty({static_cast<int64_t>(saved_bytes)}, x.options().dtype(at::kByte));
      out.saved = saved.data_ptr();
    }
    out.y = fusedmoe::TensorView{.data = data_or_dummy(y), .dtype = call.config.dtype, .shape = {T, H}};
    out.topk_idx = T == 0 ? nullptr : topk_idx.data_ptr<int32_t>();
    out.topk_weight =
        fusedmoe::TensorView{.data = data_or_dummy(topk_weight), .dtype = call.config.dtype, .shape = {T, k}};
    // NOTE: bool is one byte holding 0 or 1, which is what the library writes.
    out.kept = T == 0 ? nullptr : reinterpret_cast<uint8_t*>(kept.data_ptr<bool>());
    out.expert_counts = expert_counts.data_ptr<int64_t>();
    out.kept_counts = kept_counts.data_ptr<int64_t>();
    if (call.on_cuda()) {
      out.aux_loss_value = aux.data_ptr();
      out.z_loss_value = z.data_ptr();
    } else {
      out.aux_loss = losses.data_ptr<double>();
      out.z_loss = losses.data_ptr<double>() + 1;
    }
    layer.forward(in.args, out);
  });
  if (!call.on_cuda()) {
    aux.copy_(losses[0]);
    z.copy_(losses[1]);
  }
  return {y, topk_idx, topk_weight, kept, expert_counts, kept_counts, aux, z, saved};
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor, Tensor>;

// The value of an upstream loss gradient: a 0-dim (or one-element) tensor; undefined = 0.
double scalar_of(const Tensor& t, const char* name) {
  if (!t.defined()) return 0.0;
  TORCH_CHECK_VALUE(t.numel() == 1, "fusedmoe: ", name,
                    ": expected a single value (0-dim tensor), got shape ", t.sizes());
  return t.item<double>();
}

BackwardResult moe_backward(const Tensor& x, const Tensor& gate_weight, const OptTensor& gate_bias,
                            const OptTensor& noise_weight, const OptTensor& selection_bias,
                            const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                            const OptTensor& b2, const OptTensor& shared_w1,
                            const OptTensor& shared_b1, const OptTensor& shared_w2,
                            const OptTensor& shared_b2, const OptTensor& forced_topk_idx,
                            std::string_view config, c10::IntArrayRef tokens_per_rank,
                            bool training, int64_t seed, int64_t token_offset,
                            std::string_view backend, const Tensor& dy, const Tensor& d_aux,
                            const Tensor& d_z, const OptTensor& saved) {
  const c10::DeviceGuard device_guard(x.device());
  Call call = make_call(config, backend, x);
  Inputs in = make_inputs(call, x, gate_weight, gate_bias, noise_weight, selection_bias, w1, b1, w2,
                          b2, shared_w1, shared_b1, shared_w2, shared_b2, forced_topk_idx,
                          tokens_per_rank, training, seed, token_offset);
  fusedmoe::BackwardArgs args;
  args.forward = in.args;
  args.dy = call.view(dy, "dy");
  Tensor saved_bytes;  // the forward's saved state (moe_forward's `saved` output), when given
  if (saved.has_value() && saved->defined() && saved->numel() > 0) {
    call.check_cpu(*saved, "saved");
    TORCH_CHECK_VALUE(saved->scalar_type() == at::kByte && saved->dim() == 1,
                      "fusedmoe: saved: expected the uint8 vector moe_forward returned as `saved`, got ",
                      saved->scalar_type(), " of shape ", saved->sizes());
    saved_bytes = saved->contiguous();
    args.saved = saved_bytes.data_ptr();
  }
  Tensor d_losses;  // CUDA: the loss gradients stay on the device (read by the kernel)
  if (call.on_cuda()) {
    for (const auto& [t, name] : {std::pair{&d_aux, "d_aux"}, std::pair{&d_z, "d_z"}})
      TORCH_CHECK_VALUE(!t->defined() || t->numel() == 1, "fusedmoe: ", name,
                        ": expected a single value (0-dim tensor), got shape ", t->sizes());
    auto value_or_zero = [&](const Tensor& t) {
      return t.defined() ? t.reshape({1}).to(x.device(), at::kDouble) : at::zeros({1}, x.options().dtype(at::kDouble));
    };
    d_losses = at::cat({value_or_zero(d_aux), value_or_zero(d_z)});
    args.d_aux_device = d_losses.data_ptr<double>();
    args.d_z_device = d_losses.data_ptr<double>() + 1;
  } else {
    args.d_aux = scalar_of(d_aux, "d_aux");
    args.d_z = scalar_of(d_z, "d_z");
  }

  const bool poison = poison_outputs();
  // A gradient like `like` when the input is present, an empty tensor otherwise (a new one each
  // time: outputs of an op must not alias each other).
  auto grad_for = [&](const OptTensor& like, fusedmoe::TensorView& view) -> Tensor {
    if (!like.has_value() || !like->defined()) return at::empty({0}, x.options());
    Tensor g = at::empty(like->sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (poison) g.fill_(std::numeric_limits<double>::quiet_NaN());
    view = fusedmoe::TensorView{.data = data_or_dummy(g), .dtype = call.config.dtype,
                                .shape = std::vector<int64_t>(g.sizes().begin(), g.sizes().end())};
    return g;
  };
  fusedmoe::MoeGrads grads;
  Tensor dx = grad_for(x, grads.dx);
  Tensor d_gate_weight = grad_for(gate_weight, grads.d_gate_weight);
  Tensor d_gate_bias = grad_for(gate_bias, grads.d_gate_bias);
  Tensor d_noise_weight = grad_for(noise_weight, grads.d_noise_weight);
  Tensor d_w1 = grad_for(w1, grads.d_w1);
  Tensor d_b1 = grad_for(b1, grads.d_b1);
  Tensor d_w2 = grad_for(w2, grads.d_w2);
  Tensor d_b2 = grad_for(b2, grads.d_b2);
  Tensor d_shared_w1 = grad_for(shared_w1, grads.d_shared_w1);
  Tensor d_shared_b1 = grad_for(shared_b1, grads.d_shared_b1);
  Tensor d_shared_w2 = grad_for(shared_w2, grads.d_shared_w2);
  Tensor d_shared_b2 = grad_for(shared_b2, grads.d_shared_b2);
  translate_errors("moe_backward", [&] {
    fusedmoe::MoeLayer layer(call.config, in.weights, call.backend);
    if (args.saved) {
      const size_t expected = layer.saved_bytes(in.num_tokens);
      TORCH_CHECK_VALUE(static_cast<size_t>(saved_bytes.numel()) == expected, "fusedmoe: saved: ",
                        saved_bytes.numel(), " bytes, but a forward of these ", in.num_tokens,
                        " tokens on this backend saves ", expected, " (pass the `saved` output of the same forward)");
    }
    layer.backward(args, grads);
  });
  return {dx, d_gate_weight, d_gate_bias, d_noise_weight, d_w1, d_b1, d_w2, d_b2,
          d_shared_w1, d_shared_b1, d_shared_w2, d_shared_b2};
}

// The fused kernel's debug timeline (fusedmoe/timeline.hpp): recording on/off, and the events
// of the last recorded forward as int64 [n, 6] = (start_ns, end_ns, block, sm, rank, kind).
void set_fused_timeline(bool enabled) { fusedmoe::set_fused_timeline(enabled); }

at::Tensor fused_timeline() {
  const std::vector<fusedmoe::FusedEvent> events = fusedmoe::fused_timeline();
  at::Tensor out = at::empty({static_cast<int64_t>(events.size()), 6}, at::kLong);
  auto a = out.accessor<int64_t, 2>();
  for (size_t i = 0; i < events.size(); ++i) {
    const auto& e = events[i];
    const int64_t row[6] = {e.start_ns, e.end_ns, e.block, e.sm, e.rank, static_cast<int64_t>(e.kind)};
    for (int j = 0; j < 6; ++j) a[static_cast<int64_t>(i)][j] = row[j];
  }
  return out;
}

// The fused kernel's transport (fusedmoe/transport.hpp): an NCCL unique id as uint8 [128], the
// collective switch to the NCCL transport / back to local ranks, and [nccl, world, rank].
at::Tensor nccl_unique_id() {
  fusedmoe::NcclUniqueId id;
  translate_errors("nccl_unique_id", [&] { id = fusedmoe::nccl_unique_id(); });
  at::Tensor out = at::empty({static_cast<int64_t>(id.bytes.size())}, at::kByte);
  std::memcpy(out.data_ptr(), id.bytes.data(), id.bytes.size());
  return out;
}

void use_nccl_transport(const at::Tensor& id, int64_t world, int64_t rank) {
  TORCH_CHECK(id.device().is_cpu() && id.scalar_type() == at::kByte && id.numel() == 128,
              "use_nccl_transport: id must be a CPU uint8 tensor of 128 bytes (from nccl_unique_id)");
  fusedmoe::NcclUniqueId nid;
  const at::Tensor bytes = id.contiguous();
  std::memcpy(nid.bytes.data(), bytes.data_ptr(), nid.bytes.size());
  translate_errors("use_nccl_transport",
                   [&] { fusedmoe::use_nccl_transport(nid, static_cast<int>(world), static_cast<int>(rank)); });
}

void use_local_transport() { translate_errors("use_local_transport", [] { fusedmoe::use_local_transport(); }); }

std::vector<int64_t> fused_transport() {
  const fusedmoe::TransportInfo t = fusedmoe::fused_transport();
  return {t.nccl ? 1 : 0, t.world, t.rank};
}

}  // namespace

#define FUSEDMOE_OP_INPUTS                                                                       \
  "Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor? noise_weight, "                      \
  "Tensor? selection_bias, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? shared_w1, "    \
  "Tensor? shared_b1, Tensor? shared_w2, Tensor? shared_b2, Tensor? forced_topk_idx, "           \
  "str config, int[] tokens_per_rank, bool training, int seed, int token_offset, str backend"

TORCH_LIBRARY(fusedmoe, m) {
  m.def("moe_forward(" FUSEDMOE_OP_INPUTS
        ", bool save_for_backward=False) -> (Tensor y, Tensor topk_idx, Tensor topk_weight, Tensor kept, "
        "Tensor expert_counts, Tensor kept_counts, Tensor aux_loss, Tensor z_loss, Tensor saved)");
  m.def("moe_backward(" FUSEDMOE_OP_INPUTS
        ", Tensor dy, Tensor d_aux, Tensor d_z, Tensor? saved=None) -> (Tensor dx, Tensor d_gate_weight, "
        "Tensor d_gate_bias, Tensor d_noise_weight, Tensor d_w1, Tensor d_b1, Tensor d_w2, "
        "Tensor d_b2, Tensor d_shared_w1, Tensor d_shared_b1, Tensor d_shared_w2, "
        "Tensor d_shared_b2)");
  m.def("set_fused_timeline(bool enabled) -> ()", &set_fused_timeline);
  m.def("fused_timeline() -> Tensor", &fused_timeline);
  m.def("nccl_unique_id() -> Tensor", &nccl_unique_id);
  m.def("use_nccl_transport(Tensor id, int world, int rank) -> ()", &use_nccl_transport);
  m.def("use_local_transport() -> ()", &use_local_transport);
  m.def("fused_transport() -> int[]", &fused_transport);
}

TORCH_LIBRARY_IMPL(fusedmoe, CPU, m) {
  m.impl("moe_forward", &moe_forward);
  m.impl("moe_backward", &moe_backward);
}

// The same kernels serve CUDA tensors: the library's cuda backend reads device pointers and
// runs on the stream taken above (a CPU-only build of the library reports that it has no CUDA
// backend when such a call arrives).
TORCH_LIBRARY_IMPL(fusedmoe, CUDA, m) {
  m.impl("moe_forward", &moe_forward);
  m.impl("moe_backward", &moe_backward);
}
