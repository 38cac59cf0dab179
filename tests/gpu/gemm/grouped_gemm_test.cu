// fusedmoe — GPU test and benchmark of the Hopper grouped GEMM (src/cuda/gemm/).
//
// Build:  CUTLASS_INCLUDE=<dir with cute/ and cutlass/> tests/gpu/gemm/build.sh
// Run:    build/gemm/grouped_gemm_test [--seed S] [--no-bench] [--bench-only] [--results FILE]
//
// (1) Correctness: the fast kernel against grouped_gemm_reference on fresh random inputs
//     (seeded, seed printed), outputs poisoned with NaN first, every element checked:
//     bf16 and fp16, every epilogue, row_scale, accumulate, pre_activation, output types, and
//     adversarial row counts (0, 1, tile +- 1, primes, all rows in one group, rows not starting
//     at 0, an upper bound larger than the real total), small N and K, K not a multiple of 64.
//     Rows outside the groups must stay poisoned. Plus: bit-identical reruns, CUDA-graph replay
//     after changing the row counts on the device, and bad arguments throwing.
//     dgrad (b_k_major: B stored [groups, n, k]) on the same shapes, non-gated epilogues,
//     bf16/f16/f32 outputs. wgrad (grouped_gemm_wgrad, C_g = A_gᵀ B_g over each group's rows)
//     against grouped_gemm_wgrad_reference: group sizes 0, 1, 63, 64, 65, 127..129, primes,
//     all rows in one group, all empty, NaN rows before row_offsets[0] (must not leak), M/N
//     not multiples of the tile, bf16/f16 in, bf16/f16/f32 out, accumulate; graph replay.
// (2) Benchmark (paper-64: 64 experts x 512 rows): GEMM0 K=2048 N=4096 SwiGLU -> 2048 wide,
//     GEMM1 K=2048 N=2048 identity, bf16; CUDA events, warm-up, median of 30 runs, TFLOP/s with
//     FLOPs = 2 * rows * K * N. Compare with tests/gpu/gemm/bench_torch.py in the same run.
//     Backward: dgrad of GEMM1 (K=2048, N=2048) and GEMM0 (K=4096, N=2048) with B K-major;
//     wgrad dW2 (M=2048, N=2048) and dW1 (M=2048, N=4096) over 512 rows per group.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "grouped_gemm.hpp"

using namespace fusedmoe::cuda;

#define CHECK_CUDA(expr)                                                                    \
  do {                                                                                      \
    cudaError_t err_ = (expr);                                                              \
    if (err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,             \
                   cudaGetErrorString(err_));                                               \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

namespace {

const char* name_of(Epilogue e) {
  switch (e) {
    case Epilogue::kIdentity: return "identity";
    case Epilogue::kRelu: return "relu";
    case Epilogue::kGelu: return "gelu";
    case Epilogue::kSwiGlu: return "swiglu";
    case Epilogue::kGeGlu: return "geglu";
    case Epilogue::kReluBackward: return "relu-bwd";
    case Epilogue::kGeluBackward: return "gelu-bwd";
    case Epilogue::kSwiGluBackward: return "swiglu-bwd";
    case Epilogue::kGeGluBackward: return "geglu-bwd";
  }
  return "?";
}
const char* name_of(ElementType t) {
  switch (t) {
    case ElementType::kBF16: return "bf16";
    case ElementType::kF16: return "f16";
    case ElementType::kF32: return "f32";
  }
  return "?";
}
size_t size_of(ElementType t) { return t == ElementType::kF32 ? 4 : 2; }

float to_float(const void* base, ElementType t, size_t i) {
  switch (t) {
    case ElementType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case ElementType::kF16: return __half2float(static_cast<const __half*>(base)[i]);
    case ElementType::kF32: return static_cast<const float*>(base)[i];
  }
  return 0.0f;
}

std::vector<uint8_t> to_bytes(const std::vector<float>& v, ElementType t) {
  std::vector<uint8_t> out(v.size() * size_of(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == ElementType::kBF16) {
      __nv_bfloat16 x = __float2bfloat16(v[i]);
      std::memcpy(&out[i * 2], &x, 2);
    } else if (t == ElementType::kF16) {
      __half x = __float2half(v[i]);
      std::memcpy(&out[i * 2], &x, 2);
    } else {
      std::memcpy(&out[i * 4], &v[i], 4);
    }
  }
  return out;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 16))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const void* src, size_t n) { CHECK_CUDA(cudaMemcpy(ptr, src, n, cudaMemcpyHostToDevice)); }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> v(bytes);
    CHECK_CUDA(cudaMemcpy(v.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    return v;
  }
  void poison() { CHECK_CUDA(cudaMemset(ptr, 0xFF, bytes)); }  // NaN in bf16, f16 and f32
};

struct Case {
  std::string shape_name;
  std::vector<int64_t> counts;  // rows per group
  int64_t row_base = 0;         // row_offsets[0]
  int64_t extra_rows = 0;       // max_total_rows - real total (and unowned rows in C)
  int64_t n = 0, k = 0;
  ElementType ab = ElementType::kBF16;
  ElementType c = ElementType::kBF16;
  Epilogue epilogue = Epilogue::kIdentity;
  bool row_scale = false;
  bool accumulate = false;
  bool pre_activation = false;
  bool b_k_major = false;  // dgrad: B stored [groups, n, k]
};

struct Stats {
  double rel = 0, max_abs = 0;
  int64_t bad_nonfinite = 0, bad_poison = 0;
};

// Compares `out` with `ref` (both c-type bytes of [rows_alloc, width]); rows in
// [owned_begin, owned_end) must be finite and are compared; others must keep the poison bytes.
Stats compare(const std::vector<uint8_t>& out, const std::vector<uint8_t>& ref, ElementType t,
              int64_t rows_alloc, int64_t width, int64_t owned_begin, int64_t owned_end) {
  Stats s;
  double num = 0, den = 0;
  const size_t es = size_of(t);
  for (int64_t r = 0; r < rows_alloc; ++r) {
    const bool owned = r >= owned_begin && r < owned_end;
    for (int64_t j = 0; j < width; ++j) {
      const size_t i = size_t(r * width + j);
      if (!owned) {
        for (size_t b = 0; b < es; ++b)
          if (out[i * es + b] != 0xFF) { ++s.bad_poison; break; }
        continue;
      }
      const double o = to_float(out.data(), t, i), f = to_float(ref.data(), t, i);
      if (!std::isfinite(o)) { ++s.bad_nonfinite; continue; }
      num += (o - f) * (o - f);
      den += f * f;
      s.max_abs = std::max(s.max_abs, std::abs(o - f));
    }
  }
  s.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return s;
}

struct Problem {
  Case cs;
  int64_t total = 0, rows_alloc = 0, n_out = 0;
  std::vector<int64_t> offsets;
  std::unique_ptr<DeviceBuffer> a, b, offs, scale, c_fast, c_ref, pre_fast, pre_ref, workspace;
  std::unique_ptr<DeviceBuffer> act_in;  // k*Backward epilogues: the pre-activation, C's shape
  std::vector<uint8_t> c_init;  // accumulate: initial C

  GroupedGemmArgs args(void* c, void* pre) const {
    GroupedGemmArgs g;
    g.num_groups = int(cs.counts.size());
    g.row_offsets = static_cast<const int64_t*>(offs->ptr);
    g.max_total_rows = offsets.back() + cs.extra_rows;
    g.n = cs.n;
    g.k = cs.k;
    g.a = a->ptr;
    g.b = b->ptr;
    g.c = c;
    g.a_type = cs.ab;
    g.c_type = cs.c;
    g.epilogue = cs.epilogue;
    g.row_scale = cs.row_scale ? static_cast<const float*>(scale->ptr) : nullptr;
    g.accumulate = cs.accumulate;
    g.pre_activation = cs.pre_activation ? pre : nullptr;
    g.b_k_major = cs.b_k_major;
    g.activation_input = is_activation_backward(cs.epilogue) ? act_in->ptr : nullptr;
    return g;
  }
};

std::unique_ptr<Problem> make_problem(const Case& cs, std::mt19937_64& rng) {
  auto p = std::make_unique<Problem>();
  p->cs = cs;
  p->offsets.push_back(cs.row_base);
  for (int64_t c : cs.counts) p->offsets.push_back(p->offsets.back() + c);
  p->total = p->offsets.back();
  p->rows_alloc = p->total + cs.extra_rows;
  // Width of C: n / 2 for the gated forward epilogues, 2n for the gated backward ones.
  p->n_out = is_gated(cs.epilogue) ? cs.n / 2 : is_gated(forward_of(cs.epilogue)) ? 2 * cs.n : cs.n;
  const int64_t groups = int64_t(cs.counts.size());
  // Fast uniform(-1, 1) stream (splitmix64) seeded from rng: the benchmark draws ~10^9 values.
  uint64_t state = rng();
  auto uni = [&state](std::mt19937_64&) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(int64_t(z >> 40) - (int64_t(1) << 23)) * (1.0f / float(1 << 23));
  };
  // A is allocated with exactly `total` rows: the kernel must not read past it.
  std::vector<float> a(size_t(p->total * cs.k)), b(size_t(groups * cs.k * cs.n)),
      scale(size_t(std::max<int64_t>(p->rows_alloc, 1)));
  for (auto& x : a) x = uni(rng);
  const float b_scale = std::sqrt(3.0f / float(cs.k));
  for (auto& x : b) x = uni(rng) * b_scale;
  for (auto& x : scale) x = 0.5f + 0.5f * (uni(rng) + 1.0f);
  auto a_bytes = to_bytes(a, cs.ab), b_bytes = to_bytes(b, cs.ab);
  p->a = std::make_unique<DeviceBuffer>(a_bytes.size());
  p->a->upload(a_bytes.data(), a_bytes.size());
  p->b = std::make_unique<DeviceBuffer>(b_bytes.size());
  p->b->upload(b_bytes.data(), b_bytes.size());
  p->offs = std::make_unique<DeviceBuffer>(p->offsets.size() * 8);
  p->offs->upload(p->offsets.data(), p->offsets.size() * 8);
  p->scale = std::make_unique<DeviceBuffer>(scale.size() * 4);
  p->scale->upload(scale.data(), scale.size() * 4);
  const size_t c_bytes = size_t(p->rows_alloc * p->n_out) * size_of(cs.c);
  const size_t pre_bytes = size_t(p->rows_alloc * cs.n) * size_of(cs.c);
  p->c_fast = std::make_unique<DeviceBuffer>(c_bytes);
  p->c_ref = std::make_unique<DeviceBuffer>(c_bytes);
  p->pre_fast = std::make_unique<DeviceBuffer>(pre_bytes);
  p->pre_ref = std::make_unique<DeviceBuffer>(pre_bytes);
  if (is_activation_backward(cs.epilogue)) {
    std::vector<float> act_in(size_t(p->rows_alloc * p->n_out));
    for (auto& x : act_in) x = 2.0f * uni(rng);  // both sides of relu / the gates' curvature
    auto bytes = to_bytes(act_in, cs.c);
    p->act_in = std::make_unique<DeviceBuffer>(bytes.size());
    p->act_in->upload(bytes.data(), bytes.size());
  }
  p->workspace = std::make_unique<DeviceBuffer>(grouped_gemm_workspace_size(p->args(nullptr, nullptr)));
  if (cs.accumulate) {
    // Owned rows start from random values, the rest stays poisoned.
    std::vector<float> init(size_t(p->rows_alloc * p->n_out));
    for (auto& x : init) x = uni(rng);
    p->c_init = to_bytes(init, cs.c);
    for (int64_t r = 0; r < p->rows_alloc; ++r)
      if (r < cs.row_base || r >= p->total)
        std::memset(&p->c_init[size_t(r * p->n_out) * 4], 0xFF, size_t(p->n_out) * 4);
  }
  return p;
}

void reset_outputs(Problem& p) {
  for (auto* buf : {p.c_fast.get(), p.c_ref.get(), p.pre_fast.get(), p.pre_ref.get()}) buf->poison();
  if (p.cs.accumulate) {
    p.c_fast->upload(p.c_init.data(), p.c_init.size());
    p.c_ref->upload(p.c_init.data(), p.c_init.size());
  }
}

int g_failures = 0;
int g_cases = 0;
double g_max_rel = 0;

bool report(const std::string& name, const char* what, const Stats& s, double tol) {
  const bool ok = s.rel < tol && s.bad_nonfinite == 0 && s.bad_poison == 0;
  g_max_rel = std::max(g_max_rel, s.rel);
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %-58s %-4s rel=%.3e max_abs=%.3e nonfinite=%lld poison_overwritten=%lld\n",
                name.c_str(), what, s.rel, s.max_abs, (long long)s.bad_nonfinite,
                (long long)s.bad_poison);
  }
  return ok;
}

std::string case_name(const Case& cs) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s%s n=%lld k=%lld %s->%s %s%s%s%s",
                cs.b_k_major ? "dgrad " : "", cs.shape_name.c_str(),
                (long long)cs.n, (long long)cs.k, name_of(cs.ab), name_of(cs.c),
                name_of(cs.epilogue), cs.row_scale ? " scale" : "", cs.accumulate ? " acc" : "",
                cs.pre_activation ? " pre" : "");
  return buf;
}

void run_case_impl(const Case& cs, std::mt19937_64& rng, bool verbose) {
  ++g_cases;
  auto p = make_problem(cs, rng);
  reset_outputs(*p);
  const auto fast_args = p->args(p->c_fast->ptr, p->pre_fast->ptr);
  const auto ref_args = p->args(p->c_ref->ptr, p->pre_ref->ptr);
  grouped_gemm(fast_args, p->workspace->ptr, nullptr);
  grouped_gemm_reference(ref_args, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::string name = case_name(cs);
  const double tol = 1e-2;
  auto c_fast = p->c_fast->download(), c_ref = p->c_ref->download();
  Stats sc = compare(c_fast, c_ref, cs.c, p->rows_alloc, p->n_out, cs.row_base, p->total);
  bool ok = report(name, "C", sc, tol);
  Stats sp;
  if (cs.pre_activation) {
    sp = compare(p->pre_fast->download(), p->pre_ref->download(), cs.c, p->rows_alloc, cs.n,
                 cs.row_base, p->total);
    ok &= report(name, "pre", sp, tol);
  }
  if (!cs.accumulate) {
    // A second run must give bit-identical results (no races, no dependence on scheduling).
    p->c_fast->poison();
    grouped_gemm(fast_args, p->workspace->ptr, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    if (p->c_fast->download() != c_fast) {
      ++g_failures;
      ok = false;
      std::printf("FAIL %-58s rerun differs\n", name.c_str());
    }
  }
  if (verbose || !ok)
    std::printf("%s %-58s rel(C)=%.2e max_abs=%.2e%s\n", ok ? "ok  " : "FAIL", name.c_str(),
                sc.rel, sc.max_abs,
                cs.pre_activation ? (" rel(pre)=" + std::to_string(sp.rel)).c_str() : "");
}

// An unexpected exception fails the case and the run goes on.
template <class C, class F>
void guarded(const C& cs, const std::string& name, F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    ++g_failures;
    std::printf("FAIL %-58s threw: %s\n", name.c_str(), e.what());
  }
}
void run_case(const Case& cs, std::mt19937_64& rng, bool verbose) {
  guarded(cs, case_name(cs), [&] { run_case_impl(cs, rng, verbose); });
}

// CUDA graph: capture once, change the row counts on the device, replay: the replay must use
// the new counts (nothing about the counts is baked in on the host).
void run_graph_test(std::mt19937_64& rng) {
  ++g_cases;
  Case cs{.shape_name = "graph", .counts = {200, 0, 77, 300}, .extra_rows = 100, .n = 512,
          .k = 256, .epilogue = Epilogue::kSwiGlu, .pre_activation = true};
  auto p = make_problem(cs, rng);
  reset_outputs(*p);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  grouped_gemm(p->args(p->c_fast->ptr, p->pre_fast->ptr), p->workspace->ptr, stream);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  // New counts, same total bound: {1, 400, 0, 150} (total 551 <= 577 + 100).
  std::vector<int64_t> new_offsets = {0, 1, 401, 401, 551};
  CHECK_CUDA(cudaMemcpy(p->offs->ptr, new_offsets.data(), new_offsets.size() * 8,
                        cudaMemcpyHostToDevice));
  p->offsets = new_offsets;
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  grouped_gemm_reference(p->args(p->c_ref->ptr, p->pre_ref->ptr), stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  Stats s = compare(p->c_fast->download(), p->c_ref->download(), cs.c, p->rows_alloc, p->n_out,
                    0, 551);
  // Rows 551..577 were owned before the change: only rows >= 551 compared as "unowned" would
  // see the poison, which holds because the graph never ran with the old counts.
  const bool ok = report("graph replay with new device row counts", "C", s, 1e-2);
  std::printf("%s graph replay with new device row counts rel=%.2e\n", ok ? "ok  " : "FAIL", s.rel);
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaStreamDestroy(stream));
}

void run_bad_args_test() {
  DeviceBuffer dummy(1 << 16);
  auto base = [&] {
    GroupedGemmArgs g;
    g.num_groups = 2;
    g.row_offsets = static_cast<const int64_t*>(dummy.ptr);
    g.max_total_rows = 16;
    g.n = 64;
    g.k = 64;
    g.a = g.b = g.c = dummy.ptr;
    return g;
  };
  struct Bad { const char* what; std::function<void(GroupedGemmArgs&)> edit; };
  std::vector<Bad> bad = {
      {"n not a multiple of 8", [](GroupedGemmArgs& g) { g.n = 100; }},
      {"gated n not a multiple of 16", [](GroupedGemmArgs& g) { g.n = 24; g.epilogue = Epilogue::kSwiGlu; }},
      {"k = 0", [](GroupedGemmArgs& g) { g.k = 0; }},
      {"num_groups = 0", [](GroupedGemmArgs& g) { g.num_groups = 0; }},
      {"accumulate with bf16 C", [](GroupedGemmArgs& g) { g.accumulate = true; }},
      {"f32 inputs", [](GroupedGemmArgs& g) { g.a_type = ElementType::kF32; }},
      {"null row_offsets", [](GroupedGemmArgs& g) { g.row_offsets = nullptr; }},
      {"misaligned a", [](GroupedGemmArgs& g) { g.a = static_cast<const char*>(g.a) + 2; }},
      {"b_k_major with a gated epilogue",
       [](GroupedGemmArgs& g) { g.b_k_major = true; g.n = 64; g.epilogue = Epilogue::kSwiGlu; }},
      {"activation backward without b_k_major",
       [](GroupedGemmArgs& g) { g.epilogue = Epilogue::kSwiGluBackward; g.activation_input = g.a; }},
      {"activation backward without its input",
       [](GroupedGemmArgs& g) { g.b_k_major = true; g.epilogue = Epilogue::kGeluBackward; }},
      {"activation input with a forward epilogue", [](GroupedGemmArgs& g) { g.activation_input = g.a; }},
  };
  for (auto& b : bad) {
    ++g_cases;
    auto g = base();
    b.edit(g);
    bool threw = false;
    try {
      grouped_gemm(g, dummy.ptr, nullptr);
    } catch (const std::runtime_error& e) {
      threw = true;
      std::printf("ok   bad args (%s): %s\n", b.what, e.what());
    }
    if (!threw) {
      ++g_failures;
      std::printf("FAIL bad args (%s): no exception\n", b.what);
    }
  }
}

// ------------------------------------------------------------------------------------------
// wgrad (varying K): C_g = A_gᵀ · B_g over the rows of each group
// ------------------------------------------------------------------------------------------
struct WgradCase {
  std::string shape_name;
  std::vector<int64_t> counts;  // rows per group
  int64_t row_base = 0;         // row_offsets[0]; rows [0, row_base) of A and B hold NaN
  int64_t extra_rows = 0;       // max_total_rows - real total
  int64_t m = 0, n = 0;
  ElementType ab = ElementType::kBF16;
  ElementType c = ElementType::kBF16;
  bool accumulate = false;
};

struct WgradProblem {
  WgradCase cs;
  int64_t total = 0;
  std::vector<int64_t> offsets;
  std::unique_ptr<DeviceBuffer> a, b, offs, c_fast, c_ref;
  std::vector<uint8_t> c_init;

  GroupedWgradArgs args(void* c) const {
    GroupedWgradArgs g;
    g.num_groups = int(cs.counts.size());
    g.row_offsets = static_cast<const int64_t*>(offs->ptr);
    g.max_total_rows = total + cs.extra_rows;
    g.m = cs.m;
    g.n = cs.n;
    g.a = a->ptr;
    g.b = b->ptr;
    g.c = c;
    g.a_type = cs.ab;
    g.c_type = cs.c;
    g.accumulate = cs.accumulate;
    return g;
  }
  int64_t c_elems() const { return int64_t(cs.counts.size()) * cs.m * cs.n; }
};

std::unique_ptr<WgradProblem> make_wgrad_problem(const WgradCase& cs, std::mt19937_64& rng) {
  auto p = std::make_unique<WgradProblem>();
  p->cs = cs;
  p->offsets.push_back(cs.row_base);
  for (int64_t c : cs.counts) p->offsets.push_back(p->offsets.back() + c);
  p->total = p->offsets.back();
  uint64_t state = rng();
  auto uni = [&state]() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(int64_t(z >> 40) - (int64_t(1) << 23)) * (1.0f / float(1 << 23));
  };
  // A and B hold exactly `total` rows (the kernel must not read past them); rows before
  // row_base are NaN: a value of them that leaked into any group would poison it.
  std::vector<float> a(size_t(p->total * cs.m)), b(size_t(p->total * cs.n));
  for (auto& x : a) x = uni();
  for (auto& x : b) x = uni();
  for (int64_t i = 0; i < cs.row_base * cs.m; ++i) a[size_t(i)] = NAN;
  for (int64_t i = 0; i < cs.row_base * cs.n; ++i) b[size_t(i)] = NAN;
  auto a_bytes = to_bytes(a, cs.ab), b_bytes = to_bytes(b, cs.ab);
  p->a = std::make_unique<DeviceBuffer>(a_bytes.size());
  p->a->upload(a_bytes.data(), a_bytes.size());
  p->b = std::make_unique<DeviceBuffer>(b_bytes.size());
  p->b->upload(b_bytes.data(), b_bytes.size());
  p->offs = std::make_unique<DeviceBuffer>(p->offsets.size() * 8);
  p->offs->upload(p->offsets.data(), p->offsets.size() * 8);
  const size_t c_bytes = size_t(p->c_elems()) * size_of(cs.c);
  p->c_fast = std::make_unique<DeviceBuffer>(c_bytes);
  p->c_ref = std::make_unique<DeviceBuffer>(c_bytes);
  if (cs.accumulate) {
    std::vector<float> init(size_t(p->c_elems()));
    for (auto& x : init) x = uni();
    p->c_init = to_bytes(init, cs.c);
  }
  return p;
}

void reset_wgrad_outputs(WgradProblem& p) {
  p.c_fast->poison();
  p.c_ref->poison();
  if (p.cs.accumulate) {
    p.c_fast->upload(p.c_init.data(), p.c_init.size());
    p.c_ref->upload(p.c_init.data(), p.c_init.size());
  }
}

std::string wgrad_case_name(const WgradCase& cs) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "wgrad %s m=%lld n=%lld %s->%s%s", cs.shape_name.c_str(),
                (long long)cs.m, (long long)cs.n, name_of(cs.ab), name_of(cs.c),
                cs.accumulate ? " acc" : "");
  return buf;
}

void run_wgrad_case_impl(const WgradCase& cs, std::mt19937_64& rng, bool verbose) {
  ++g_cases;
  auto p = make_wgrad_problem(cs, rng);
  reset_wgrad_outputs(*p);
  grouped_gemm_wgrad(p->args(p->c_fast->ptr), nullptr, nullptr);
  grouped_gemm_wgrad_reference(p->args(p->c_ref->ptr), nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::string name = wgrad_case_name(cs);
  auto c_fast = p->c_fast->download();
  // Every element of C is owned (empty groups: zeros, or the initial C when accumulating).
  Stats sc = compare(c_fast, p->c_ref->download(), cs.c, p->c_elems() / cs.n, cs.n, 0,
                     p->c_elems() / cs.n);
  bool ok = report(name, "C", sc, 1e-2);
  if (!cs.accumulate) {
    p->c_fast->poison();
    grouped_gemm_wgrad(p->args(p->c_fast->ptr), nullptr, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    if (p->c_fast->download() != c_fast) {
      ++g_failures;
      ok = false;
      std::printf("FAIL %-58s rerun differs\n", name.c_str());
    }
  }
  if (verbose || !ok)
    std::printf("%s %-58s rel(C)=%.2e max_abs=%.2e\n", ok ? "ok  " : "FAIL", name.c_str(), sc.rel,
                sc.max_abs);
}

void run_wgrad_case(const WgradCase& cs, std::mt19937_64& rng, bool verbose) {
  guarded(cs, wgrad_case_name(cs), [&] { run_wgrad_case_impl(cs, rng, verbose); });
}

// Graph capture of wgrad, then new row counts on the device, then replay.
void run_wgrad_graph_test(std::mt19937_64& rng) {
  ++g_cases;
  WgradCase cs{.shape_name = "graph", .counts = {100, 0, 200}, .extra_rows = 0, .m = 136,
               .n = 264};
  auto p = make_wgrad_problem(cs, rng);
  reset_wgrad_outputs(*p);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  grouped_gemm_wgrad(p->args(p->c_fast->ptr), nullptr, stream);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<int64_t> new_offsets = {0, 0, 299, 300};  // {0, 299, 1}
  CHECK_CUDA(cudaMemcpy(p->offs->ptr, new_offsets.data(), new_offsets.size() * 8,
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  grouped_gemm_wgrad_reference(p->args(p->c_ref->ptr), stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  Stats s = compare(p->c_fast->download(), p->c_ref->download(), cs.c, p->c_elems() / cs.n,
                    cs.n, 0, p->c_elems() / cs.n);
  const bool ok = report("wgrad graph replay with new device row counts", "C", s, 1e-2);
  std::printf("%s wgrad graph replay with new device row counts rel=%.2e\n", ok ? "ok  " : "FAIL",
              s.rel);
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaStreamDestroy(stream));
}

void run_wgrad_bad_args_test() {
  DeviceBuffer dummy(1 << 16);
  auto base = [&] {
    GroupedWgradArgs g;
    g.num_groups = 2;
    g.row_offsets = static_cast<const int64_t*>(dummy.ptr);
    g.max_total_rows = 16;
    g.m = 64;
    g.n = 64;
    g.a = g.b = g.c = dummy.ptr;
    return g;
  };
  struct Bad { const char* what; std::function<void(GroupedWgradArgs&)> edit; };
  std::vector<Bad> bad = {
      {"m not a multiple of 8", [](GroupedWgradArgs& g) { g.m = 100; }},
      {"n = 0", [](GroupedWgradArgs& g) { g.n = 0; }},
      {"num_groups = 0", [](GroupedWgradArgs& g) { g.num_groups = 0; }},
      {"accumulate with bf16 C", [](GroupedWgradArgs& g) { g.accumulate = true; }},
      {"f32 inputs", [](GroupedWgradArgs& g) { g.a_type = ElementType::kF32; }},
      {"null row_offsets", [](GroupedWgradArgs& g) { g.row_offsets = nullptr; }},
      {"misaligned b", [](GroupedWgradArgs& g) { g.b = static_cast<const char*>(g.b) + 2; }},
  };
  for (auto& b : bad) {
    ++g_cases;
    auto g = base();
    b.edit(g);
    bool threw = false;
    try {
      grouped_gemm_wgrad(g, nullptr, nullptr);
    } catch (const std::runtime_error& e) {
      threw = true;
      std::printf("ok   wgrad bad args (%s): %s\n", b.what, e.what());
    }
    if (!threw) {
      ++g_failures;
      std::printf("FAIL wgrad bad args (%s): no exception\n", b.what);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Benchmark
// ------------------------------------------------------------------------------------------
struct BenchResult { double ms, tflops, rel; };

// --only NAME restricts the benchmark to one problem (e.g. for a profiler); empty: all.
std::string g_only;

BenchResult bench(const char* name, std::vector<int64_t> counts, int64_t n, int64_t k,
                  Epilogue epi, std::mt19937_64& rng, FILE* results, bool b_k_major = false,
                  bool check = true, bool pre_activation = false) {
  if (!g_only.empty() && g_only != name) return {};
  Case cs{.shape_name = name, .counts = std::move(counts), .n = n, .k = k, .epilogue = epi,
          .pre_activation = pre_activation, .b_k_major = b_k_major};
  auto p = make_problem(cs, rng);
  reset_outputs(*p);
  auto args = p->args(p->c_fast->ptr, nullptr);
  Stats s;
  if (check) {  // correctness of the benchmarked configuration itself (the scan's large
                // problems skip it: the CUDA-core reference would take minutes)
    grouped_gemm(args, p->workspace->ptr, nullptr);
    grouped_gemm_reference(p->args(p->c_ref->ptr, nullptr), nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    s = compare(p->c_fast->download(), p->c_ref->download(), cs.c, p->rows_alloc, p->n_out, 0,
                p->total);
    report(std::string("bench ") + name, "C", s, 1e-2);
  }

  for (int i = 0; i < 5; ++i) grouped_gemm(args, p->workspace->ptr, nullptr);
  const int iters = 30;
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], nullptr));
    grouped_gemm(args, p->workspace->ptr, nullptr);
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) CHECK_CUDA(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  const double med = ms[iters / 2];
  const double flops = 2.0 * double(p->total) * double(k) * double(n);
  BenchResult r{med, flops / (med * 1e-3) / 1e12, s.rel};
  std::printf("BENCH %-28s rows=%lld K=%lld N=%lld %-8s%s median %.4f ms (min %.4f max %.4f) "
              "%.1f TFLOP/s  rel=%.2e\n",
              name, (long long)p->total, (long long)k, (long long)n, name_of(epi),
              b_k_major ? " B^T" : "", med, ms[0],
              ms[iters - 1], r.tflops, s.rel);
  if (results) {
    std::fprintf(results, "%s %.5f %.2f\n", name, med, r.tflops);
    std::fflush(results);  // readable even if a later benchmark is cut off
  }
  return r;
}


BenchResult bench_wgrad(const char* name, std::vector<int64_t> counts, int64_t m, int64_t n,
                        std::mt19937_64& rng, FILE* results) {
  if (!g_only.empty() && g_only != name) return {};
  WgradCase cs{.shape_name = name, .counts = std::move(counts), .m = m, .n = n};
  auto p = make_wgrad_problem(cs, rng);
  reset_wgrad_outputs(*p);
  auto args = p->args(p->c_fast->ptr);
  grouped_gemm_wgrad(args, nullptr, nullptr);
  grouped_gemm_wgrad_reference(p->args(p->c_ref->ptr), nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  Stats s = compare(p->c_fast->download(), p->c_ref->download(), cs.c, p->c_elems() / n, n, 0,
                    p->c_elems() / n);
  report(std::string("bench ") + name, "C", s, 1e-2);
  for (int i = 0; i < 5; ++i) grouped_gemm_wgrad(args, nullptr, nullptr);
  const int iters = 30;
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], nullptr));
    grouped_gemm_wgrad(args, nullptr, nullptr);
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) CHECK_CUDA(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  const double med = ms[iters / 2];
  const double flops = 2.0 * double(p->total) * double(m) * double(n);
  BenchResult r{med, flops / (med * 1e-3) / 1e12, s.rel};
  std::printf("BENCH %-28s rows=%lld M=%lld N=%lld wgrad    median %.4f ms (min %.4f max %.4f) "
              "%.1f TFLOP/s  rel=%.2e\n",
              name, (long long)p->total, (long long)m, (long long)n, med, ms[0], ms[iters - 1],
              r.tflops, s.rel);
  if (results) {
    std::fprintf(results, "%s %.5f %.2f\n", name, med, r.tflops);
    std::fflush(results);  // readable even if a later benchmark is cut off
  }
  return r;
}
}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  uint64_t seed = std::random_device{}();
  bool do_tests = true, do_bench = true, verbose = false;
  bool wgrad_tests_only = false, backward_bench_only = false, scan = false;
  const char* results_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (arg == "--no-bench") do_bench = false;
    else if (arg == "--bench-only") do_tests = false;
    else if (arg == "--verbose") verbose = true;
    else if (arg == "--wgrad-tests-only") wgrad_tests_only = true;
    else if (arg == "--backward-bench-only") backward_bench_only = true;
    else if (arg == "--results" && i + 1 < argc) results_path = argv[++i];
    else if (arg == "--only" && i + 1 < argc) g_only = argv[++i];
    else if (arg == "--scan") scan = true, do_tests = false;
    else { std::fprintf(stderr, "unknown argument %s\n", arg.c_str()); return 2; }
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs), seed = %llu\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, (unsigned long long)seed);
  std::mt19937_64 rng(seed);

  if (do_tests) {
    struct Shape { std::string name; std::vector<int64_t> counts; int64_t n, k, row_base, extra; };
    std::vector<int64_t> many(64);
    {
      std::uniform_int_distribution<int> d(0, 300);
      for (auto& c : many) c = d(rng) < 40 ? 0 : d(rng);
    }
    std::vector<Shape> shapes = {
        {"tile+-1,0,1", {0, 1, 127, 128, 129, 255, 257, 3}, 256, 128, 0, 0},
        {"primes,k%64!=0", {7, 131, 0, 263, 1}, 384, 200, 0, 37},
        {"all-in-one", {0, 0, 0, 517, 0, 0}, 128, 64, 0, 0},
        {"small-nk", {5, 64, 130}, 64, 64, 0, 0},
        {"n-partial,base=5", {129, 31, 256}, 400, 136, 5, 11},
        {"single-row", {1}, 512, 512, 0, 0},
        {"all-empty", {0, 0, 0}, 256, 64, 0, 3},
        {"64-random", many, 768, 320, 0, 0},
        {"63,64,65", {63, 64, 65, 0, 2}, 272, 72, 0, 0},
    };
    const Epilogue epis[] = {Epilogue::kIdentity, Epilogue::kRelu, Epilogue::kGelu,
                             Epilogue::kSwiGlu, Epilogue::kGeGlu};
    int variant = 0;
    for (const auto& sh : shapes) {
      if (wgrad_tests_only) break;
      for (ElementType ab : {ElementType::kBF16, ElementType::kF16}) {
        for (Epilogue e : epis) {
          ++variant;
          Case cs{.shape_name = sh.name, .counts = sh.counts, .row_base = sh.row_base,
                  .extra_rows = sh.extra, .n = sh.n, .k = sh.k, .ab = ab, .c = ab, .epilogue = e,
                  .row_scale = (variant % 2) == 0, .pre_activation = (variant % 3) != 0};
          run_case(cs, rng, verbose);
        }
        // fp32 output, accumulate (gated and not), with row_scale and pre_activation.
        for (Epilogue e : {Epilogue::kIdentity, Epilogue::kSwiGlu, Epilogue::kGelu}) {
          Case cs{.shape_name = sh.name, .counts = sh.counts, .row_base = sh.row_base,
                  .extra_rows = sh.extra, .n = sh.n, .k = sh.k, .ab = ab, .c = ElementType::kF32,
                  .epilogue = e, .row_scale = true, .accumulate = e != Epilogue::kGelu,
                  .pre_activation = true};
          run_case(cs, rng, verbose);
        }
      }
    }
    // dgrad (B stored K-major): non-gated epilogues, same adversarial shapes.
    for (const auto& sh : shapes) {
      if (wgrad_tests_only) break;
      for (ElementType ab : {ElementType::kBF16, ElementType::kF16}) {
        ++variant;
        const Case base{.shape_name = sh.name, .counts = sh.counts, .row_base = sh.row_base,
                        .extra_rows = sh.extra, .n = sh.n, .k = sh.k, .ab = ab, .c = ab,
                        .b_k_major = true};
        Case identity = base;
        run_case(identity, rng, verbose);
        Case relu = base;
        relu.epilogue = Epilogue::kRelu;
        relu.row_scale = true;
        relu.pre_activation = true;
        run_case(relu, rng, verbose);
        Case f32 = base;
        f32.c = ElementType::kF32;
        f32.accumulate = (variant % 2) == 0;
        run_case(f32, rng, verbose);
        // dgrad of GEMM1 with the activation backward in the epilogue (C = dpre).
        for (Epilogue e : {Epilogue::kReluBackward, Epilogue::kGeluBackward, Epilogue::kSwiGluBackward,
                           Epilogue::kGeGluBackward}) {
          Case bwd = base;
          bwd.epilogue = e;
          run_case(bwd, rng, verbose);
        }
      }
    }
    // wgrad (varying K): adversarial group sizes, m/n not multiples of the 128 x 256 tile.
    struct WShape { std::string name; std::vector<int64_t> counts; int64_t m, n, row_base, extra; };
    std::vector<WShape> wshapes = {
        {"0,1,63,64,65,127,128,129", {0, 1, 63, 64, 65, 127, 128, 129}, 200, 264, 0, 0},
        {"primes,base=5(NaN rows)", {7, 131, 0, 263, 1, 509}, 136, 520, 5, 37},
        {"all-in-one", {0, 0, 1000, 0}, 128, 256, 0, 0},
        {"all-empty", {0, 0, 0}, 64, 64, 0, 3},
        {"tiny", {3, 0, 2}, 8, 8, 0, 0},
        {"64-random", many, 256, 512, 0, 0},
        {"m,n>tile", {300, 45}, 392, 776, 0, 0},
        {"m>n (n fastest)", {300, 45, 0, 129}, 776, 264, 0, 0},
    };
    for (const auto& sh : wshapes) {
      for (ElementType ab : {ElementType::kBF16, ElementType::kF16}) {
        const WgradCase base{.shape_name = sh.name, .counts = sh.counts, .row_base = sh.row_base,
                             .extra_rows = sh.extra, .m = sh.m, .n = sh.n, .ab = ab, .c = ab};
        run_wgrad_case(base, rng, verbose);
        WgradCase f32 = base;
        f32.c = ElementType::kF32;
        run_wgrad_case(f32, rng, verbose);
        f32.accumulate = true;
        run_wgrad_case(f32, rng, verbose);
      }
    }
    run_wgrad_graph_test(rng);
    run_wgrad_bad_args_test();
    if (!wgrad_tests_only) {
      run_graph_test(rng);
      run_bad_args_test();
    }
    std::printf("TESTS: %d cases, %d failures, max relative error %.3e (bound 1e-2)\n", g_cases,
                g_failures, g_max_rel);
  }

  if (scan) {
    // Where the time goes: paper-64's GEMM1 over K (time = epilogue + K x mainloop rate per
    // tile), and mixtral's two forward GEMMs (8 experts x 2048 rows, H 4096, I 14336).
    FILE* results = results_path ? std::fopen(results_path, "w") : nullptr;
    std::vector<int64_t> uniform(64, 512), mixtral(8, 2048);
    for (int64_t k : {1024, 2048, 4096, 8192})
      bench(("scan_gemm1_k" + std::to_string(k)).c_str(), uniform, 2048, k, Epilogue::kIdentity,
            rng, results, false, false);
    bench("scan_gemm0_swiglu_k8192", uniform, 4096, 8192, Epilogue::kSwiGlu, rng, results, false,
          false);
    bench("mixtral_gemm0_swiglu", mixtral, 2 * 14336, 4096, Epilogue::kSwiGlu, rng, results,
          false, false);
    bench("mixtral_gemm1_identity", mixtral, 4096, 14336, Epilogue::kIdentity, rng, results,
          false, false);
    // mixtral's training GEMMs: GEMM0 keeping the pre-activation, dgrad of GEMM1 with the SwiGLU
    // backward, dgrad of GEMM0, and the two weight gradients.
    bench("mixtral_gemm0_swiglu_pre", mixtral, 2 * 14336, 4096, Epilogue::kSwiGlu, rng, results,
          false, false, true);
    bench("mixtral_dgrad_gemm1_swiglu_bwd", mixtral, 14336, 4096, Epilogue::kSwiGluBackward, rng,
          results, true, false);
    bench("mixtral_dgrad_gemm1", mixtral, 14336, 4096, Epilogue::kIdentity, rng, results, true, false);
    bench("mixtral_dgrad_gemm0", mixtral, 4096, 2 * 14336, Epilogue::kIdentity, rng, results, true,
          false);
    bench_wgrad("mixtral_wgrad_dw2", mixtral, 14336, 4096, rng, results);
    bench_wgrad("mixtral_wgrad_dw1", mixtral, 4096, 2 * 14336, rng, results);
    if (results) std::fclose(results);
    do_bench = false;
  }
  if (do_bench) {
    FILE* results = results_path ? std::fopen(results_path, "w") : nullptr;
    std::vector<int64_t> uniform(64, 512);
    if (!backward_bench_only)
    bench("paper64_gemm0_swiglu", uniform, 4096, 2048, Epilogue::kSwiGlu, rng, results);
    if (!backward_bench_only)
    bench("paper64_gemm1_identity", uniform, 2048, 2048, Epilogue::kIdentity, rng, results);
    // Skewed routing with the same total: a realistic imbalance.
    std::vector<int64_t> skewed(64);
    {
      std::vector<double> w(64);
      std::exponential_distribution<double> ex(1.0);
      double sum = 0;
      for (auto& x : w) sum += (x = ex(rng));
      int64_t acc = 0;
      for (int i = 0; i < 64; ++i) acc += (skewed[i] = int64_t(32768 * w[i] / sum));
      skewed[0] += 32768 - acc;
    }
    if (!backward_bench_only)
    bench("skewed64_gemm0_swiglu", skewed, 4096, 2048, Epilogue::kSwiGlu, rng, results);
    if (!backward_bench_only)
    bench("skewed64_gemm1_identity", skewed, 2048, 2048, Epilogue::kIdentity, rng, results);
    // Backward of paper-64 (H = I = 2048, 512 rows per expert):
    //   dgrad GEMM1: dact = g · W2ᵀ, W2 [E, I, H] read as B [E, n = I, k = H] (K-major)
    //   dgrad GEMM0: dx = dpre · W1ᵀ, W1 [E, H, 2I] read as B [E, n = H, k = 2I]
    //   wgrad dW2 = actᵀ · g (M = I, N = H); wgrad dW1 = xᵀ · dpre (M = H, N = 2I)
    bench("paper64_dgrad_gemm1", uniform, 2048, 2048, Epilogue::kIdentity, rng, results, true);
    bench("paper64_dgrad_gemm0", uniform, 2048, 4096, Epilogue::kIdentity, rng, results, true);
    bench("paper64_dgrad_gemm1_swiglu_bwd", uniform, 2048, 2048, Epilogue::kSwiGluBackward, rng, results, true);
    bench_wgrad("paper64_wgrad_dw2", uniform, 2048, 2048, rng, results);
    bench_wgrad("paper64_wgrad_dw1", uniform, 2048, 4096, rng, results);
    bench_wgrad("skewed64_wgrad_dw2", skewed, 2048, 2048, rng, results);
    if (results) std::fclose(results);
  }
  if (g_failures) {
    std::printf("FAILED: %d failures\n", g_failures);
    return 1;
  }
  std::printf("ALL PASSED\n");
  return 0;
}
