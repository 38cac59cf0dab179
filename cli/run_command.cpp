// cli/run_command.cpp — see run_command.hpp.
//
// Flow: parse flags → validate the config and the host memory the run needs → choose the backend
// (one line says which and why) → random weights and inputs → forward and backward on the chosen
// backend (--iters times, outputs poisoned with NaN before every call; for cuda the buffers are
// staged in device memory, buffer_space.hpp) → the same once on the naive reference → compare →
// print the table (report.cpp).
#include "run_command.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <sstream>

#include "buffer_space.hpp"
#include "device_memory.hpp"
#include "fusedmoe/transport.hpp"
#include "launcher.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/host_tensors.hpp"
#include "progress.hpp"
#include "report.hpp"

namespace fusedmoe::cli {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kAuxLossGradient = 0.01;  // d_aux: exercises the balance-loss gradient
constexpr double kZLossGradient = 0.001;   // d_z: exercises the z-loss gradient
constexpr int32_t kUnwrittenExpert = -2;   // poison of topk_idx (written values: -1 .. E-1)
constexpr uint8_t kUnwrittenFlag = 0xFF;   // poison of kept (written values: 0, 1)
constexpr int64_t kUnwrittenCount = -1;    // poison of the per-expert counts
constexpr uint64_t kInputSeedSalt = 0x5851F42D4C957F2Dull;  // x and dy draw apart from weights
// Rough throughputs, only to announce phases that will be slow before the 2 s mark.
constexpr double kNaiveFlopsPerSecond = 0.5e9;
constexpr double kCpuFlopsPerSecond = 4e9;
constexpr double kCudaFlopsPerSecond = 1e12;
constexpr double kRandomValuesPerSecond = 5e7;

struct ChosenBackend {
  Backend backend;
  std::string reason;
};

// NOTE: the GPU kernels compute bf16, fp16 and fp32 (DESIGN.md, Precision); fp64 layers run on
// the cpu backend even when a device is present.
ChosenBackend choose_backend(Backend requested, DType dtype) {
  switch (requested) {
    case Backend::kAuto:
      if (!MoeLayer::cuda_available()) return {Backend::kCpu, "no CUDA device found"};
      if (dtype == DType::kFloat64)
        return {Backend::kCpu,
                "CUDA device found, but fp64 runs on the cpu backend; "
                "--dtype fp32 for the GPU"};
      return {Backend::kCuda, "CUDA device found"};
    case Backend::kCuda:
      if (!MoeLayer::cuda_available())
        throw UsageError(
            "--backend cuda: no CUDA device found (or fusedmoe was built without "
            "CUDA); use --backend cpu");
      return {Backend::kCuda, "requested with --backend cuda"};
    case Backend::kCpu:
      return {Backend::kCpu, "requested with --backend cpu"};
    case Backend::kNaive:
      return {Backend::kNaive, "requested with --backend naive"};
    case Backend::kThreads:
      return {Backend::kThreads, "requested with --backend threads (one CPU thread per rank)"};
    case Backend::kFused:
      if (!MoeLayer::cuda_available())
        throw UsageError("--backend fused: no CUDA device found (or fusedmoe was built without CUDA)");
      return {Backend::kFused, "requested with --backend fused (the persistent kernel, W ranks emulated)"};
  }
  return {Backend::kCpu, "?"};
}

double flops_per_second(Backend backend) {
  switch (backend) {
    case Backend::kNaive:
      return kNaiveFlopsPerSecond;
    case Backend::kCuda:
    case Backend::kFused:
      return kCudaFlopsPerSecond;
    case Backend::kAuto:
    case Backend::kCpu:
    case Backend::kThreads:
      return kCpuFlopsPerSecond;
  }
  return kCpuFlopsPerSecond;
}

// Refuses runs whose tensors cannot fit in host memory, before any allocation (and before any
// int64 product of huge sizes could overflow).
void check_host_memory(const RunOptions& options) {
  const MoeConfig& config = options.config;
  const double num_tokens = static_cast<double>(options.num_tokens);
  const double hidden = static_cast<double>(config.hidden_size);
  const double ffn = static_cast<double>(config.ffn_size);
  const double ffn_in_width = config.gated() ? 2.0 * ffn : ffn;
  const double num_experts = static_cast<double>(config.num_experts);
  const double top_k = static_cast<double>(config.top_k);
  const double num_shared = static_cast<double>(config.num_shared_experts);
  const double shared_ffn = static_cast<double>(config.shared_size());
  const double shared_in_width = config.gated() ? 2.0 * shared_ffn : shared_ffn;

  const double weight_elements =
      num_experts *
          (hidden * ffn_in_width + ffn * hidden + 2.0 * hidden + ffn_in_width + hidden + 2.0) +
      num_shared * (hidden * shared_in_width + shared_ffn * hidden + shared_in_width + hidden);
  const double layer_runs = options.check ? 2.0 : 1.0;  // chosen backend (+ naive reference)
  const double tensor_elements = weight_elements * (1.0 + layer_runs) +
                                 num_tokens * hidden * (2.0 + 2.0 * layer_runs) +
                                 num_tokens * top_k * layer_runs;
  // The CPU backends keep fp64 routing state and per-assignment activations for backward.
  const double workspace_bytes =
      8.0 * (2.0 * num_tokens * hidden + 4.0 * num_tokens * num_experts +
             num_tokens * top_k * (2.0 * ffn_in_width + ffn + 2.0 * hidden));
  const double needed_bytes =
      tensor_elements * static_cast<double>(dtype_size(config.dtype)) + workspace_bytes;

  const long physical_pages = sysconf(_SC_PHYS_PAGES);
  const long page_bytes = sysconf(_SC_PAGE_SIZE);
  if (physical_pages <= 0 || page_bytes <= 0) return;  // unknown: let the allocator decide
  const double physical_bytes =
      static_cast<double>(physical_pages) * static_cast<double>(page_bytes);
  if (needed_bytes > 0.9 * physical_bytes) {
    std::ostringstream message;
    message.precision(3);
    message << "this run needs about " << needed_bytes / double(1ull << 30)
            << " GiB of host memory for weights, gradients and activations, more than the "
            << physical_bytes / double(1ull << 30)
            << " GiB this machine has; reduce --tokens, --hidden-size, --ffn-size or "
               "--num-experts";
    throw UsageError(message.str());
  }
}

// T tokens over W ranks as evenly as possible: the first T mod W ranks hold one token more.
std::vector<int64_t> split_tokens(int64_t num_tokens, int world_size) {
  std::vector<int64_t> tokens_per_rank(static_cast<size_t>(world_size), num_tokens / world_size);
  for (int64_t rank_idx = 0; rank_idx < num_tokens % world_size; ++rank_idx)
    ++tokens_per_rank[static_cast<size_t>(rank_idx)];
  return tokens_per_rank;
}

// The layer's inputs, shared by every backend.
struct RunInputs {
  MoeConfig config;
  HostWeights weights;
  HostTensor x;   // [T, H] uniform ±1
  HostTensor dy;  // [T, H] uniform ±1
  std::vector<int64_t> tokens_per_rank;
  bool training = false;
  uint64_t seed = 0;

  ForwardArgs forward_args() const {
    return ForwardArgs{
        .x = x.view(), .tokens_per_rank = tokens_per_rank, .training = training, .seed = seed};
  }
};

RunInputs make_inputs(const RunOptions& options, const std::vector<int64_t>& tokens_per_rank) {
  const MoeConfig& config = options.config;
  RunInputs inputs;
  inputs.config = config;
  inputs.weights = HostWeights::random(config, options.seed, options.gate_scale);
  std::mt19937_64 input_rng(options.seed ^ kInputSeedSalt);
  inputs.x = HostTensor(config.dtype, {options.num_tokens, config.hidden_size});
  inputs.x.randomize(input_rng, 1.0);
  inputs.dy = HostTensor(config.dtype, {options.num_tokens, config.hidden_size});
  inputs.dy.randomize(input_rng, 1.0);
  inputs.tokens_per_rank = tokens_per_rank;
  inputs.training = options.training;
  inputs.seed = options.seed;
  return inputs;
}

// Everything one backend produced.
struct LayerRun {
  HostTensor y;                        // [T, H]
  HostTensor topk_weight;              // [T, k]
  HostTensor dx;                       // [T, H]
  HostWeights grads;                   // gradients, shaped like the weights
  std::vector<int32_t> topk_idx;       // [T, k]
  std::vector<uint8_t> kept;           // [T, k]
  std::vector<int64_t> expert_counts;  // [E]
  std::vector<int64_t> kept_counts;    // [E]
  double aux_loss = kNaN;
  double z_loss = kNaN;
  std::vector<double> forward_ms;  // one per iteration
  std::vector<double> backward_ms;
};

void poison_forward_outputs(LayerRun& run) {
  run.y.fill(kNaN);
  run.topk_weight.fill(kNaN);
  std::fill(run.topk_idx.begin(), run.topk_idx.end(), kUnwrittenExpert);
  std::fill(run.kept.begin(), run.kept.end(), kUnwrittenFlag);
  std::fill(run.expert_counts.begin(), run.expert_counts.end(), kUnwrittenCount);
  std::fill(run.kept_counts.begin(), run.kept_counts.end(), kUnwrittenCount);
  run.aux_loss = kNaN;
  run.z_loss = kNaN;
}

void poison_gradients(LayerRun& run) {
  run.dx.fill(kNaN);
  for (HostTensor* gradient : run.grads.all())
    if (gradient->defined()) gradient->fill(kNaN);
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The host buffers of the forward outputs and of the gradients, for uploads of the poison and
// downloads of the results.
std::vector<void*> forward_output_buffers(LayerRun& run) {
  return {
      run.y.view().data,        run.topk_weight.view().data, run.topk_idx.data(), run.kept.data(),
      run.expert_counts.data(), run.kept_counts.data(),      &run.aux_loss,       &run.z_loss};
}

std::vector<void*> gradient_buffers(LayerRun& run) {
  std::vector<void*> buffers = {run.dx.view().data};
  for (HostTensor* gradient : run.grads.all())
    if (gradient->defined()) buffers.push_back(gradient->view().data);
  return buffers;
}

// Forward iterations, then backward iterations, each call timed on its own (until the device is
// idle, for the cuda backend). Outputs are poisoned before every call and read back after the
// last one.
LayerRun run_layer(const RunInputs& inputs, Backend backend, int iterations,
                   const std::string& label, double expected_forward_seconds, Progress& progress,
                   bool with_backward = true) {
  const MoeConfig& config = inputs.config;
  const int64_t num_tokens = inputs.x.shape()[0];
  LayerRun run;
  run.y = HostTensor(config.dtype, {num_tokens, config.hidden_size});
  run.topk_weight = HostTensor(config.dtype, {num_tokens, config.top_k});
  run.dx = HostTensor(config.dtype, {num_tokens, config.hidden_size});
  run.grads = HostWeights::zeros_like(config);
  run.topk_idx.resize(static_cast<size_t>(num_tokens * config.top_k));
  run.kept.resize(static_cast<size_t>(num_tokens * config.top_k));
  run.expert_counts.resize(static_cast<size_t>(config.num_experts));
  run.kept_counts.resize(static_cast<size_t>(config.num_experts));

  // NOTE: space outlives layer, which keeps views of the weights.
  BufferSpace space(backend == Backend::kCuda || backend == Backend::kFused);
  MoeLayer layer(config, space.stage(inputs.weights), backend);
  ForwardArgs forward_args = inputs.forward_args();
  forward_args.x = space.stage(inputs.x);
  auto place_array = [&space](auto& values) {
    return static_cast<decltype(values.data())>(
        space.place(values.data(), values.size() * sizeof(values[0])));
  };
  const ForwardOutputs forward_outputs{
      .y = space.place(run.y),
      .topk_idx = place_array(run.topk_idx),
      .topk_weight = space.place(run.topk_weight),
      .kept = place_array(run.kept),
      .expert_counts = place_array(run.expert_counts),
      .kept_counts = place_array(run.kept_counts),
      .aux_loss = static_cast<double*>(space.place(&run.aux_loss, sizeof run.aux_loss)),
      .z_loss = static_cast<double*>(space.place(&run.z_loss, sizeof run.z_loss))};
  const std::string repeat_note =
      iterations > 1 ? " (" + std::to_string(iterations) + " iterations)" : "";

  progress.begin_phase(label + " forward" + repeat_note, expected_forward_seconds * iterations);
  for (int iteration = 0; iteration < iterations; ++iteration) {
    poison_forward_outputs(run);
    for (void* buffer : forward_output_buffers(run)) space.upload(buffer);
    auto start = std::chrono::steady_clock::now();
    layer.forward(forward_args, forward_outputs);
    space.synchronize();
    run.forward_ms.push_back(milliseconds_since(start));
  }
  for (void* buffer : forward_output_buffers(run)) space.download(buffer);
  if (!with_backward) {
    progress.end_phase();
    return run;
  }

  const BackwardArgs backward_args{.forward = forward_args,
                                   .dy = space.stage(inputs.dy),
                                   .d_aux = kAuxLossGradient,
                                   .d_z = kZLossGradient};
  const MoeGrads gradient_views = space.place_gradients(run.grads, run.dx);
  progress.begin_phase(label + " backward" + repeat_note,
                       2.0 * expected_forward_seconds * iterations);
  for (int iteration = 0; iteration < iterations; ++iteration) {
    poison_gradients(run);
    for (void* buffer : gradient_buffers(run)) space.upload(buffer);
    auto start = std::chrono::steady_clock::now();
    layer.backward(backward_args, gradient_views);
    space.synchronize();
    run.backward_ms.push_back(milliseconds_since(start));
  }
  for (void* buffer : gradient_buffers(run)) space.download(buffer);
  progress.end_phase();
  return run;
}

double median(std::vector<double> values) {
  if (values.empty()) return kNaN;
  std::sort(values.begin(), values.end());
  size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : 0.5 * (values[middle - 1] + values[middle]);
}

HostTensor scalar_tensor(double value) {
  HostTensor tensor(DType::kFloat64, {1});
  tensor.set(0, value);
  return tensor;
}

// Compares out with ref (when given); without ref only checks that every element is finite.
OutputCheck check_tensor(const std::string& name, const HostTensor& out, const HostTensor* ref,
                         double tolerance) {
  OutputCheck check{.name = name, .num_elements = out.numel()};
  for (int64_t element_idx = 0; element_idx < out.numel(); ++element_idx)
    check.non_finite += std::isfinite(out.get(element_idx)) ? 0 : 1;
  if (ref == nullptr) {
    check.relative_error = kNaN;
    check.max_abs_diff = kNaN;
    check.passed = check.non_finite == 0;
    return check;
  }
  check.relative_error = relative_error(out, *ref);
  for (int64_t element_idx = 0; element_idx < out.numel(); ++element_idx) {
    double diff = std::fabs(out.get(element_idx) - ref->get(element_idx));
    if (std::isnan(diff) || diff > check.max_abs_diff) check.max_abs_diff = diff;
    if (std::isnan(diff)) break;
  }
  check.passed = check.non_finite == 0 && check.relative_error <= tolerance;
  return check;
}

// topk_idx, kept and the per-expert counts: written (no poison left) and, when ref is given,
// identical to the reference's.
OutputCheck check_routing(const MoeConfig& config, const LayerRun& out, const LayerRun* ref) {
  OutputCheck check{.name = "routing", .num_elements = static_cast<int64_t>(out.topk_idx.size())};
  for (int32_t expert_idx : out.topk_idx)
    check.non_finite += (expert_idx < -1 || expert_idx >= config.num_experts) ? 1 : 0;
  for (uint8_t kept_flag : out.kept) check.non_finite += kept_flag > 1 ? 1 : 0;
  for (int64_t count : out.expert_counts) check.non_finite += count < 0 ? 1 : 0;
  for (int64_t count : out.kept_counts) check.non_finite += count < 0 ? 1 : 0;
  check.relative_error = kNaN;
  check.max_abs_diff = kNaN;
  if (ref == nullptr) {
    check.passed = check.non_finite == 0;
    return check;
  }
  auto count_differences = [](const auto& a, const auto& b) {
    int64_t differences = 0;
    for (size_t i = 0; i < a.size(); ++i) differences += a[i] != b[i] ? 1 : 0;
    return differences;
  };
  check.mismatches = count_differences(out.topk_idx, ref->topk_idx) +
                     count_differences(out.kept, ref->kept) +
                     count_differences(out.expert_counts, ref->expert_counts) +
                     count_differences(out.kept_counts, ref->kept_counts);
  check.passed = check.non_finite == 0 && check.mismatches == 0;
  return check;
}

// The gradients HostWeights::grad_views hands to the layer, by name.
struct GradientField {
  const char* name;
  HostTensor HostWeights::*tensor;
};
constexpr GradientField kGradientFields[] = {
    {"d_gate_weight", &HostWeights::gate_weight},
    {"d_gate_bias", &HostWeights::gate_bias},
    {"d_noise_weight", &HostWeights::noise_weight},
    {"d_w1", &HostWeights::w1},
    {"d_b1", &HostWeights::b1},
    {"d_w2", &HostWeights::w2},
    {"d_b2", &HostWeights::b2},
    {"d_shared_w1", &HostWeights::shared_w1},
    {"d_shared_b1", &HostWeights::shared_b1},
    {"d_shared_w2", &HostWeights::shared_w2},
    {"d_shared_b2", &HostWeights::shared_b2},
};

std::vector<OutputCheck> check_outputs(const MoeConfig& config, const LayerRun& out,
                                       const LayerRun* ref, double tolerance, bool with_backward) {
  std::vector<OutputCheck> checks;
  checks.push_back(check_tensor("y", out.y, ref ? &ref->y : nullptr, tolerance));
  checks.push_back(
      check_tensor("topk_weight", out.topk_weight, ref ? &ref->topk_weight : nullptr, tolerance));
  checks.push_back(check_routing(config, out, ref));
  HostTensor out_aux = scalar_tensor(out.aux_loss), out_z = scalar_tensor(out.z_loss);
  HostTensor ref_aux = scalar_tensor(ref ? ref->aux_loss : kNaN);
  HostTensor ref_z = scalar_tensor(ref ? ref->z_loss : kNaN);
  checks.push_back(check_tensor("aux_loss", out_aux, ref ? &ref_aux : nullptr, tolerance));
  checks.push_back(check_tensor("z_loss", out_z, ref ? &ref_z : nullptr, tolerance));
  if (!with_backward) return checks;
  checks.push_back(check_tensor("dx", out.dx, ref ? &ref->dx : nullptr, tolerance));
  for (const GradientField& field : kGradientFields) {
    const HostTensor& gradient = out.grads.*field.tensor;
    if (!gradient.defined()) continue;
    checks.push_back(
        check_tensor(field.name, gradient, ref ? &(ref->grads.*field.tensor) : nullptr, tolerance));
  }
  return checks;
}

// Forward FLOPs: 2·(kept assignments)·(H·N1 + I·H) for the routed experts, 2·T·H·E for the router
// logits (twice with the noisy gate's noise logits), 2·T·S·(H·Ns1 + Is·H) for shared experts.
double forward_flops(const MoeConfig& config, int64_t num_tokens, int64_t kept_assignments) {
  const double hidden = static_cast<double>(config.hidden_size);
  const double tokens = static_cast<double>(num_tokens);
  const double expert_flops = 2.0 * static_cast<double>(kept_assignments) *
                              (hidden * static_cast<double>(config.ffn_in_width()) +
                               static_cast<double>(config.ffn_size) * hidden);
  const double router_logit_sets = config.gate == GateKind::kNoisyTopK ? 2.0 : 1.0;
  const double router_flops =
      router_logit_sets * 2.0 * tokens * hidden * static_cast<double>(config.num_experts);
  const double shared_flops = 2.0 * tokens * static_cast<double>(config.num_shared_experts) *
                              (hidden * static_cast<double>(config.shared_in_width()) +
                               static_cast<double>(config.shared_size()) * hidden);
  return expert_flops + router_flops + shared_flops;
}

// Expected forward FLOPs before routing is known: every assignment kept.
double expected_forward_flops(const MoeConfig& config, int64_t num_tokens) {
  return forward_flops(config, num_tokens, num_tokens * config.top_k);
}

void fill_routing_summary(const LayerRun& run, const MoeConfig& config, RunReport& report) {
  const int64_t top_k = config.top_k;
  const int64_t num_tokens = top_k > 0 ? static_cast<int64_t>(run.kept.size()) / top_k : 0;
  report.selected_assignments = num_tokens * top_k;
  for (int64_t token_idx = 0; token_idx < num_tokens; ++token_idx) {
    int64_t kept_of_token = 0;
    for (int64_t choice_idx = 0; choice_idx < top_k; ++choice_idx) {
      size_t slot = static_cast<size_t>(token_idx * top_k + choice_idx);
      report.routed_assignments += run.topk_idx[slot] >= 0 ? 1 : 0;
      kept_of_token += run.kept[slot] == 1 ? 1 : 0;
    }
    report.kept_assignments += kept_of_token;
    report.tokens_without_expert += (kept_of_token == 0 && top_k > 0) ? 1 : 0;
  }
  report.aux_loss = run.aux_loss;
  report.z_loss = run.z_loss;
  report.expert_counts = run.expert_counts;
  report.kept_counts = run.kept_counts;
}

// Rows [begin, begin + count) of a [T, ...] tensor.
HostTensor rows_of(const HostTensor& t, int64_t begin, int64_t count) {
  std::vector<int64_t> shape = t.shape();
  const int64_t width = shape[0] > 0 ? t.numel() / shape[0] : 0;
  shape[0] = count;
  HostTensor out(t.dtype(), shape);
  for (int64_t i = 0; i < count * width; ++i) out.set(i, t.get(begin * width + i));
  return out;
}

// --transport nccl: this process is rank r of W (one per GPU); the fused kernel runs over an
// NCCL communicator. Every rank draws the same weights and the same T tokens, runs the fused
// forward on its T / W of them, and compares its rows with the naive reference of the whole
// layer (W emulated ranks, same split) computed on the host.
int run_nccl_rank(RunOptions options) {
  const std::optional<LauncherRank> me = launcher_rank_from_env();
  if (!me)
    throw UsageError("--transport nccl: no launcher environment (OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE, "
                     "SLURM_PROCID/NTASKS or RANK/WORLD_SIZE); start one process per GPU, e.g. "
                     "mpirun -np W fusedmoe run --transport nccl ...");
  if (options.backend != Backend::kAuto && options.backend != Backend::kFused)
    throw UsageError("--transport nccl runs --backend fused (the persistent kernel), not " +
                     backend_name(options.backend));
  MoeConfig& config = options.config;
  if (config.world_size != 1 && config.world_size != me->world)
    throw UsageError("--world-size " + std::to_string(config.world_size) + " but the launcher started " +
                     std::to_string(me->world) + " ranks");
  config.world_size = me->world;
  // The command's inputs, outputs and reference live in host memory as fp32 or fp64 (HostTensor),
  // and the fused kernel has no fp64 path: the NCCL run is fp32 (TF32). 16-bit layers across GPUs
  // run under torchrun (examples/fused_torchrun.py, scripts/multi_gpu_all.sh).
  if (config.dtype != DType::kFloat32)
    throw UsageError("--transport nccl --dtype " + to_string(config.dtype) +
                     ": this command runs fp32 across GPUs (its tensors are held in host memory as fp32 or fp64, "
                     "and the fused kernel has no fp64 path); use --dtype fp32, or torchrun "
                     "examples/fused_torchrun.py --dtype bf16");
  config.fp32_math = Fp32Math::kTf32;
  config.validate();
  if (options.num_tokens % me->world != 0)
    throw UsageError("--tokens " + std::to_string(options.num_tokens) + ": every rank needs the same count, so it "
                     "must be a multiple of the " + std::to_string(me->world) + " ranks");
  const int device = device::select_device(me->local_rank);
  const std::string id_file = options.nccl_id_file.empty() ? default_id_file() : options.nccl_id_file;
  NcclUniqueId id;
  if (me->rank == 0) id = nccl_unique_id();
  const std::vector<char> shared =
      share_through_file(*me, id_file, std::vector<char>(id.bytes.begin(), id.bytes.end()), 120.0);
  std::copy(shared.begin(), shared.end(), id.bytes.begin());
  use_nccl_transport(id, me->world, me->rank);
  if (me->rank == 0) std::remove(id_file.c_str());  // every rank has joined
  std::printf("rank %d of %d (%s), device %d: fused kernel over NCCL\n", me->rank, me->world,
              me->launcher.c_str(), device);
  std::fflush(stdout);

  const int64_t local = options.num_tokens / me->world, begin = me->rank * local;
  const std::vector<int64_t> split(static_cast<size_t>(me->world), local);
  RunInputs inputs = make_inputs(options, split);
  RunInputs mine = inputs;
  mine.x = rows_of(inputs.x, begin, local);
  mine.dy = rows_of(inputs.dy, begin, local);
  mine.tokens_per_rank.clear();
  mine.config = config;
  inputs.config = config;
  LayerRun run, reference;
  {
    Progress progress(options.check ? 2 : 1);
    const double expected = expected_forward_flops(config, local) / flops_per_second(Backend::kFused);
    run = run_layer(mine, Backend::kFused, options.iterations, "fused (NCCL)", expected, progress, false);
    if (options.check)
      reference = run_layer(inputs, Backend::kNaive, 1, "naive reference",
                            expected_forward_flops(config, options.num_tokens) / kNaiveFlopsPerSecond, progress,
                            false);
  }
  use_local_transport();
  const double tolerance = options.tolerance.value_or(tolerance_for(config, Backend::kFused));
  bool passed = true;
  std::printf("rank %d: forward %.3f ms (median of %d)\n", me->rank, median(run.forward_ms), options.iterations);
  if (options.check) {
    const int64_t k = config.top_k;
    const OutputCheck y = check_tensor("y", run.y, nullptr, tolerance);
    const HostTensor ref_y = rows_of(reference.y, begin, local), ref_w = rows_of(reference.topk_weight, begin, local);
    const double y_error = relative_error(run.y, ref_y), w_error = relative_error(run.topk_weight, ref_w);
    int64_t routing = 0;
    for (int64_t i = 0; i < local * k; ++i) {
      const size_t at = static_cast<size_t>(i), ref_at = static_cast<size_t>(begin * k + i);
      routing += run.topk_idx[at] != reference.topk_idx[ref_at] || run.kept[at] != reference.kept[ref_at];
    }
    passed = y.non_finite == 0 && y_error <= tolerance && w_error <= tolerance && routing == 0;
    std::printf("rank %d: y rel. error %.3g, topk_weight %.3g (tolerance %.3g), routing mismatches %lld, "
                "non-finite %lld: %s\n",
                me->rank, y_error, w_error, tolerance, static_cast<long long>(routing),
                static_cast<long long>(y.non_finite), passed ? "PASS" : "FAIL");
  }
  return passed ? 0 : 1;
}

}  // namespace

bool RunReport::passed() const {
  return std::all_of(checks.begin(), checks.end(),
                     [](const OutputCheck& check) { return check.passed; });
}

int run_command(const std::vector<std::string>& args) {
  RunOptions options = parse_run_options(args);
  if (options.show_help) {
    std::fputs(run_usage().c_str(), stdout);
    return 0;
  }
  if (options.transport == "nccl") return run_nccl_rank(options);
  const MoeConfig& config = options.config;
  config.validate();
  if (config.dtype != DType::kFloat32 && config.dtype != DType::kFloat64)
    throw UsageError("dtype = " + to_string(config.dtype) +
                     ": the fusedmoe command holds tensors in host memory as fp32 or fp64 only");
  check_host_memory(options);

  RunReport report;
  report.options = options;
  report.tokens_per_rank = resolve_tokens_per_rank(
      config, options.num_tokens, split_tokens(options.num_tokens, config.world_size));
  ChosenBackend chosen = choose_backend(options.backend, config.dtype);
  report.backend = chosen.backend;
  report.backend_reason = chosen.reason;
  report.tolerance = options.tolerance.value_or(tolerance_for(config, chosen.backend));
  std::printf("backend: %s (%s)\n", backend_name(chosen.backend).c_str(), chosen.reason.c_str());
  std::fflush(stdout);

  const double expected_flops = expected_forward_flops(config, options.num_tokens);
  // The fused backend's backward runs the modular path, which needs world_size = 1.
  const bool with_backward = !(chosen.backend == Backend::kFused && config.world_size > 1);
  LayerRun chosen_run, reference_run;
  {
    const int num_phases = 1 + (with_backward ? 2 : 1) * (options.check ? 2 : 1);
    Progress progress(num_phases);
    const double random_values =
        2.0 * static_cast<double>(options.num_tokens) * static_cast<double>(config.hidden_size) +
        static_cast<double>(config.num_experts) * static_cast<double>(config.hidden_size) *
            static_cast<double>(config.ffn_in_width() + config.ffn_size);
    progress.begin_phase("random weights and inputs", random_values / kRandomValuesPerSecond);
    RunInputs inputs = make_inputs(options, report.tokens_per_rank);
    chosen_run = run_layer(inputs, chosen.backend, options.iterations, backend_name(chosen.backend),
                           expected_flops / flops_per_second(chosen.backend), progress, with_backward);
    if (options.check) {
      reference_run = run_layer(inputs, Backend::kNaive, 1, "naive reference",
                                expected_flops / kNaiveFlopsPerSecond, progress, with_backward);
    }
  }

  report.forward_ms = median(chosen_run.forward_ms);
  report.backward_ms = median(chosen_run.backward_ms);
  if (options.check) {
    report.reference_forward_ms = median(reference_run.forward_ms);
    report.reference_backward_ms = median(reference_run.backward_ms);
  }
  fill_routing_summary(chosen_run, config, report);
  report.forward_flops = forward_flops(config, options.num_tokens, report.kept_assignments);
  report.backward_flops = 2.0 * report.forward_flops;
  report.checks =
      check_outputs(config, chosen_run, options.check ? &reference_run : nullptr, report.tolerance, with_backward);
  print_report(report, stdout);
  return report.passed() ? 0 : 1;
}

}  // namespace fusedmoe::cli
