// scripts/probes/tma_multicast.cu — would two CTAs sharing B by TMA multicast load a GEMM tile's
// stages faster?
//
// The expert tiles' mainloop consumes a stage (A 128 x 64 + B 256 x 64, bf16: 48 KB) in
// ~0.63-0.7 us, and the stage loads alone, on all SMs at once, arrive every ~0.71 us
// (tma_row_gather.cu, docs/perf.md v0.19): the tiles are bound by their loads. This measures the
// stage rate of a 4-stage pipeline on every SM for: (0) today's stage, one CTA per SM; (1) CTA
// pairs (2-CTA clusters) on two row tiles of one column tile, each loading its own A and half of
// B multicast to both (each SM still receives 48 KB per stage, L2 serves 32 KB); (2) a 32-KB stage
// (A + half of B, no cluster): what the bytes alone would give. Consumers either release a stage
// at once or hold it 600 ns (about the tensor cores' time for one). Result: docs/perf.md v0.21.
//
// Build and run (sm_90a):
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o tma_multicast scripts/probes/tma_multicast.cu -lcuda
//   ./tma_multicast
#include "tma_probe.cuh"

#include <algorithm>
#include <vector>

// Arrive on the mbarrier at the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* b, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(b)), "r"(rank));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
// The same box into the same offsets of every CTA in `mask`, each CTA's own mbarrier counting it.
__device__ __forceinline__ void tma2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                uint16_t mask) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
               " [%0], [%1, {%3, %4}], [%2], %5;"
               ::"r"(smem_u32(dst)), "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(mask) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

struct Maps { CUtensorMap a, b; };

// mode 0: A + B, one CTA; 1: A + B, 2-CTA cluster, B halves multicast; 2: A + half of B, one CTA.
__global__ void __launch_bounds__(160, 1) probe(const __grid_constant__ Maps m, int mode, int tasks, int consume_ns) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStage);
  uint64_t* empty = full + kStages;
  const bool pair = mode == 1;
  const uint32_t cr = pair ? cluster_rank() : 0;
  if (threadIdx.x == 0) {
    // Pair: the stage is free once this CTA's 128 consumer threads and the peer's 4 consumer
    // warps (one arrival each) released it: the peer's producer writes half of B into it.
    for (int i = 0; i < kStages; ++i) { mbar_init(&full[i], 1); mbar_init(&empty[i], pair ? 128 + 4 : 128); }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  if (pair) cluster_sync();  // the peer's barriers exist before any multicast or remote arrive
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bytes = mode == 2 ? kA + kB / 2 : kStage;
  // Pairs take tasks 2p and 2p + 1 (row tiles 2i and 2i + 1 of one column tile).
  const int first = pair ? static_cast<int>(blockIdx.x / 2) * 2 + static_cast<int>(cr) : static_cast<int>(blockIdx.x);
  const int step = gridDim.x;
  if (warp == 0) {
    int stage = 0; uint32_t phase = 0;
    for (int t = first; t < tasks; t += step) {
      const int rt = t % (T / 128), nt = t / (T / 128);
      for (int ks = 0; ks < H / 64; ++ks) {
        mbar_wait(&empty[stage], phase ^ 1);
        unsigned char* a = smem + stage * kStage;
        unsigned char* b = a + kA;
        if (lane == 0) {
          mbar_expect(&full[stage], bytes);
          tma2d(a, &m.a, &full[stage], ks * 64, rt * 128);
          if (mode == 0) {
            for (int q = 0; q < 4; ++q) tma2d(b + q * 8192, &m.b, &full[stage], (nt % 16) * 256 + q * 64, ks * 64);
          } else if (mode == 1) {
            for (int q = 2 * cr; q < 2 * cr + 2; ++q)
              tma2d_multicast(b + q * 8192, &m.b, &full[stage], (nt % 16) * 256 + q * 64, ks * 64, 0x3);
          } else {
            for (int q = 0; q < 2; ++q) tma2d(b + q * 8192, &m.b, &full[stage], (nt % 16) * 256 + q * 64, ks * 64);
          }
        }
        __syncwarp();
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
    }
  } else {
    int stage = 0; uint32_t phase = 0;
    for (int t = first; t < tasks; t += step) {
      for (int ks = 0; ks < H / 64; ++ks) {
        mbar_wait(&full[stage], phase);
        if (consume_ns) { uint64_t t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0)); uint64_t t1;
          do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1)); while (t1 - t0 < (uint64_t)consume_ns); }
        mbar_arrive(&empty[stage]);
        if (pair) {
          __syncwarp();
          if (lane == 0) mbar_arrive_cluster(&empty[stage], cr ^ 1u);
        }
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
    }
  }
  if (pair) cluster_sync();  // no CTA leaves while its peer may still write into it
}

int main() {
  __nv_bfloat16 *x, *w;
  CK(cudaMalloc(&x, size_t(T) * H * 2)); CK(cudaMalloc(&w, size_t(H) * N * 2));
  CK(cudaMemset(x, 0, size_t(T) * H * 2)); CK(cudaMemset(w, 0, size_t(H) * N * 2));
  Maps m{make_map(x, H, T, 64, 128), make_map(w, N, H, 64, 64)};
  const int smem = kStages * kStage + 2 * kStages * 8;
  CK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(probe, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaLaunchConfig_t cfg{};
  cfg.blockDim = dim3(160);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2; cluster.val.clusterDim.y = 1; cluster.val.clusterDim.z = 1;
  cfg.gridDim = dim3(sms & ~1);
  cfg.attrs = &cluster; cfg.numAttrs = 1;
  int clusters = 0;
  CK(cudaOccupancyMaxActiveClusters(&clusters, probe, &cfg));
  printf("%d SMs; resident 2-CTA clusters: %d\n", sms, clusters);
  const int tasks = (T / 128) * 16;
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const char* names[] = {"A + B, one CTA per SM", "A + B, 2-CTA multicast of B", "A + half of B (32 KB)"};
  for (int consume : {0, 600}) {
    for (int mode = 0; mode < 3; ++mode) {
      const int grid = mode == 1 ? 2 * clusters : sms;
      std::vector<float> ts;
      for (int rep = 0; rep < 7; ++rep) {
        cudaEventRecord(e0);
        if (mode == 1) {
          cfg.gridDim = dim3(grid);
          CK(cudaLaunchKernelEx(&cfg, probe, m, mode, tasks, consume));
        } else {
          probe<<<grid, 160, smem>>>(m, mode, tasks, consume);
        }
        cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
        float ms; cudaEventElapsedTime(&ms, e0, e1); ts.push_back(ms);
      }
      CK(cudaGetLastError());
      std::sort(ts.begin(), ts.end());
      const double stages_per_block = double(tasks) / grid * (H / 64);
      printf("consume %3d ns  %-30s grid %3d  %.3f ms  %.3f us/stage/SM  received %.1f GB/s/SM\n", consume, names[mode],
             grid, ts[3], ts[3] * 1e3 / stages_per_block,
             (mode == 2 ? kA + kB / 2 : kStage) * stages_per_block / (ts[3] * 1e-3) / 1e9);
    }
  }
  return 0;
}
