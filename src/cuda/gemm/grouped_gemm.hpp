// fusedmoe — grouped GEMM over experts (the tile GEMM engine), host interface.
//
// One launch computes, for every expert g, C_g = epilogue(A_g · B_g), where A_g is the block of
// rows [row_offsets[g], row_offsets[g+1]) of one row-major A and B_g is the g-th K x N slice of
// B. The per-expert row counts are read ON THE DEVICE (row_offsets is a device array), so a call
// needs no host synchronisation and can be captured in a CUDA graph.
//
// Backward (dgrad): with b_k_major = true, B is stored [num_groups, n, k] (k contiguous) and
// C_g = epilogue(A_g · B_gᵀ): dX = dY · Wᵀ without materialising a transpose.
// Backward (wgrad, varying K): grouped_gemm_wgrad computes C_g = A_gᵀ · B_g over the rows of
// each group (see GroupedWgradArgs).
//
// Implementations:
//   grouped_gemm            Hopper (sm_90a) kernel: CuTe wgmma + TMA, warp-specialised
//                           producer/consumer pipeline, persistent tile scheduler
//                           (grouped_gemm_sm90.cu, device pieces in grouped_gemm_sm90.cuh).
//   grouped_gemm_reference  Obviously-correct CUDA-core kernel (fp32 accumulate, one thread per
//                           output element), the oracle for tests (grouped_gemm_reference.cu).
//
// Test and benchmark (needs an H100/H200): CUTLASS_INCLUDE=... tests/gpu/gemm/build.sh, then
// build/gemm/grouped_gemm_test; tests/gpu/gemm/run_gpu.sh does build + SASS check + tests +
// benchmark + torch baseline in one go (see the header comment of grouped_gemm_test.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "fusedmoe/config.hpp"

namespace fusedmoe::cuda {

// Epilogue applied to the fp32 accumulator.
//   kIdentity / kRelu / kGelu: C[row, j] = act(acc[row, j]), C has n columns.
//   kSwiGlu / kGeGlu (gated): B has n = 2*I columns; columns [0, I) are the gate half g and
//     [I, 2I) the up half u. C[row, i] = act(g_i) * u_i with C of width I = n/2;
//     act = silu for kSwiGlu, exact-erf gelu for kGeGlu.
//   k*Backward (the dgrad of GEMM1 fused with the activation's backward; b_k_major only): the
//     accumulator is dact [rows, n]; activation_input is the forward's pre-activation and C is
//     dpre, both of width n (kReluBackward, kGeluBackward) or 2n (gated: gate half, up half):
//     C[row, j] = dact * act'(pre[row, j]), resp. C[row, j] = dact * up * act'(gate) and
//     C[row, n + j] = dact * act(gate). c_type == a_type; no row_scale, pre_activation or
//     accumulate.
enum class Epilogue {
  kIdentity, kRelu, kGelu, kSwiGlu, kGeGlu,
  kReluBackward, kGeluBackward, kSwiGluBackward, kGeGluBackward
};

// The GEMM0 epilogue of an expert FFN kind (its activation; gated kinds: both halves).
constexpr Epilogue epilogue_of(FfnKind kind) {
  switch (kind) {
    case FfnKind::kReluMlp: return Epilogue::kRelu;
    case FfnKind::kGeluMlp: return Epilogue::kGelu;
    case FfnKind::kSwiGlu: return Epilogue::kSwiGlu;
    case FfnKind::kGeGlu: return Epilogue::kGeGlu;
  }
  return Epilogue::kIdentity;
}
constexpr bool is_activation_backward(Epilogue e) { return e >= Epilogue::kReluBackward; }
// The forward epilogue whose backward a k*Backward epilogue is (others: themselves).
constexpr Epilogue forward_of(Epilogue e) {
  return is_activation_backward(e)
             ? static_cast<Epilogue>(static_cast<int>(e) - static_cast<int>(Epilogue::kReluBackward) +
                                     static_cast<int>(Epilogue::kRelu))
             : e;
}
// The fused dgrad-of-GEMM1 epilogue of an expert FFN kind.
constexpr Epilogue backward_epilogue_of(FfnKind kind) {
  return static_cast<Epilogue>(static_cast<int>(epilogue_of(kind)) - static_cast<int>(Epilogue::kRelu) +
                               static_cast<int>(Epilogue::kReluBackward));
}
enum class ElementType { kBF16, kF16, kF32 };

constexpr bool is_gated(Epilogue e) { return e == Epilogue::kSwiGlu || e == Epilogue::kGeGlu; }

struct GroupedGemmArgs {
  int num_groups = 0;                  // experts, 1 ..= kMaxGroups
  const int64_t* row_offsets = nullptr;// DEVICE [num_groups + 1], non-decreasing: group g owns
                                       // rows [row_offsets[g], row_offsets[g+1]) of A, C and
                                       // pre_activation. A holds row_offsets[num_groups] rows.
  int64_t max_total_rows = 0;          // host upper bound of row_offsets[num_groups] (sizes the
                                       // grid; may exceed the real total)
  int64_t n = 0, k = 0;                // B is [num_groups, k, n] row-major (n contiguous), or
                                       // [num_groups, n, k] (k contiguous) with b_k_major
  const void* a = nullptr;             // [rows, k] row-major, a_type (kBF16 or kF16), 16-B aligned
  const void* b = nullptr;             // [num_groups, k, n] (or [num_groups, n, k] with
                                       // b_k_major), a_type, 16-B aligned
  void* c = nullptr;                   // [rows, n_out] row-major, c_type, 16-B aligned;
                                       // n_out = n (non-gated) or n/2 (gated)
  ElementType a_type = ElementType::kBF16;
  ElementType c_type = ElementType::kBF16;
  Epilogue epilogue = Epilogue::kIdentity;
  const float* row_scale = nullptr;    // optional [rows]: output row r is multiplied by
                                       // row_scale[r] (after the activation, not applied to
                                       // pre_activation)
  bool accumulate = false;             // c_type must be kF32: C += result
  void* pre_activation = nullptr;      // optional [rows, n], c_type: the raw GEMM result before
                                       // the epilogue (both halves for gated epilogues, at their
                                       // original column positions)
  bool b_k_major = false;              // B stored [num_groups, n, k] (k contiguous) and the
                                       // product uses B_gᵀ: C_g = A_g · B_gᵀ (dgrad). Not
                                       // with the gated epilogues.
  const void* activation_input = nullptr;  // k*Backward epilogues: the forward's pre-activation
                                           // (a_type, C's shape), 16-B aligned
};

// Largest num_groups the Hopper kernel accepts (per-group tables live in shared memory).
inline constexpr int kMaxGroups = 1024;

// Bytes of device workspace grouped_gemm needs (one 128-B TMA descriptor per SM of the current
// device; two with the k*Backward epilogues, whose pre-activation is also loaded by TMA). Pass a
// pointer to at least this many bytes, 128-B aligned (cudaMalloc is).
size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args);

// Hopper (sm_90a) grouped GEMM. Preconditions (checked, std::runtime_error naming the argument):
// k % 8 == 0, n % 8 == 0 (n % 16 == 0 for gated), k > 0, a/b/c and pre_activation 16-B
// aligned, accumulate only with c_type kF32, a_type kBF16 or kF16, the current device is
// sm_90. Asynchronous on `stream`; CUDA errors at launch are thrown.
void grouped_gemm(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

// Raises a kernel's dynamic shared memory limit on the current device only when a launch needs
// more than any earlier one (the attribute is per (function, device) and persists). Keyed by the
// kernel's address: a module's own copy of a kernel gets its own entry.
void allow_dynamic_smem(const void* kernel, size_t bytes);

// Reference: same contract and same outputs (C, pre_activation), computed by a simple
// CUDA-core kernel with fp32 accumulation in sequential k order. Needs no workspace. For tests.
void grouped_gemm_reference(const GroupedGemmArgs& args, cudaStream_t stream);

// Shared argument validation (throws std::runtime_error with a clear message).
void validate_grouped_gemm_args(const GroupedGemmArgs& args, const char* caller);

// ---------------------------------------------------------------------------------------------
// Weight gradient (varying K): for every group g with rows [row_offsets[g], row_offsets[g+1]),
//   C_g[i, j] = sum over rows r of g of A[r, i] * B[r, j]          (C_g = A_gᵀ · B_g)
// e.g. dW2[e] = act_eᵀ · dy_e (m = I, n = H) and dW1[e] = x_eᵀ · dpre_e (m = H, n = 2I).
// Groups with no rows get C_g = 0 (accumulate: C_g unchanged). Row counts are read on the
// device: no host synchronisation, CUDA-graph capturable.
struct GroupedWgradArgs {
  int num_groups = 0;                   // 1 ..= kMaxGroups
  const int64_t* row_offsets = nullptr; // DEVICE [num_groups + 1], non-decreasing, >= 0
  int64_t max_total_rows = 0;           // host upper bound of row_offsets[num_groups] (A and B
                                        // hold at least row_offsets[num_groups] rows)
  int64_t m = 0, n = 0;                 // C_g is m x n
  const void* a = nullptr;              // [rows, m] row-major, a_type, 16-B aligned
  const void* b = nullptr;              // [rows, n] row-major, a_type, 16-B aligned
  void* c = nullptr;                    // [num_groups, m, n] row-major, c_type, 16-B aligned
  ElementType a_type = ElementType::kBF16;  // kBF16 or kF16 (A and B)
  ElementType c_type = ElementType::kBF16;  // kBF16, kF16 or kF32
  bool accumulate = false;              // c_type must be kF32: C += result
};

// Bytes of device workspace grouped_gemm_wgrad needs (currently 0; pass any pointer, or null
// when 0). Reserved for split-K over rows.
size_t grouped_gemm_wgrad_workspace_size(const GroupedWgradArgs& args);

// Hopper (sm_90a) wgrad. Preconditions (checked, std::runtime_error naming the argument):
// m % 8 == 0, n % 8 == 0, m, n > 0, a/b/c 16-B aligned, accumulate only with c_type kF32,
// a_type kBF16 or kF16, max_total_rows < 2^31, the current device is sm_90. Rows outside a
// group that share its first/last 64-row block are read and multiplied by zero in shared
// memory (so other groups' values never leak in). Asynchronous on `stream`.
void grouped_gemm_wgrad(const GroupedWgradArgs& args, void* workspace, cudaStream_t stream);

// Reference: same contract, CUDA cores, fp32 accumulation in sequential row order. For tests.
void grouped_gemm_wgrad_reference(const GroupedWgradArgs& args, cudaStream_t stream);

void validate_grouped_wgrad_args(const GroupedWgradArgs& args, const char* caller);

}  // namespace fusedmoe::cuda
