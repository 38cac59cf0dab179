// fusedmoe — grouped GEMM over experts (the tile GEMM engine), host interface.
//
// One launch computes, for every expert g, C_g = epilogue(A_g · B_g), where A_g is the block of
// rows [row_offsets[g], row_offsets[g+1]) of one row-major A and B_g is the g-th K x N slice of
// B. The per-expert row counts are read ON THE DEVICE (row_offsets is a device array), so a call
// needs no host synchronisation and can be captured in a CUDA graph.
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

namespace fusedmoe::cuda {

// Epilogue applied to the fp32 accumulator.
//   kIdentity / kRelu / kGelu: C[row, j] = act(acc[row, j]), C has n columns.
//   kSwiGlu / kGeGlu (gated): B has n = 2*I columns; columns [0, I) are the gate half g and
//     [I, 2I) the up half u. C[row, i] = act(g_i) * u_i with C of width I = n/2;
//     act = silu for kSwiGlu, exact-erf gelu for kGeGlu.
enum class Epilogue { kIdentity, kRelu, kGelu, kSwiGlu, kGeGlu };
enum class ElementType { kBF16, kF16, kF32 };

constexpr bool is_gated(Epilogue e) { return e == Epilogue::kSwiGlu || e == Epilogue::kGeGlu; }

struct GroupedGemmArgs {
  int num_groups = 0;                  // experts, 1 ..= kMaxGroups
  const int64_t* row_offsets = nullptr;// DEVICE [num_groups + 1], non-decreasing: group g owns
                                       // rows [row_offsets[g], row_offsets[g+1]) of A, C and
                                       // pre_activation. A holds row_offsets[num_groups] rows.
  int64_t max_total_rows = 0;          // host upper bound of row_offsets[num_groups] (sizes the
                                       // grid; may exceed the real total)
  int64_t n = 0, k = 0;                // B is [num_groups, k, n] row-major (n contiguous)
  const void* a = nullptr;             // [rows, k] row-major, a_type (kBF16 or kF16), 16-B aligned
  const void* b = nullptr;             // [num_groups, k, n], a_type, 16-B aligned
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
};

// Largest num_groups the Hopper kernel accepts (per-group tables live in shared memory).
inline constexpr int kMaxGroups = 1024;

// Bytes of device workspace grouped_gemm needs (one 128-B TMA descriptor per SM of the current
// device). Pass a pointer to at least this many bytes, 128-B aligned (cudaMalloc is).
size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args);

// Hopper (sm_90a) grouped GEMM. Preconditions (checked, std::runtime_error naming the argument):
// k % 8 == 0, n % 8 == 0 (n % 16 == 0 for gated), k > 0, a/b/c 16-B aligned, pre_activation
// 8-B aligned, accumulate only with c_type kF32, a_type kBF16 or kF16, the current device is
// sm_90. Asynchronous on `stream`; CUDA errors at launch are thrown.
void grouped_gemm(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

// Reference: same contract and same outputs (C, pre_activation), computed by a simple
// CUDA-core kernel with fp32 accumulation in sequential k order. Needs no workspace. For tests.
void grouped_gemm_reference(const GroupedGemmArgs& args, cudaStream_t stream);

// Shared argument validation (throws std::runtime_error with a clear message).
void validate_grouped_gemm_args(const GroupedGemmArgs& args, const char* caller);

}  // namespace fusedmoe::cuda
