// src/cuda/stages.cu — kernels of the GPU stages; see stages.cuh.
#include <algorithm>
#include <cfloat>
#include <climits>

#include "cuda/router_device.cuh"
#include "cuda/router_logits.cuh"
#include "cuda/stages.cuh"
#include "gemm/epilogue_math.cuh"
#include "gemm/grouped_gemm.hpp"
#include "fusedmoe/noise.hpp"

namespace fusedmoe::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float act_f(FfnKind kind, float x) {
  return epilogue_math::activation_value(epilogue_of(kind), x);
}
__device__ __forceinline__ float act_grad_f(FfnKind kind, float x) {
  return epilogue_math::activation_grad(epilogue_of(kind), x);
}
__device__ __forceinline__ bool is_gated(FfnKind kind) { return kind == FfnKind::kSwiGlu || kind == FfnKind::kGeGlu; }

// ------------------------------------------------------------------------------- router --

__global__ void add_gate_noise_kernel(RouterParams p, RoutingBuffers r) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.num_tokens * p.num_experts) return;
  const int64_t t = i / p.num_experts, e = i % p.num_experts;
  const double eps = noise::normal(p.seed, noise::kNoisyGate, static_cast<uint64_t>(p.token_offset + t),
                                   static_cast<uint64_t>(e));
  const float pre = r.noise_pre[i];
  const float softplus = pre > 30.f ? pre : log1pf(expf(pre));
  r.logits[i] += static_cast<float>(eps) * softplus;
}

template <class T>
__global__ void jitter_kernel(const T* x, float* out, int64_t n, int64_t hidden, double eps, uint64_t seed,
                              int64_t token_offset) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t t = i / hidden, h = i % hidden;
  const double u = noise::uniform(seed, noise::kSwitchJitter, static_cast<uint64_t>(token_offset + t), static_cast<uint64_t>(h));
  out[i] = to_f32(x[i]) * static_cast<float>(1.0 - eps + 2.0 * eps * u);
}

__global__ void add_jittered_kernel(const float* a, float* out, int64_t n, int64_t hidden, double eps, uint64_t seed,
                                    int64_t token_offset) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t t = i / hidden, h = i % hidden;
  const double u = noise::uniform(seed, noise::kSwitchJitter, static_cast<uint64_t>(token_offset + t), static_cast<uint64_t>(h));
  out[i] += a[i] * static_cast<float>(1.0 - eps + 2.0 * eps * u);
}

template <class T>
__global__ void gate_topk_kernel(RouterParams p, const T* selection_bias, RoutingBuffers r) {
  extern __shared__ float score_smem[];
  const int warp = threadIdx.x / 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;
  gate_topk_token<T>(p, selection_bias, r, t, score_smem + warp * p.num_experts);
}

// --------------------------------------------------------------------------------- slots --

__global__ void slot_count_kernel(RouterParams p, RoutingBuffers r, int64_t chunks) {
  extern __shared__ int32_t local_counts[];
  const int64_t chunk = blockIdx.x, j = blockIdx.y, E = p.num_experts;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) local_counts[e] = 0;
  __syncthreads();
  const int64_t t = chunk * kSlotChunk + threadIdx.x;
  if (t < p.num_tokens) {
    const int32_t e = r.idx[t * p.top_k + j];
    if (e >= 0) atomicAdd(&local_counts[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) r.chunk_counts[(j * chunks + chunk) * E + e] = local_counts[e];
}

// Per expert: exclusive prefix over (choice j, chunk) — choice-major order.
// Exclusive prefix of v over the warp's lanes (in lane order); *total = the warp's sum.
__device__ __forceinline__ int64_t warp_exclusive_scan(int64_t v, int64_t* total) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  int64_t inclusive = v;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  *total = __shfl_sync(0xffffffffu, inclusive, 31);
  return inclusive - v;
}

// One warp per expert: the exclusive scan of its k x chunks counts, in (j, chunk) order, 32
// cells per step. (One thread per expert walking all cells in turn took 13 µs on paper-64.)
__global__ void slot_scan_kernel(RouterParams p, RoutingBuffers r, int64_t chunks, int64_t capacity) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (e >= p.num_experts) return;  // warp-uniform
  const int64_t cells = p.top_k * chunks;
  int64_t running = 0;
  for (int64_t base = 0; base < cells; base += 32) {
    const int64_t i = base + lane;
    int32_t* cell = i < cells ? &r.chunk_counts[i * p.num_experts + e] : nullptr;
    const int64_t count = cell ? *cell : 0;
    int64_t total;
    const int64_t prefix = warp_exclusive_scan(count, &total);
    if (cell) *cell = static_cast<int32_t>(running + prefix);
    running += total;
  }
  if (lane == 0) {
    r.routed[e] = running;
    r.kept_count[e] = running < capacity ? running : capacity;
  }
}

// One warp: row_offsets = the exclusive scan of kept_count, 32 experts per step.
__global__ void row_offsets_kernel(RoutingBuffers r, int64_t num_experts) {
  if (blockIdx.x != 0 || threadIdx.x >= 32) return;
  int64_t running = 0;
  for (int64_t base = 0; base < num_experts; base += 32) {
    const int64_t e = base + threadIdx.x;
    const int64_t kept = e < num_experts ? r.kept_count[e] : 0;
    int64_t total;
    const int64_t prefix = warp_exclusive_scan(kept, &total);
    if (e < num_experts) r.row_offsets[e] = running + prefix;
    running += total;
  }
  if (threadIdx.x == 0) r.row_offsets[num_experts] = running;
}

// One warp per (chunk, j): ranks within the chunk in token order via __match_any_sync.
__global__ void slot_rank_kernel(RouterParams p, RoutingBuffers r, int64_t chunks, int64_t capacity) {
  extern __shared__ int32_t running[];
  const int64_t chunk = blockIdx.x, j = blockIdx.y, E = p.num_experts, k = p.top_k;
  const int lane = threadIdx.x;
  for (int64_t e = lane; e < E; e += 32) running[e] = 0;
  __syncwarp();
  for (int group = 0; group < kSlotChunk / 32; ++group) {
    const int64_t t = chunk * kSlotChunk + group * 32 + lane;
    const int32_t e = t < p.num_tokens ? r.idx[t * k + j] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int32_t base = e >= 0 ? running[e] : 0;
    __syncwarp();
    if (e >= 0 && rank == 0) running[e] = base + __popc(peers);
    __syncwarp();
    if (t >= p.num_tokens) continue;
    const int64_t i = t * k + j;
    if (e < 0) {
      r.row_of[i] = -1;
      r.kept[i] = 0;
      continue;
    }
    const int64_t pos = r.chunk_counts[(j * chunks + chunk) * E + e] + base + rank;
    const bool kept = pos < capacity;
    r.kept[i] = kept ? 1 : 0;
    const int64_t row = kept ? r.row_offsets[e] + pos : -1;
    r.row_of[i] = static_cast<int32_t>(row);
    if (kept) r.row_source[row] = static_cast<int32_t>(i);
  }
}

// ---------------------------------------------------------------------- rows and combine --

// 16-byte vectors of T (8 bf16/fp16 or 4 fp32) when rows are 16-B aligned.
template <class T>
constexpr int kVec = 16 / sizeof(T);

template <class T>
__global__ void gather_rows_kernel(const T* src, RoutingBuffers r, bool scale_by_weight, T* dst, int64_t n_pairs,
                                   int64_t top_k, int64_t hidden, bool vector) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (i >= n_pairs) return;
  const int32_t row = r.row_of[i];
  if (row < 0) return;
  const int64_t t = i / top_k;
  const float w = scale_by_weight ? r.weight[i] : 1.f;
  const T* in = src + t * hidden;
  T* out = dst + static_cast<int64_t>(row) * hidden;
  if (vector) {
    // kUnroll vectors per lane in flight before their stores (one at a time left the row copies
    // at ~2.7 TB/s on an H100).
    constexpr int kUnroll = 4;
    constexpr int64_t kStep = 32 * kVec<T>;
    for (int64_t h0 = lane * kVec<T>; h0 < hidden; h0 += kUnroll * kStep) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (h0 + u * kStep < hidden) v[u] = *reinterpret_cast<const uint4*>(in + h0 + u * kStep);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (h0 + u * kStep >= hidden) break;
        if (scale_by_weight) {
          T* e = reinterpret_cast<T*>(&v[u]);
#pragma unroll
          for (int j = 0; j < kVec<T>; ++j) e[j] = from_f32<T>(w * to_f32(e[j]));
        }
        *reinterpret_cast<uint4*>(out + h0 + u * kStep) = v[u];
      }
    }
    return;
  }
  for (int64_t h = lane; h < hidden; h += 32)
    out[h] = scale_by_weight ? from_f32<T>(w * to_f32(in[h])) : in[h];
}

template <class T>
__global__ void activation_forward_kernel(FfnKind kind, const T* pre, T* act, const int64_t* total_rows, int64_t rows_max,
                                          int64_t ffn) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t rows = total_rows ? *total_rows : rows_max;
  if (i >= rows * ffn) return;
  const int64_t row = i / ffn, c = i % ffn;
  const bool gated = is_gated(kind);
  const int64_t width = gated ? 2 * ffn : ffn;
  const float g = to_f32(pre[row * width + c]);
  const float a = act_f(kind, g);
  act[i] = from_f32<T>(gated ? a * to_f32(pre[row * width + ffn + c]) : a);
}

template <class T>
__global__ void activation_backward_kernel(FfnKind kind, const T* pre, const float* dact, T* dpre,
                                           const int64_t* total_rows, int64_t rows_max, int64_t ffn) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t rows = total_rows ? *total_rows : rows_max;
  if (i >= rows * ffn) return;
  const int64_t row = i / ffn, c = i % ffn;
  const bool gated = is_gated(kind);
  const int64_t width = gated ? 2 * ffn : ffn;
  const float g = to_f32(pre[row * width + c]);
  const float da = dact[i];
  if (gated) {
    const float up = to_f32(pre[row * width + ffn + c]);
    dpre[row * width + c] = from_f32<T>(da * up * act_grad_f(kind, g));
    dpre[row * width + ffn + c] = from_f32<T>(da * act_f(kind, g));
  } else {
    dpre[row * width + c] = from_f32<T>(da * act_grad_f(kind, g));
  }
}

template <class T>
__global__ void combine_rows_kernel(const T* rows, RoutingBuffers r, bool unit_weights, const float* dense, T* y,
                                    int64_t num_tokens, int64_t top_k, int64_t hidden, bool vector) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= num_tokens) return;
  // Column slice blockIdx.y of gridDim.y (few tokens, e.g. decode: one warp per token alone
  // left most SMs idle), in whole 32-lane steps.
  const int64_t step = 32 * (vector ? kVec<T> : 1);
  const int64_t slice = ceil_div(ceil_div(hidden, step), static_cast<int64_t>(gridDim.y)) * step;
  const int64_t h_begin = blockIdx.y * slice, h_end = h_begin + slice < hidden ? h_begin + slice : hidden;
  if (vector) {
    // Rows and weights of this token once; then 16-B vectors, fp32 accumulation, fixed j order.
    int32_t row_j[32];
    float w_j[32];
    for (int64_t j = 0; j < top_k; ++j) {
      row_j[j] = r.row_of[t * top_k + j];
      w_j[j] = unit_weights ? 1.f : r.weight[t * top_k + j];
    }
    // Two vectors per lane per step, so that 2k loads are in flight before the stores.
    constexpr int kUnroll = 2;
    constexpr int64_t kStep = 32 * kVec<T>;
    for (int64_t h0 = h_begin + lane * kVec<T>; h0 < h_end; h0 += kUnroll * kStep) {
      float acc[kUnroll][kVec<T>];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int e = 0; e < kVec<T>; ++e)
          acc[u][e] = dense && h0 + u * kStep < h_end ? dense[t * hidden + h0 + u * kStep + e] : 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        if (row_j[j] < 0) continue;
        const T* src = rows + static_cast<int64_t>(row_j[j]) * hidden;
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (h0 + u * kStep < h_end) v[u] = *reinterpret_cast<const uint4*>(src + h0 + u * kStep);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (h0 + u * kStep >= h_end) break;
          const T* e = reinterpret_cast<const T*>(&v[u]);
#pragma unroll
          for (int q = 0; q < kVec<T>; ++q) acc[u][q] = fmaf(w_j[j], to_f32(e[q]), acc[u][q]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (h0 + u * kStep >= h_end) break;
        uint4 out;
        T* o = reinterpret_cast<T*>(&out);
#pragma unroll
        for (int q = 0; q < kVec<T>; ++q) o[q] = from_f32<T>(acc[u][q]);
        *reinterpret_cast<uint4*>(y + t * hidden + h0 + u * kStep) = out;
      }
    }
    return;
  }
  for (int64_t h = h_begin + lane; h < h_end; h += 32) {
    float acc = dense ? dense[t * hidden + h] : 0.f;
    for (int64_t j = 0; j < top_k; ++j) {  // fixed order over j: deterministic
      const int32_t row = r.row_of[t * top_k + j];
      if (row < 0) continue;
      const float w = unit_weights ? 1.f : r.weight[t * top_k + j];
      acc = fmaf(w, to_f32(rows[static_cast<int64_t>(row) * hidden + h]), acc);
    }
    y[t * hidden + h] = from_f32<T>(acc);
  }
}

template <class T>
__global__ void routing_weight_grad_kernel(const T* dy, const T* out_rows, RoutingBuffers r, float* dweight,
                                           int64_t n_pairs, int64_t top_k, int64_t hidden) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (i >= n_pairs) return;
  const int32_t row = r.row_of[i];
  float acc = 0.f;
  if (row >= 0) {
    const int64_t t = i / top_k;
    for (int64_t h = lane; h < hidden; h += 32)
      acc += to_f32(dy[t * hidden + h]) * to_f32(out_rows[static_cast<int64_t>(row) * hidden + h]);
  }
  acc = warp_sum(acc);
  if (lane == 0) dweight[i] = acc;
}

// ---------------------------------------------------------------------------- losses --

// Balance losses in two deterministic passes. Pass 1: one block per chunk of kBalanceChunk tokens
// writes its partial column sums of q (all E columns) and of lse². Pass 2: one block sums the
// chunks and writes aux and z. In both, thread (e, j) of the G = blockDim / E groups (1 when
// E > blockDim) sums the rows j, j + G, ... of column e, and the G sums are added in the order
// of j: every sum has a fixed order (the result does not depend on scheduling). (One thread per
// column summing all rows in turn left 3/4 of the block idle at E = 64: 12.7 µs per pass on
// paper-64, 25 µs of its forward.)
constexpr int kBalanceChunk = 128;
constexpr int kBalanceThreads = 256;

// Fixed-order sum over the block of one double per thread (blockDim.x = kBalanceThreads);
// every thread gets the total.
__device__ double block_sum_fixed(double v, double* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kBalanceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();
  return total;
}

// Column sums of a [rows, E] table (value(row, e)), rows split over the block's column groups.
template <class Value>
__device__ void column_sums_fixed(int64_t rows, int64_t E, Value value, double* scratch, double* out) {
  const int64_t groups = E >= kBalanceThreads ? 1 : kBalanceThreads / E;
  for (int64_t e0 = 0; e0 < E; e0 += kBalanceThreads / groups) {
    const int64_t e = e0 + threadIdx.x % (kBalanceThreads / groups), j = threadIdx.x / (kBalanceThreads / groups);
    double acc = 0;
    if (e < E && j < groups)
      for (int64_t row = j; row < rows; row += groups) acc += value(row, e);
    scratch[threadIdx.x] = acc;
    __syncthreads();
    if (j == 0 && e < E) {
      double total = 0;
      for (int64_t g = 0; g < groups; ++g) total += scratch[g * (kBalanceThreads / groups) + threadIdx.x];
      out[e] = total;
    }
    __syncthreads();
  }
}

// The forward's tail, one block per chunk of kBalanceChunk tokens: the chunk's top-k weights in
// the layer's dtype and the routing tables the caller wants copied, then (with losses) the
// chunk's partial sums for balance_final_kernel. Block 0 also copies the per-expert counts.
template <class T>
__global__ void __launch_bounds__(kBalanceThreads) forward_tail_kernel(RouterParams p, RoutingBuffers r,
                                                                       ForwardTail<T> out, double* partial_q,
                                                                       double* partial_z) {
  __shared__ double scratch[kBalanceThreads];
  const int64_t chunk = blockIdx.x, E = p.num_experts, k = p.top_k;
  const int64_t t0 = chunk * kBalanceChunk, t1 = min(p.num_tokens, t0 + kBalanceChunk);
  for (int64_t i = t0 * k + threadIdx.x; i < t1 * k; i += kBalanceThreads) {
    if (out.topk_weight) out.topk_weight[i] = from_f32<T>(r.weight[i]);
    if (out.topk_idx) out.topk_idx[i] = r.idx[i];
    if (out.kept) out.kept[i] = r.kept[i];
  }
  if (chunk == 0)
    for (int64_t e = threadIdx.x; e < E; e += kBalanceThreads) {
      if (out.expert_counts) out.expert_counts[e] = r.routed[e];
      if (out.kept_counts) out.kept_counts[e] = r.kept_count[e];
    }
  if (!partial_q || t0 >= t1) return;  // block-uniform
  const bool sigmoid_gate = p.gate == GateKind::kSigmoidTopK;
  column_sums_fixed(t1 - t0, E, [&](int64_t row, int64_t e) {
    const int64_t t = t0 + row;
    const double prob = r.probs[t * E + e];
    return sigmoid_gate ? prob / r.prob_sum[t] : prob;
  }, scratch, partial_q + chunk * E);
  double z = 0;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kBalanceThreads) z += static_cast<double>(r.lse[t]) * r.lse[t];
  z = block_sum_fixed(z, scratch);
  if (threadIdx.x == 0) partial_z[chunk] = z;
}

template <class T>
__global__ void __launch_bounds__(kBalanceThreads) balance_final_kernel(RouterParams p, RoutingBuffers r,
                                                                        const double* partial_q,
                                                                        const double* partial_z, int64_t chunks,
                                                                        ForwardTail<T> out) {
  __shared__ double scratch[kBalanceThreads];
  extern __shared__ double columns[];  // [E]
  const int64_t E = p.num_experts;
  column_sums_fixed(chunks, E, [&](int64_t c, int64_t e) { return partial_q[c * E + e]; }, scratch, columns);
  __syncthreads();
  double acc = 0;
  for (int64_t e = threadIdx.x; e < E; e += kBalanceThreads) {
    const double mean_q = columns[e] / static_cast<double>(p.num_tokens);
    acc += static_cast<double>(r.routed[e]) / static_cast<double>(p.num_tokens * p.top_k) * mean_q;
  }
  acc = block_sum_fixed(acc, scratch);
  double zsum = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kBalanceThreads) zsum += partial_z[c];
  zsum = block_sum_fixed(zsum, scratch);
  if (threadIdx.x != 0) return;
  const double aux = p.num_tokens > 0 ? static_cast<double>(E) * acc : 0.0;
  const double z = p.num_tokens > 0 ? zsum / static_cast<double>(p.num_tokens) : 0.0;
  if (out.aux) *out.aux = aux;
  if (out.z) *out.z = z;
  // As torch converts a double: through fp32.
  if (out.aux_value) *out.aux_value = from_f32<T>(static_cast<float>(aux));
  if (out.z_value) *out.z_value = from_f32<T>(static_cast<float>(z));
}

// -------------------------------------------------------------------- router backward --

__global__ void router_backward_kernel(RouterParams p, RoutingBuffers r, const float* dweight, double d_aux_value,
                                       double d_z_value, const double* d_aux_device, const double* d_z_device,
                                       float* dlogits, float* dnoise) {
  const double d_aux = d_aux_device ? *d_aux_device : d_aux_value;
  const double d_z = d_z_device ? *d_z_device : d_z_value;
  extern __shared__ float dp_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;
  const int64_t E = p.num_experts, k = p.top_k, T = p.num_tokens;
  float* dp = dp_smem + warp * E;
  const float* prob = r.probs + t * E;
  for (int64_t e = lane; e < E; e += 32) dp[e] = 0.f;
  __syncwarp();
  if (lane == 0) {
    const float S = r.renorm_sum[t];
    float dot = 0.f;
    for (int64_t j = 0; j < k; ++j) if (r.idx[t * k + j] >= 0) dot += dweight[t * k + j] * r.weight[t * k + j];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = r.idx[t * k + j];
      if (e >= 0) dp[e] += dweight[t * k + j] / S;
      const int32_t s = r.selected[t * k + j];
      if (p.renormalize && s >= 0) dp[s] -= dot / S;
    }
  }
  __syncwarp();
  const bool sigmoid_gate = p.gate == GateKind::kSigmoidTopK;
  if (d_aux != 0.0) {
    const float sum = r.prob_sum[t];
    float qdq = 0.f;
    for (int64_t e = lane; e < E; e += 32) {
      const float dq = static_cast<float>(d_aux * static_cast<double>(E) * static_cast<double>(r.routed[e]) /
                                          static_cast<double>(T * k) / static_cast<double>(T));
      qdq += prob[e] / sum * dq;
    }
    qdq = sigmoid_gate ? warp_sum(qdq) : 0.f;
    for (int64_t e = lane; e < E; e += 32) {
      const float dq = static_cast<float>(d_aux * static_cast<double>(E) * static_cast<double>(r.routed[e]) /
                                          static_cast<double>(T * k) / static_cast<double>(T));
      dp[e] += sigmoid_gate ? (dq - qdq) / sum : dq;
    }
  }
  float pdp = 0.f;
  for (int64_t e = lane; e < E; e += 32) pdp += prob[e] * dp[e];
  pdp = warp_sum(pdp);
  const float lse = r.lse[t];
  for (int64_t e = lane; e < E; e += 32) {
    float dl = sigmoid_gate ? dp[e] * prob[e] * (1.f - prob[e]) : prob[e] * (dp[e] - pdp);
    if (d_z != 0.0) dl += static_cast<float>(d_z * 2.0 * lse * exp(static_cast<double>(r.logits[t * E + e] - lse)) / static_cast<double>(T));
    dlogits[t * E + e] = dl;
    if (dnoise) {
      const double eps = noise::normal(p.seed, noise::kNoisyGate, static_cast<uint64_t>(p.token_offset + t), static_cast<uint64_t>(e));
      dnoise[t * E + e] = dl * static_cast<float>(eps) * epilogue_math::sigmoid_precise(r.noise_pre[t * E + e]);
    }
  }
}

template <class T, class TS>
__global__ void group_column_sums_kernel(const TS* src, const int64_t* offsets, int64_t n, T* out, int64_t single_rows) {
  const int64_t g = blockIdx.y;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= n) return;
  const int64_t begin = offsets ? offsets[g] : 0, end = offsets ? offsets[g + 1] : single_rows;
  float acc = 0.f;
  for (int64_t row = begin; row < end; ++row) acc += to_f32(src[row * n + c]);
  out[g * n + c] = from_f32<T>(acc);
}

template <class TC, class TB>
__global__ void add_group_bias_kernel(TC* c, const TB* bias, const int64_t* offsets, int64_t groups, int64_t rows_max,
                                      int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t rows = offsets ? offsets[groups] : rows_max;
  if (i >= rows * n) return;
  const int64_t row = i / n, col = i % n;
  int64_t g = 0;
  if (offsets) {  // last group whose start is <= row (binary search over groups + 1 offsets)
    int64_t lo = 0, hi = groups - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (offsets[mid] <= row) lo = mid; else hi = mid - 1;
    }
    g = lo;
  }
  c[i] = from_f32<TC>(to_f32(c[i]) + to_f32(bias[g * n + col]));
}

template <class T>
__global__ void convert_kernel(const float* src, T* dst, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = from_f32<T>(src[i]);
}

template <class T>
__global__ void sum_partials_kernel(const float* partials, int splits, T* dst, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float acc = 0.f;
  for (int s = 0; s < splits; ++s) acc += partials[s * n + i];
  dst[i] = from_f32<T>(acc);
}

template <class T>
__global__ void fill_nan_kernel(T* dst, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = from_f32<T>(NAN);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__global__ void set_even_split_kernel(int64_t* offsets, int64_t groups, int64_t count) {
  for (int64_t g = threadIdx.x; g <= groups; g += blockDim.x) offsets[g] = count * g / groups;
}

unsigned blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned>(ceil_div(n > 0 ? n : 1, per_block)); }

}  // namespace

// ------------------------------------------------------------------------------ launchers --

void add_gate_noise(const RouterParams& p, RoutingBuffers& r, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  add_gate_noise_kernel<<<blocks_for(p.num_tokens * p.num_experts, 256), 256, 0, stream>>>(p, r);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void jitter_router_input(const T* x, float* out, int64_t num_tokens, int64_t hidden, double eps, uint64_t seed,
                         int64_t token_offset, cudaStream_t stream) {
  if (num_tokens == 0) return;
  jitter_kernel<T><<<blocks_for(num_tokens * hidden, 256), 256, 0, stream>>>(x, out, num_tokens * hidden, hidden, eps,
                                                                            seed, token_offset);
  FUSEDMOE_LAUNCH_CHECK();
}

void add_jittered(const float* a, float* out, int64_t num_tokens, int64_t hidden, double eps, uint64_t seed,
                  int64_t token_offset, cudaStream_t stream) {
  if (num_tokens == 0) return;
  add_jittered_kernel<<<blocks_for(num_tokens * hidden, 256), 256, 0, stream>>>(a, out, num_tokens * hidden, hidden,
                                                                               eps, seed, token_offset);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void gate_topk(const RouterParams& p, const T* selection_bias, RoutingBuffers& r, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  FUSEDMOE_CHECK(p.top_k <= 32, "top_k = " << p.top_k << ": the CUDA router supports top_k <= 32");
  const size_t smem = sizeof(float) * kWarpsPerBlock * static_cast<size_t>(p.num_experts);
  FUSEDMOE_CHECK(smem <= 48 * 1024, "num_experts = " << p.num_experts << ": the CUDA router supports up to 1536 experts");
  gate_topk_kernel<T><<<blocks_for(p.num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, smem, stream>>>(p, selection_bias, r);
  FUSEDMOE_LAUNCH_CHECK();
}

void assign_slots(const RouterParams& p, int64_t capacity, RoutingBuffers& r, cudaStream_t stream) {
  const int64_t chunks = ceil_div(p.num_tokens, kSlotChunk);
  const size_t smem = sizeof(int32_t) * static_cast<size_t>(p.num_experts);
  if (chunks > 0) {
    slot_count_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(p.top_k)), kSlotChunk, smem, stream>>>(p, r, chunks);
    FUSEDMOE_LAUNCH_CHECK();
  }
  slot_scan_kernel<<<blocks_for(p.num_experts, 4), 4 * 32, 0, stream>>>(p, r, chunks, capacity);
  FUSEDMOE_LAUNCH_CHECK();
  row_offsets_kernel<<<1, 32, 0, stream>>>(r, p.num_experts);
  FUSEDMOE_LAUNCH_CHECK();
  if (chunks > 0) {
    slot_rank_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(p.top_k)), 32, smem, stream>>>(p, r, chunks, capacity);
    FUSEDMOE_LAUNCH_CHECK();
  }
}

template <class T>
void gather_rows(const T* src, const RoutingBuffers& r, bool scale_by_weight, T* dst, int64_t num_tokens,
                 int64_t top_k, int64_t hidden, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const bool vector = hidden % kVec<T> == 0 && aligned16(src) && aligned16(dst);
  gather_rows_kernel<T><<<blocks_for(num_tokens * top_k, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
      src, r, scale_by_weight, dst, num_tokens * top_k, top_k, hidden, vector);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void activation_forward(FfnKind kind, const T* pre, T* act, const int64_t* total_rows, int64_t rows_max, int64_t ffn,
                        cudaStream_t stream) {
  if (rows_max == 0) return;
  activation_forward_kernel<T><<<blocks_for(rows_max * ffn, 256), 256, 0, stream>>>(kind, pre, act, total_rows, rows_max, ffn);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void activation_backward(FfnKind kind, const T* pre, const float* dact, T* dpre, const int64_t* total_rows,
                         int64_t rows_max, int64_t ffn, cudaStream_t stream) {
  if (rows_max == 0) return;
  activation_backward_kernel<T><<<blocks_for(rows_max * ffn, 256), 256, 0, stream>>>(kind, pre, dact, dpre, total_rows,
                                                                                    rows_max, ffn);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void combine_rows(const T* rows, const RoutingBuffers& r, bool unit_weights, const float* dense, T* y,
                  int64_t num_tokens, int64_t top_k, int64_t hidden, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const bool vector = hidden % kVec<T> == 0 && top_k <= 32 && aligned16(rows) && aligned16(y) && (!dense || aligned16(dense));
  // Enough warps for the whole GPU: with few tokens, split each token's columns over blockIdx.y.
  const int64_t steps = ceil_div(hidden, int64_t{32} * (vector ? kVec<T> : 1));
  const int64_t slices = std::clamp<int64_t>(ceil_div(int64_t{4096}, num_tokens), 1, std::min<int64_t>(steps, 64));
  const dim3 grid(blocks_for(num_tokens, kWarpsPerBlock), static_cast<unsigned>(slices));
  combine_rows_kernel<T><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(rows, r, unit_weights, dense, y, num_tokens,
                                                                    top_k, hidden, vector);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void forward_tail(const RouterParams& p, const RoutingBuffers& r, const ForwardTail<T>& out, cudaStream_t stream) {
  const bool losses = out.aux || out.z || out.aux_value || out.z_value;
  const bool copies = out.topk_weight || out.topk_idx || out.kept || out.expert_counts || out.kept_counts;
  if (!losses && !copies) return;
  Scratch scratch(stream);
  const int64_t chunks = ceil_div(p.num_tokens, kBalanceChunk);
  double* partial_q = losses ? scratch.alloc<double>(chunks * p.num_experts) : nullptr;
  double* partial_z = losses ? scratch.alloc<double>(chunks) : nullptr;
  if (chunks > 0 || (copies && p.num_experts > 0)) {
    forward_tail_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(chunks, 1)), kBalanceThreads, 0, stream>>>(
        p, r, out, partial_q, partial_z);
    FUSEDMOE_LAUNCH_CHECK();
  }
  if (!losses) return;
  balance_final_kernel<T><<<1, kBalanceThreads, sizeof(double) * static_cast<size_t>(std::max<int64_t>(p.num_experts, 1)),
                            stream>>>(p, r, partial_q, partial_z, chunks, out);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void routing_weight_grad(const T* dy, const T* out_rows, const RoutingBuffers& r, float* dweight, int64_t num_tokens,
                         int64_t top_k, int64_t hidden, cudaStream_t stream) {
  if (num_tokens == 0) return;
  routing_weight_grad_kernel<T><<<blocks_for(num_tokens * top_k, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
      dy, out_rows, r, dweight, num_tokens * top_k, top_k, hidden);
  FUSEDMOE_LAUNCH_CHECK();
}

void router_backward(const RouterParams& p, const RoutingBuffers& r, const float* dweight, double d_aux, double d_z,
                     const double* d_aux_device, const double* d_z_device, float* dlogits, float* dnoise,
                     cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  const size_t smem = sizeof(float) * kWarpsPerBlock * static_cast<size_t>(p.num_experts);
  router_backward_kernel<<<blocks_for(p.num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, smem, stream>>>(
      p, r, dweight, d_aux, d_z, d_aux_device, d_z_device, dlogits, dnoise);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T, class TS>
void group_column_sums(const TS* src, const int64_t* offsets, int64_t groups, int64_t n, T* out, cudaStream_t stream,
                       int64_t single_group_rows) {
  if (groups == 0 || n == 0) return;
  group_column_sums_kernel<T, TS><<<dim3(blocks_for(n, 256), static_cast<unsigned>(groups)), 256, 0, stream>>>(
      src, offsets, n, out, single_group_rows);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class TC, class TB>
void add_group_bias(TC* c, const TB* bias, const int64_t* offsets, int64_t groups, int64_t rows_max, int64_t n,
                    cudaStream_t stream) {
  if (rows_max == 0 || n == 0) return;
  add_group_bias_kernel<TC, TB><<<blocks_for(rows_max * n, 256), 256, 0, stream>>>(c, bias, offsets, groups, rows_max, n);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void convert(const float* src, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  convert_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(src, dst, n);
  FUSEDMOE_LAUNCH_CHECK();
}

void set_even_split(int64_t* offsets, int64_t groups, int64_t count, cudaStream_t stream) {
  set_even_split_kernel<<<1, 128, 0, stream>>>(offsets, groups, count);
  FUSEDMOE_LAUNCH_CHECK();
}

void set_range(int64_t* offsets, int64_t count, cudaStream_t stream) { set_even_split(offsets, 1, count, stream); }

template <class T>
void sum_partials(const float* partials, int splits, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  sum_partials_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(partials, splits, dst, n);
  FUSEDMOE_LAUNCH_CHECK();
}

template <class T>
void fill_nan(T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  fill_nan_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(dst, n);
  FUSEDMOE_LAUNCH_CHECK();
}

// The launcher lives here, in the library, so that the kernel it opts in to more shared memory
// is the one it launches (a copy compiled into another module is another kernel).
template <class T>
bool router_logits(const T* x, const T* gate_weight, const T* bias, float* logits, int64_t num_tokens,
                   int64_t hidden, int64_t experts, cudaStream_t stream) {
  namespace d = router_logits_detail;
  if constexpr (!std::is_same_v<T, __nv_bfloat16> && !std::is_same_v<T, __half>) {
    return false;
  } else {
    auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
    if (experts <= 0 || experts > 32 || hidden % 8 != 0 || !aligned(x) || !aligned(gate_weight))
      return false;
    if (num_tokens == 0) return true;
    const unsigned row_blocks = static_cast<unsigned>(ceil_div(num_tokens, d::kRows));
    FUSEDMOE_CHECK(row_blocks <= 65535u, "router_logits: " << num_tokens << " tokens: too many row blocks");
    auto launch = [&](auto tile) {
      constexpr int kETile = decltype(tile)::value;
      auto kernel = d::router_logits_kernel<T, kETile>;
      constexpr size_t smem = d::smem_bytes<kETile>();
      if constexpr (smem > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<dim3(1, row_blocks), d::kThreads, smem, stream>>>(x, gate_weight, bias, logits, num_tokens,
                                                                 hidden, experts);
      FUSEDMOE_LAUNCH_CHECK();
    };
    if (experts <= 8)
      launch(std::integral_constant<int, 8>{});
    else if (experts <= 16)
      launch(std::integral_constant<int, 16>{});
    else
      launch(std::integral_constant<int, 32>{});
    return true;
  }
}

template bool router_logits<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                   cudaStream_t);
template bool router_logits<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*,
                                           int64_t, int64_t, int64_t, cudaStream_t);
template bool router_logits<__half>(const __half*, const __half*, const __half*, float*, int64_t, int64_t, int64_t,
                                    cudaStream_t);

#define FUSEDMOE_INSTANTIATE_STAGES(T)                                                                          \
  template void jitter_router_input<T>(const T*, float*, int64_t, int64_t, double, uint64_t, int64_t, cudaStream_t); \
  template void gate_topk<T>(const RouterParams&, const T*, RoutingBuffers&, cudaStream_t);                    \
  template void gather_rows<T>(const T*, const RoutingBuffers&, bool, T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template void activation_forward<T>(FfnKind, const T*, T*, const int64_t*, int64_t, int64_t, cudaStream_t); \
  template void activation_backward<T>(FfnKind, const T*, const float*, T*, const int64_t*, int64_t, int64_t, cudaStream_t); \
  template void combine_rows<T>(const T*, const RoutingBuffers&, bool, const float*, T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template void routing_weight_grad<T>(const T*, const T*, const RoutingBuffers&, float*, int64_t, int64_t, int64_t, cudaStream_t); \
  template void group_column_sums<T, T>(const T*, const int64_t*, int64_t, int64_t, T*, cudaStream_t, int64_t); \
  template void add_group_bias<T, T>(T*, const T*, const int64_t*, int64_t, int64_t, int64_t, cudaStream_t); \
  template void convert<T>(const float*, T*, int64_t, cudaStream_t);                                          \
  template void forward_tail<T>(const RouterParams&, const RoutingBuffers&, const ForwardTail<T>&, cudaStream_t); \
  template void fill_nan<T>(T*, int64_t, cudaStream_t);                                       \
  template void sum_partials<T>(const float*, int, T*, int64_t, cudaStream_t);

FUSEDMOE_INSTANTIATE_STAGES(float)
FUSEDMOE_INSTANTIATE_STAGES(__nv_bfloat16)
FUSEDMOE_INSTANTIATE_STAGES(__half)

#define FUSEDMOE_INSTANTIATE_MIXED(T)                                                                           \
  template void group_column_sums<T, float>(const float*, const int64_t*, int64_t, int64_t, T*, cudaStream_t, int64_t); \
  template void add_group_bias<float, T>(float*, const T*, const int64_t*, int64_t, int64_t, int64_t, cudaStream_t);

FUSEDMOE_INSTANTIATE_MIXED(__nv_bfloat16)
FUSEDMOE_INSTANTIATE_MIXED(__half)

}  // namespace fusedmoe::cuda
