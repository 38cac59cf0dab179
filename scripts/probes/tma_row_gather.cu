// scripts/probes/tma_row_gather.cu — can the TMA unit gather a GEMM0 tile's A rows from x?
//
// At W = 1 the fused kernel could skip the dispatch copy if each GEMM0 stage loaded its 128 A
// rows straight from x (Hopper's TMA has no gather: one 2-D box of 1 x 64 elements per row).
// This measures one SM's stage rate for the three ways, on every SM at once, with the 32 KB of
// B per stage of the real tile beside it: A as one 128 x 64 box; A as 128 row boxes from one
// thread; A as row boxes issued by a whole warp (4 per lane). It first checks that the row boxes
// land in the 128-B-swizzled layout of the single box (TMA swizzles by shared-memory address).
// Result and conclusion: docs/perf.md v0.19.
//
// Build and run (sm_90a):
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o tma_row_gather scripts/probes/tma_row_gather.cu
//   ./tma_row_gather
#include "tma_probe.cuh"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

struct Maps { CUtensorMap a_tile, a_row, b; };

// mode 0: A one box; 1: A 128 row boxes from one thread; 2: A row boxes, 4 per lane of a warp;
// 3: mode 2 without B; 4: mode 0 without B.
__global__ void __launch_bounds__(160, 1) probe(const __grid_constant__ Maps m, const int* idx, int mode, int tasks,
                                                int consume_ns, unsigned char* dump) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStage);
  uint64_t* empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) { mbar_init(&full[i], 1); mbar_init(&empty[i], 128); }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool with_b = mode < 3;
  const int bytes = (with_b ? kB : 0) + kA;
  if (warp == 0) {
    int stage = 0; uint32_t phase = 0;
    for (int t = blockIdx.x; t < tasks; t += gridDim.x) {
      const int rt = t % (T / 128), nt = t / (T / 128);
      int my_rows[4];
      for (int j = 0; j < 4; ++j) my_rows[j] = idx[rt * 128 + lane * 4 + j];
      for (int ks = 0; ks < H / 64; ++ks) {
        mbar_wait(&empty[stage], phase ^ 1);
        unsigned char* a = smem + stage * kStage;
        unsigned char* b = a + kA;
        if (lane == 0) mbar_expect(&full[stage], bytes);
        __syncwarp();
        if (mode == 0 || mode == 4) {
          if (lane == 0) tma2d(a, &m.a_tile, &full[stage], ks * 64, rt * 128);
        } else if (mode == 1) {
          for (int r = 0; r < 128; ++r) {
            const int row = __shfl_sync(0xffffffffu, my_rows[r % 4], r / 4);
            if (lane == 0) tma2d(a + r * 128, &m.a_row, &full[stage], ks * 64, row);
          }
        } else {
          for (int j = 0; j < 4; ++j) tma2d(a + (lane * 4 + j) * 128, &m.a_row, &full[stage], ks * 64, my_rows[j]);
        }
        if (with_b && lane == 0)
          for (int q = 0; q < 4; ++q) tma2d(b + q * 8192, &m.b, &full[stage], (nt % 16) * 256 + q * 64, ks * 64);
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
    }
  } else {
    int stage = 0; uint32_t phase = 0;
    for (int t = blockIdx.x; t < tasks; t += gridDim.x) {
      for (int ks = 0; ks < H / 64; ++ks) {
        mbar_wait(&full[stage], phase);
        if (dump && blockIdx.x == 0 && t == 0 && ks == 0)
          for (int i = threadIdx.x - 32; i < kA; i += 128) dump[i] = smem[stage * kStage + i];
        if (consume_ns) { uint64_t t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0)); uint64_t t1;
          do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1)); while (t1 - t0 < (uint64_t)consume_ns); }
        mbar_arrive(&empty[stage]);
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
    }
  }
}

int main() {
  std::vector<__nv_bfloat16> hx(size_t(T) * H);
  for (size_t i = 0; i < hx.size(); ++i) hx[i] = __float2bfloat16(float((i * 2654435761u) % 1000) / 1000.f);
  __nv_bfloat16 *x, *w; int* idx; unsigned char* dump;
  CK(cudaMalloc(&x, hx.size() * 2)); CK(cudaMalloc(&w, size_t(H) * N * 2)); CK(cudaMalloc(&idx, T * 4)); CK(cudaMalloc(&dump, 2 * kA));
  CK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice)); CK(cudaMemset(w, 0, size_t(H) * N * 2));
  Maps m{make_map(x, H, T, 64, 128), make_map(x, H, T, 64, 1), make_map(w, N, H, 64, 64)};
  const int smem = kStages * kStage + 2 * kStages * 8;
  CK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  // Swizzle check: identity rows, the first stage of task 0 by one box and by row boxes.
  std::vector<int> hi(T); std::iota(hi.begin(), hi.end(), 0);
  CK(cudaMemcpy(idx, hi.data(), T * 4, cudaMemcpyHostToDevice));
  probe<<<1, 160, smem>>>(m, idx, 0, 1, 0, dump);
  probe<<<1, 160, smem>>>(m, idx, 2, 1, 0, dump + kA);
  CK(cudaDeviceSynchronize());
  std::vector<unsigned char> hd(2 * kA); CK(cudaMemcpy(hd.data(), dump, 2 * kA, cudaMemcpyDeviceToHost));
  printf("swizzle check (row boxes == one box): %s\n", std::equal(hd.begin(), hd.begin() + kA, hd.begin() + kA) ? "equal" : "DIFFERENT");
  std::mt19937 rng(7); std::shuffle(hi.begin(), hi.end(), rng);
  CK(cudaMemcpy(idx, hi.data(), T * 4, cudaMemcpyHostToDevice));
  const int tasks = (T / 128) * 16;
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const char* names[] = {"A one box + B", "A rows, 1 thread + B", "A rows, warp + B", "A rows, warp, no B", "A one box, no B"};
  for (int consume : {0, 600}) {
    for (int mode = 0; mode < 5; ++mode) {
      std::vector<float> ts;
      for (int rep = 0; rep < 5; ++rep) {
        cudaEventRecord(e0);
        probe<<<sms, 160, smem>>>(m, idx, mode, tasks, consume, nullptr);
        cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
        float ms; cudaEventElapsedTime(&ms, e0, e1); ts.push_back(ms);
      }
      std::sort(ts.begin(), ts.end());
      const double stages_per_block = double(tasks) / sms * (H / 64);
      printf("consume %3d ns  %-24s  %.3f ms  %.3f us/stage/SM  A+B %.1f GB/s/SM\n", consume, names[mode], ts[2],
             ts[2] * 1e3 / stages_per_block, (mode < 3 ? kStage : kA) * stages_per_block / (ts[2] * 1e-3) / 1e9);
    }
  }
  CK(cudaGetLastError());
  return 0;
}
