// fusedmoe — reference grouped GEMM (CUDA cores, fp32 accumulation) and the shared argument
// validation. The oracle for tests of the Hopper kernel: one thread per output element, k in
// sequential order, the same epilogue math (epilogue_math.cuh).
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "epilogue_math.cuh"
#include "grouped_gemm.hpp"

namespace fusedmoe::cuda {
namespace {

[[noreturn]] void fail(const char* caller, const std::string& what) {
  std::ostringstream os;
  os << caller << ": " << what;
  throw std::runtime_error(os.str());
}

void check_cuda(cudaError_t err, const char* caller, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream os;
    os << caller << ": " << what << " failed: " << cudaGetErrorName(err) << " ("
       << cudaGetErrorString(err) << ")";
    throw std::runtime_error(os.str());
  }
}

// Largest g in [0, num_groups) with row_offsets[g] <= row (the group that owns `row`, skipping
// empty groups).
__device__ int find_group(const int64_t* row_offsets, int num_groups, int64_t row) {
  int lo = 0, hi = num_groups - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (row_offsets[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <class TIn, class TOut>
__global__ void reference_kernel(GroupedGemmArgs args) {
  const int64_t n_out = is_gated(args.epilogue) ? args.n / 2 : args.n;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_out) return;
  const int64_t row_begin = args.row_offsets[0];
  const int64_t row_end = args.row_offsets[args.num_groups];
  const auto* a = static_cast<const TIn*>(args.a);
  const auto* b = static_cast<const TIn*>(args.b);
  auto* c = static_cast<TOut*>(args.c);
  auto* pre = static_cast<TOut*>(args.pre_activation);
  const bool gated = is_gated(args.epilogue);
  for (int64_t row = row_begin + blockIdx.y; row < row_end; row += gridDim.y) {
    const int g = find_group(args.row_offsets, args.num_groups, row);
    const TIn* a_row = a + row * args.k;
    const TIn* b_g = b + int64_t(g) * args.k * args.n;
    // B element (kk, j): b_g[kk * n + j], or b_g[j * k + kk] when B is stored K-major.
    const int64_t b_stride_k = args.b_k_major ? 1 : args.n;
    const int64_t b_stride_n = args.b_k_major ? args.k : 1;
    float acc0 = 0.0f, acc1 = 0.0f;  // acc1: up half (gated)
    for (int64_t kk = 0; kk < args.k; ++kk) {
      const float av = epilogue_math::to_float(a_row[kk]);
      acc0 += av * epilogue_math::to_float(b_g[kk * b_stride_k + col * b_stride_n]);
      if (gated)
        acc1 += av * epilogue_math::to_float(b_g[kk * b_stride_k + (n_out + col) * b_stride_n]);
    }
    if (is_activation_backward(args.epilogue)) {  // acc0 = dact (see Epilogue)
      const Epilogue act = forward_of(args.epilogue);
      const auto* input = static_cast<const TOut*>(args.activation_input);
      if (is_gated(act)) {
        const int64_t at = row * 2 * args.n + col;
        const float g = epilogue_math::to_float(input[at]), u = epilogue_math::to_float(input[at + args.n]);
        c[at] = epilogue_math::from_float<TOut>(acc0 * u * epilogue_math::activation_grad(act, g));
        c[at + args.n] = epilogue_math::from_float<TOut>(acc0 * epilogue_math::activation_value(act, g));
      } else {
        const int64_t at = row * args.n + col;
        c[at] = epilogue_math::from_float<TOut>(acc0 * epilogue_math::activation_grad(act, epilogue_math::to_float(input[at])));
      }
      continue;
    }
    float out;
    if (gated) {
      out = epilogue_math::gate_up(args.epilogue, acc0, acc1);
      if (pre) {
        pre[row * args.n + col] = epilogue_math::from_float<TOut>(acc0);
        pre[row * args.n + n_out + col] = epilogue_math::from_float<TOut>(acc1);
      }
    } else {
      out = epilogue_math::activate(args.epilogue, acc0);
      if (pre) pre[row * args.n + col] = epilogue_math::from_float<TOut>(acc0);
    }
    if (args.row_scale) out *= args.row_scale[row];
    if (args.accumulate) out += epilogue_math::to_float(c[row * n_out + col]);
    c[row * n_out + col] = epilogue_math::from_float<TOut>(out);
  }
}

template <class TIn>
void launch_reference(const GroupedGemmArgs& args, cudaStream_t stream) {
  const int64_t n_out = is_gated(args.epilogue) ? args.n / 2 : args.n;
  const int threads = 128;
  dim3 grid(unsigned((n_out + threads - 1) / threads),
            unsigned(std::min<int64_t>(std::max<int64_t>(args.max_total_rows, 1), 65535)));
  switch (args.c_type) {
    case ElementType::kBF16:
      reference_kernel<TIn, __nv_bfloat16><<<grid, threads, 0, stream>>>(args);
      break;
    case ElementType::kF16:
      reference_kernel<TIn, __half><<<grid, threads, 0, stream>>>(args);
      break;
    case ElementType::kF32:
      reference_kernel<TIn, float><<<grid, threads, 0, stream>>>(args);
      break;
  }
  check_cuda(cudaGetLastError(), "grouped_gemm_reference", "kernel launch");
}

// One thread per output element (g, i, j): rows of the group in sequential order.
template <class TIn, class TOut>
__global__ void wgrad_reference_kernel(GroupedWgradArgs args) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = blockIdx.y;
  const int g = blockIdx.z;
  if (j >= args.n) return;
  const auto* a = static_cast<const TIn*>(args.a);
  const auto* b = static_cast<const TIn*>(args.b);
  auto* c = static_cast<TOut*>(args.c);
  float acc = 0.0f;
  for (int64_t r = args.row_offsets[g]; r < args.row_offsets[g + 1]; ++r)
    acc += epilogue_math::to_float(a[r * args.m + i]) * epilogue_math::to_float(b[r * args.n + j]);
  TOut* dst = c + (int64_t(g) * args.m + i) * args.n + j;
  if (args.accumulate) acc += epilogue_math::to_float(*dst);
  *dst = epilogue_math::from_float<TOut>(acc);
}

template <class TIn>
void launch_wgrad_reference(const GroupedWgradArgs& args, cudaStream_t stream) {
  if (args.m > 65535) fail("grouped_gemm_wgrad_reference", "m > 65535 (grid.y limit)");
  const int threads = 128;
  dim3 grid(unsigned((args.n + threads - 1) / threads), unsigned(args.m),
            unsigned(args.num_groups));
  switch (args.c_type) {
    case ElementType::kBF16:
      wgrad_reference_kernel<TIn, __nv_bfloat16><<<grid, threads, 0, stream>>>(args);
      break;
    case ElementType::kF16:
      wgrad_reference_kernel<TIn, __half><<<grid, threads, 0, stream>>>(args);
      break;
    case ElementType::kF32:
      wgrad_reference_kernel<TIn, float><<<grid, threads, 0, stream>>>(args);
      break;
  }
  check_cuda(cudaGetLastError(), "grouped_gemm_wgrad_reference", "kernel launch");
}

}  // namespace

void validate_grouped_gemm_args(const GroupedGemmArgs& args, const char* caller) {
  auto misaligned = [](const void* p, uintptr_t alignment) {
    return (reinterpret_cast<uintptr_t>(p) % alignment) != 0;
  };
  if (args.num_groups < 1 || args.num_groups > kMaxGroups)
    fail(caller, "num_groups = " + std::to_string(args.num_groups) + ", expected 1.." +
                     std::to_string(kMaxGroups));
  if (args.row_offsets == nullptr) fail(caller, "row_offsets is null (expected a device array)");
  if (args.max_total_rows < 0 || args.max_total_rows > (int64_t(1) << 31) - 256)
    fail(caller, "max_total_rows = " + std::to_string(args.max_total_rows) +
                     ", expected 0 .. 2^31 - 256");
  if (args.k <= 0 || args.k % 8 != 0)
    fail(caller, "k = " + std::to_string(args.k) + ", expected a positive multiple of 8");
  const bool gated = is_gated(args.epilogue);
  const int64_t n_multiple = gated ? 16 : 8;
  if (args.n <= 0 || args.n % n_multiple != 0)
    fail(caller, "n = " + std::to_string(args.n) + ", expected a positive multiple of " +
                     std::to_string(n_multiple) + (gated ? " (gated epilogue: n = 2*I)" : ""));
  if (args.n > (int64_t(1) << 30) || args.k > (int64_t(1) << 30))
    fail(caller, "n or k larger than 2^30");
  if (args.a_type != ElementType::kBF16 && args.a_type != ElementType::kF16)
    fail(caller, "a_type must be kBF16 or kF16 (kF32 inputs are not supported by this kernel)");
  if (args.a == nullptr || args.b == nullptr || args.c == nullptr)
    fail(caller, "a, b and c must be non-null device pointers");
  if (misaligned(args.a, 16) || misaligned(args.b, 16))
    fail(caller, "a and b must be 16-byte aligned (TMA)");
  if (misaligned(args.c, 16))
    fail(caller, "c must be 16-byte aligned (16-B vector stores)");
  if (misaligned(args.pre_activation, 16))
    fail(caller, "pre_activation must be 16-byte aligned (16-B vector stores)");
  if (args.accumulate && args.c_type != ElementType::kF32)
    fail(caller, "accumulate = true requires c_type = kF32");
  if (args.b_k_major && gated)
    fail(caller, "b_k_major = true is not supported with the gated epilogues (kSwiGlu, kGeGlu)");
  if (is_activation_backward(args.epilogue)) {
    if (!args.b_k_major) fail(caller, "the activation-backward epilogues need b_k_major = true (dgrad)");
    if (args.c_type != args.a_type) fail(caller, "the activation-backward epilogues need c_type == a_type");
    if (args.activation_input == nullptr || misaligned(args.activation_input, 16))
      fail(caller, "the activation-backward epilogues need activation_input, 16-byte aligned");
    if (args.row_scale != nullptr || args.pre_activation != nullptr || args.accumulate)
      fail(caller, "the activation-backward epilogues take no row_scale, pre_activation or accumulate");
  } else if (args.activation_input != nullptr) {
    fail(caller, "activation_input is only read by the activation-backward epilogues");
  }
}

void validate_grouped_wgrad_args(const GroupedWgradArgs& args, const char* caller) {
  auto misaligned = [](const void* p, uintptr_t alignment) {
    return (reinterpret_cast<uintptr_t>(p) % alignment) != 0;
  };
  if (args.num_groups < 1 || args.num_groups > kMaxGroups)
    fail(caller, "num_groups = " + std::to_string(args.num_groups) + ", expected 1.." +
                     std::to_string(kMaxGroups));
  if (args.row_offsets == nullptr) fail(caller, "row_offsets is null (expected a device array)");
  if (args.max_total_rows < 0 || args.max_total_rows > (int64_t(1) << 31) - 256)
    fail(caller, "max_total_rows = " + std::to_string(args.max_total_rows) +
                     ", expected 0 .. 2^31 - 256");
  if (args.m <= 0 || args.m % 8 != 0)
    fail(caller, "m = " + std::to_string(args.m) + ", expected a positive multiple of 8");
  if (args.n <= 0 || args.n % 8 != 0)
    fail(caller, "n = " + std::to_string(args.n) + ", expected a positive multiple of 8");
  if (args.m > (int64_t(1) << 30) || args.n > (int64_t(1) << 30))
    fail(caller, "m or n larger than 2^30");
  if (int64_t(args.num_groups) * args.m > (int64_t(1) << 31) - 1 ||
      (args.m + 127) / 128 * ((args.n + 255) / 256) * args.num_groups > (int64_t(1) << 31) - 1)
    fail(caller, "num_groups * m too large (tile indices must fit in int32)");
  if (args.a_type != ElementType::kBF16 && args.a_type != ElementType::kF16)
    fail(caller, "a_type must be kBF16 or kF16");
  if (args.a == nullptr || args.b == nullptr || args.c == nullptr)
    fail(caller, "a, b and c must be non-null device pointers");
  if (misaligned(args.a, 16) || misaligned(args.b, 16))
    fail(caller, "a and b must be 16-byte aligned (TMA)");
  if (misaligned(args.c, 16)) fail(caller, "c must be 16-byte aligned (16-B vector stores)");
  if (args.accumulate && args.c_type != ElementType::kF32)
    fail(caller, "accumulate = true requires c_type = kF32");
}

void grouped_gemm_wgrad_reference(const GroupedWgradArgs& args, cudaStream_t stream) {
  validate_grouped_wgrad_args(args, "grouped_gemm_wgrad_reference");
  if (args.a_type == ElementType::kBF16)
    launch_wgrad_reference<__nv_bfloat16>(args, stream);
  else
    launch_wgrad_reference<__half>(args, stream);
}

void grouped_gemm_reference(const GroupedGemmArgs& args, cudaStream_t stream) {
  validate_grouped_gemm_args(args, "grouped_gemm_reference");
  if (args.max_total_rows == 0) return;
  if (args.a_type == ElementType::kBF16)
    launch_reference<__nv_bfloat16>(args, stream);
  else
    launch_reference<__half>(args, stream);
}

}  // namespace fusedmoe::cuda
