// fusedmoe — host launchers of the Hopper grouped GEMMs (kernels in grouped_gemm_sm90.cuh and
// grouped_gemm_wgrad_sm90.cuh).
// Instantiations: forward {bf16, fp16} x {non-gated, gated}; dgrad (B K-major) {bf16, fp16}
// non-gated, plain and with the pre-activation ring (the k*Backward epilogues); wgrad {bf16,
// fp16}. The activation and output type are runtime arguments of the epilogue.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "cuda/common.cuh"
#include "grouped_gemm.hpp"
#include "grouped_gemm_sm90.cuh"
#include "grouped_gemm_wgrad_sm90.cuh"

namespace fusedmoe::cuda {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream os;
    os << "grouped_gemm: " << what << " failed: " << cudaGetErrorName(err) << " ("
       << cudaGetErrorString(err) << ")";
    throw std::runtime_error(os.str());
  }
}

bool env_flag_set(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// The device's facts come from device_facts (common.cuh), queried once per device: a launch of
// these kernels is on the host's critical path (the first GEMM of a forward waits for it).
const DeviceFacts& current_device_facts() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device_facts(device);
}

int current_sm_count() { return current_device_facts().sms; }

void check_device_is_sm90() {
  const DeviceFacts& f = current_device_facts();
  if (!f.sm90) {
    std::ostringstream os;
    os << "grouped_gemm: needs an sm_90 (Hopper) GPU, the current device is sm_" << f.major
       << f.minor << "; use grouped_gemm_reference or another backend";
    throw std::runtime_error(os.str());
  }
}

template <class ElementAB, bool kGated, sm90::Operands kOperands = sm90::Operands::kForward, bool kPreRing = false>
void launch(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream) {
  using Cfg = sm90::Config<ElementAB, kGated, kOperands, kPreRing>;
  using Params = sm90::Params<Cfg>;

  const int n = int(args.n), k = int(args.k);
  const int n_out = kGated ? n / 2 : n;
  const int n_tiles = (n_out + Cfg::kOutBlockN - 1) / Cfg::kOutBlockN;
  const int64_t rows_bound = std::max<int64_t>(args.max_total_rows, 1);
  // Upper bound of the tile count: every group may add one partial row tile.
  const int64_t max_tiles =
      ((rows_bound + Cfg::kBlockM - 1) / Cfg::kBlockM + args.num_groups) * n_tiles;
  const int sm_count = current_sm_count();
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(sm_count, max_tiles)));

  const auto* a = static_cast<const ElementAB*>(args.a);
  const auto* b = static_cast<const ElementAB*>(args.b);
  // The gated pre-activation through TMA stores (store_tile_fixed): 16-bit of the operands' type,
  // 16-B aligned rows. FUSEDMOE_NO_PRE_TMA_STORE=1 keeps the warps' own stores (comparisons).
  const bool pre_tma = kGated && args.pre_activation != nullptr && args.c_type == args.a_type &&
                       reinterpret_cast<uintptr_t>(args.pre_activation) % 16 == 0 && n % 8 == 0 &&
                       !env_flag_set("FUSEDMOE_NO_PRE_TMA_STORE");
  // The output likewise, forward kernels only (store_tile_fixed; FUSEDMOE_NO_OUT_TMA_STORE=1 keeps
  // the warps' own stores).
  const bool c_tma = kOperands == sm90::Operands::kForward && args.c != nullptr && args.c_type == args.a_type &&
                     !args.accumulate &&
                     reinterpret_cast<uintptr_t>(args.c) % 16 == 0 && n_out % 8 == 0 &&
                     !env_flag_set("FUSEDMOE_NO_OUT_TMA_STORE");
  Params params{
      .tma_a = Cfg::make_tma_a(a, int(rows_bound), k),
      .tma_b = Cfg::make_tma_b(b, n, k, args.num_groups),
      .a = a,
      .row_offsets = args.row_offsets,
      .num_groups = args.num_groups,
      .n = n,
      .k = k,
      .n_out = n_out,
      .n_tiles = n_tiles,
      .k_tiles = (k + Cfg::kBlockK - 1) / Cfg::kBlockK,
      .up_column_offset = kGated ? n / 2 : Cfg::kHalfN,
      .tensormap_workspace = static_cast<cute::TmaDescriptor*>(workspace),
      .epilogue = args.epilogue,
      .c_type = args.c_type,
      .c = args.c,
      .pre_activation = args.pre_activation,
      .row_scale = args.row_scale,
      .accumulate = args.accumulate,
      .activation_input = args.activation_input,
      .tma_chunk_pre = pre_tma ? Cfg::make_tma_chunk(static_cast<ElementAB*>(args.pre_activation), int(rows_bound), n)
                               : typename Cfg::TmaChunk{},
      .pre_tma = pre_tma,
      .tma_chunk_c = c_tma ? Cfg::make_tma_chunk(static_cast<ElementAB*>(args.c), int(rows_bound), n_out)
                           : typename Cfg::TmaChunk{},
      .c_tma = c_tma,
      .tma_pre = {},
      .pre_width = 0,
  };
  if constexpr (kPreRing) {
    params.pre_width = is_gated(forward_of(args.epilogue)) ? 2 * n : n;
    params.tma_pre = Cfg::make_tma_pre(static_cast<const ElementAB*>(args.activation_input), int(rows_bound),
                                       params.pre_width);
  }

  const size_t smem_bytes = sizeof(sm90::SharedStorage<Cfg>) + sm90::pre_ring_bytes<Cfg>() +
                            sm90::GroupTables::bytes(args.num_groups);
  auto* kernel = &sm90::grouped_gemm_kernel<Cfg>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
  kernel<<<grid, Cfg::kNumThreads, smem_bytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "kernel launch");
}

template <class ElementAB>
void launch_wgrad(const GroupedWgradArgs& args, cudaStream_t stream) {
  using Cfg = sm90::Config<ElementAB, false, sm90::Operands::kWgrad>;
  const int m = int(args.m), n = int(args.n);
  const int rows_bound = int(std::max<int64_t>(args.max_total_rows, 1));
  const int m_tiles = (m + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int n_tiles = (n + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int64_t total_tiles = int64_t(args.num_groups) * m_tiles * n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(current_sm_count(), total_tiles)));
  const auto* a = static_cast<const ElementAB*>(args.a);
  const auto* b = static_cast<const ElementAB*>(args.b);
  // The TMA-store epilogue writes C in the operands' type; other outputs (f32, accumulation, the
  // other 16-bit type) go through the register epilogue. FUSEDMOE_NO_WGRAD_TMA_STORE=1 forces it.
  const bool tma_store = !args.accumulate && args.c_type == args.a_type &&
                         !env_flag_set("FUSEDMOE_NO_WGRAD_TMA_STORE");
  sm90::WgradParams<Cfg> params{
      .base = {
          .tma_a = Cfg::make_tma_a(a, m, rows_bound),       // (m, rows), m contiguous
          .tma_b = Cfg::make_tma_b(b, n, rows_bound, 1),    // (n, rows, 1), n contiguous
          .a = a,
          .row_offsets = args.row_offsets,
          .num_groups = args.num_groups,
          .n = n,
          .k = rows_bound,
          .n_out = n,
          .n_tiles = n_tiles,
          .k_tiles = 0,  // per tile
          .up_column_offset = Cfg::kHalfN,
          .tensormap_workspace = nullptr,
          .epilogue = Epilogue::kIdentity,
          .c_type = args.c_type,
          .c = args.c,
          .pre_activation = nullptr,
          .row_scale = nullptr,
          .accumulate = args.accumulate,
          .activation_input = nullptr,
          .tma_chunk_pre = {},
          .pre_tma = false,
          .tma_chunk_c = {},
          .c_tma = false,
          .tma_pre = {},
          .pre_width = 0,
      },
      .tma_c = tma_store ? sm90::WgradStore<Cfg>::make_tma_c(static_cast<ElementAB*>(args.c), m, n,
                                                             args.num_groups)
                         : typename sm90::WgradStore<Cfg>::TmaC{},
      .m = m,
      .rows_bound = rows_bound,
      .m_tiles = m_tiles,
      .n_tiles = n_tiles,
      // FUSEDMOE_WGRAD_M_FASTEST=1 keeps the m-fastest order for every shape (for comparisons).
      .n_fastest = m > n && !env_flag_set("FUSEDMOE_WGRAD_M_FASTEST"),
  };
  const size_t smem_bytes =
      sizeof(sm90::SharedStorage<Cfg>) + sm90::wgrad_table_bytes(args.num_groups);
  auto* kernel = tma_store ? &sm90::grouped_wgrad_kernel<Cfg, true> : &sm90::grouped_wgrad_kernel<Cfg, false>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
  kernel<<<grid, Cfg::kNumThreads, smem_bytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "wgrad kernel launch");
}

}  // namespace

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{kernel, device}];
  if (bytes <= current) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  current = bytes;
}

size_t grouped_gemm_wgrad_workspace_size(const GroupedWgradArgs& /*args*/) { return 0; }

void grouped_gemm_wgrad(const GroupedWgradArgs& args, void* /*workspace*/, cudaStream_t stream) {
  validate_grouped_wgrad_args(args, "grouped_gemm_wgrad");
  check_device_is_sm90();
  if (args.a_type == ElementType::kBF16) launch_wgrad<cute::bfloat16_t>(args, stream);
  else launch_wgrad<cute::half_t>(args, stream);
}

size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args) {
  // One published A descriptor per CTA; the k*Backward epilogues also one of the pre-activation.
  const size_t per_cta = is_activation_backward(args.epilogue) ? 2 : 1;
  return per_cta * size_t(current_sm_count()) * sizeof(cute::TmaDescriptor);
}

void grouped_gemm(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream) {
  validate_grouped_gemm_args(args, "grouped_gemm");
  if (workspace == nullptr)
    throw std::runtime_error(
        "grouped_gemm: workspace is null; allocate grouped_gemm_workspace_size(args) bytes");
  if (reinterpret_cast<uintptr_t>(workspace) % 128 != 0)
    throw std::runtime_error("grouped_gemm: workspace must be 128-byte aligned");
  check_device_is_sm90();
  if (args.max_total_rows == 0) return;
  const bool gated = is_gated(args.epilogue);
  constexpr auto kDgrad = sm90::Operands::kDgrad;
  if (args.b_k_major) {  // validation rejects gated epilogues here
    // The k*Backward epilogues read the pre-activation through a shared-memory ring filled by TMA
    // (Config::kPreRing); FUSEDMOE_NO_PRE_RING=1 runs them on the plain dgrad kernel, whose
    // epilogue reads it from global memory (for comparisons).
    if (is_activation_backward(args.epilogue) && !env_flag_set("FUSEDMOE_NO_PRE_RING")) {
      if (args.a_type == ElementType::kBF16) launch<cute::bfloat16_t, false, kDgrad, true>(args, workspace, stream);
      else launch<cute::half_t, false, kDgrad, true>(args, workspace, stream);
      return;
    }
    if (args.a_type == ElementType::kBF16) launch<cute::bfloat16_t, false, kDgrad>(args, workspace, stream);
    else launch<cute::half_t, false, kDgrad>(args, workspace, stream);
    return;
  }
  if (args.a_type == ElementType::kBF16) {
    if (gated) launch<cute::bfloat16_t, true>(args, workspace, stream);
    else launch<cute::bfloat16_t, false>(args, workspace, stream);
  } else {
    if (gated) launch<cute::half_t, true>(args, workspace, stream);
    else launch<cute::half_t, false>(args, workspace, stream);
  }
}

}  // namespace fusedmoe::cuda
