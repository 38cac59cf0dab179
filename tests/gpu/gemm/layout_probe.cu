// fusedmoe — host-only check (no GPU needed) of the CuTe layout facts the Hopper grouped GEMM's
// epilogue and producer rely on (src/cuda/gemm/grouped_gemm_sm90.cuh):
//   1. accumulator registers 2j, 2j+1 are adjacent columns of one row;
//   2. register i + size/2 is column + 128 of the same row (gated epilogue: gate and up halves);
//   3. consumer warp w holds rows 16w + lane/4 and 16w + lane/4 + 8;
//   4. registers [16c, 16c+16) are the columns [32c, 32c+32) (epilogue staging chunks);
//   5. each 128-column half of a B stage is one contiguous block of 128x64 elements (also for
//      the dgrad config, B K-major);
//   6. wgrad config (A and B MN-major): mn_sw128_byte_offset (the masking threads' address
//      function, grouped_gemm_wgrad_sm90.cuh) equals CuTe's swizzled address of (mn, k) for
//      every element of stage 0 and 1 of A and B;
//   7. the accumulator register i of consumer thread t is row 16 (t / 32) + lane / 4 +
//      8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2 (the wgrad TMA-store epilogue),
//      and output_tile_byte_offset equals CuTe's address in WgradStore's SmemLayoutC.
// Built and run by tests/gpu/gemm/build.sh. Exit code 0 when all hold.
#include <cstdio>

#include "grouped_gemm_wgrad_sm90.cuh"

using namespace cute;

template <class Cfg>
bool check() {
  typename Cfg::TiledMma mma;
  bool ok = true;
  for (int t = 0; t < 256; ++t) {
    auto thr = mma.get_thread_slice(t);
    auto c = thr.partition_C(make_identity_tensor(make_shape(Int<128>{}, Int<256>{})));
    const int half = size(c) / 2, lane = t % 32, warp_row0 = (t / 32) * 16;
    for (int i = 0; i < size(c); ++i) {
      const int m = get<0>(c(i)), n = get<1>(c(i));
      if (i % 2 == 0 && (get<0>(c(i + 1)) != m || get<1>(c(i + 1)) != n + 1)) ok = false;
      if (i < half && (get<0>(c(i + half)) != m || get<1>(c(i + half)) != n + 128)) ok = false;
      if (m - warp_row0 != lane / 4 && m - warp_row0 != lane / 4 + 8) ok = false;
      if (n / 32 != i / 16) ok = false;
      if (m != warp_row0 + lane / 4 + 8 * ((i / 2) % 2) || n != 8 * (i / 4) + 2 * (lane % 4) + i % 2) ok = false;
    }
  }
  auto sB = make_tensor(make_smem_ptr((typename Cfg::ElementAB*)nullptr), typename Cfg::SmemLayoutB{});
  auto halves = flat_divide(sB, make_shape(Int<128>{}, Int<64>{}));
  for (int h = 0; h < 2; ++h) {
    auto half_tensor = halves(_, _, h, 0, 0);
    if (cosize(half_tensor.layout()) != 128 * 64) ok = false;
    if (half_tensor.data() != sB.data() + h * 128 * 64) ok = false;
  }
  return ok;
}

template <class Cfg>
bool check_wgrad_offsets() {
  using T = typename Cfg::ElementAB;
  // A 1024-B aligned host buffer: CuTe applies the SW128 swizzle to the address bits.
  alignas(1024) static T buffer[256 * 64 * 4];
  bool ok = true;
  auto sA = make_tensor(make_smem_ptr(buffer), typename Cfg::SmemLayoutA{});
  auto sB = make_tensor(make_smem_ptr(buffer), typename Cfg::SmemLayoutB{});
  for (int s = 0; s < 2; ++s) {
    for (int k = 0; k < 64; ++k) {
      for (int m = 0; m < 128; ++m) {
        const auto off = uint32_t(reinterpret_cast<char*>(&sA(m, k, s)) - reinterpret_cast<char*>(buffer));
        if (off != s * 128 * 64 * sizeof(T) + fusedmoe::cuda::sm90::mn_sw128_byte_offset(m, k)) ok = false;
      }
      for (int n = 0; n < 256; ++n) {
        const auto off = uint32_t(reinterpret_cast<char*>(&sB(n, k, s)) - reinterpret_cast<char*>(buffer));
        if (off != s * 256 * 64 * sizeof(T) + fusedmoe::cuda::sm90::mn_sw128_byte_offset(n, k)) ok = false;
      }
    }
  }
  if (!ok) std::printf("layout_probe: mn_sw128_byte_offset differs from CuTe's layout\n");
  return ok;
}

template <class Cfg>
bool check_output_tile_offsets() {
  using T = typename Cfg::ElementAB;
  alignas(1024) static T buffer[128 * 256];
  auto sC = make_tensor(make_smem_ptr(buffer), typename fusedmoe::cuda::sm90::WgradStore<Cfg>::SmemLayoutC{});
  bool ok = true;
  for (int m = 0; m < 128; ++m)
    for (int n = 0; n < 256; ++n) {
      const auto off = uint32_t(reinterpret_cast<char*>(&sC(m, n)) - reinterpret_cast<char*>(buffer));
      if (off != fusedmoe::cuda::sm90::output_tile_byte_offset(m, n)) ok = false;
    }
  if (!ok) std::printf("layout_probe: output_tile_byte_offset differs from CuTe's layout\n");
  return ok;
}

int main() {
  using namespace fusedmoe::cuda::sm90;
  const bool ok = check<Config<cute::bfloat16_t, true>>() && check<Config<cute::bfloat16_t, false>>() &&
                  check<Config<cute::half_t, true>>() && check<Config<cute::half_t, false>>() &&
                  check<Config<cute::bfloat16_t, false, Operands::kDgrad>>() &&
                  check<Config<cute::half_t, false, Operands::kDgrad>>() &&
                  check<Config<cute::bfloat16_t, false, Operands::kWgrad>>() &&
                  check_wgrad_offsets<Config<cute::bfloat16_t, false, Operands::kWgrad>>() &&
                  check_wgrad_offsets<Config<cute::half_t, false, Operands::kWgrad>>() &&
                  check_output_tile_offsets<Config<cute::bfloat16_t, false, Operands::kWgrad>>() &&
                  check_output_tile_offsets<Config<cute::half_t, false, Operands::kWgrad>>();
  std::printf("layout_probe: %s\n", ok ? "all layout assumptions hold" : "LAYOUT ASSUMPTION VIOLATED");
  return ok ? 0 : 1;
}
