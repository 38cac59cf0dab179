// src/cuda/stages.cuh — the GPU stages of the modular path (one GPU, world size 1): router,
// slot assignment (deterministic, choice-major, with capacity), dispatch gather, activation,
// combine, balance losses, and their backward kernels. Each is a plain kernel with a launcher;
// the persistent kernel reuses their device functions. Semantics: fusedmoe/config.hpp.
// Tested against the CPU oracle by tests/gpu/test_gpu_layer.cpp.
#pragma once

#include "cuda/common.cuh"
#include "fusedmoe/config.hpp"

namespace fusedmoe::cuda {

struct RouterParams {
  int64_t num_tokens = 0, num_experts = 0, top_k = 1;
  GateKind gate = GateKind::kSoftmaxTopK;
  bool renormalize = true;          // already resolved for switch (off) / gshard (on)
  bool training = false;
  uint64_t seed = 0;
  int64_t token_offset = 0;
  const int32_t* forced_topk_idx = nullptr;  // [T, k] device
};

// Per-token routing state (device buffers, fp32).
struct RoutingBuffers {
  float* logits = nullptr;      // [T, E] after noise
  float* noise_pre = nullptr;   // [T, E] x·Wnᵀ (noisy gate in training)
  float* probs = nullptr;       // [T, E]
  float* lse = nullptr;         // [T]
  float* prob_sum = nullptr;    // [T]  Σ_e probs (normalises the sigmoid gate's balance term)
  float* renorm_sum = nullptr;  // [T]
  int32_t* selected = nullptr;  // [T, k] before GShard drop
  int32_t* idx = nullptr;       // [T, k]
  float* weight = nullptr;      // [T, k]
  // Slots
  int32_t* chunk_counts = nullptr;   // [k][chunks][E]
  int64_t* routed = nullptr;         // [E]
  int64_t* kept_count = nullptr;     // [E]
  int64_t* row_offsets = nullptr;    // [E + 1]
  int32_t* row_of = nullptr;         // [T, k] row in the expert-sorted buffer, -1 if not computed
  int32_t* row_source = nullptr;     // [rows_max] t·k + j of each row
  uint8_t* kept = nullptr;           // [T, k]
};

constexpr int kSlotChunk = 256;  // tokens per chunk of the slot assignment

// logits += ε ⊙ softplus(noise_pre) (noisy gate, training).
void add_gate_noise(const RouterParams& p, RoutingBuffers& r, cudaStream_t stream);
// router input with Switch jitter: out[t, h] = x[t, h] · U(1-eps, 1+eps) (fp32 out).
template <class T>
void jitter_router_input(const T* x, float* out, int64_t num_tokens, int64_t hidden, double eps, uint64_t seed,
                         int64_t token_offset, cudaStream_t stream);
// probs, lse, top-k, weights (one warp per token).
template <class T>
void gate_topk(const RouterParams& p, const T* selection_bias, RoutingBuffers& r, cudaStream_t stream);
// logits [T, E] (fp32) = x [T, H] · Wg [E, H]ᵀ + bias [E] (bias may be null) by the
// bandwidth-bound kernel of router_logits.cuh. Returns false (and launches nothing) where it does
// not apply: fp32 data, E > 32, H % 8 != 0 or operands not 16-B aligned.
template <class T>
bool router_logits(const T* x, const T* gate_weight, const T* bias, float* logits, int64_t num_tokens, int64_t hidden,
                   int64_t experts, cudaStream_t stream);
// Counts, capacity and rows. capacity = rows each expert accepts (T when dropless).
void assign_slots(const RouterParams& p, int64_t capacity, RoutingBuffers& r, cudaStream_t stream);

// dst[row] = (scale ? weight[t, j] : 1) · src[t] for every computed (t, j).
template <class T>
void gather_rows(const T* src, const RoutingBuffers& r, bool scale_by_weight, T* dst, int64_t num_tokens,
                 int64_t top_k, int64_t hidden, cudaStream_t stream);
// act[row, i] = activation(pre[row, :]) for rows < row_offsets[E] (rows_max bounds the grid).
template <class T>
void activation_forward(FfnKind kind, const T* pre, T* act, const int64_t* total_rows, int64_t rows_max,
                        int64_t ffn, cudaStream_t stream);
// dpre from dact (fp32) and pre.
template <class T>
void activation_backward(FfnKind kind, const T* pre, const float* dact, T* dpre, const int64_t* total_rows,
                         int64_t rows_max, int64_t ffn, cudaStream_t stream);
// y[t] = Σ_j w(t, j) · rows[row(t, j)] (+ dense[t] when given), fp32 accumulation.
// With unit_weights, w = 1 (the dx combine of backward).
template <class T>
void combine_rows(const T* rows, const RoutingBuffers& r, bool unit_weights, const float* dense, T* y,
                  int64_t num_tokens, int64_t top_k, int64_t hidden, cudaStream_t stream);
// What a forward hands back after the layer, from the routing buffers: every pointer optional
// (null = not wanted, or already in place).
template <class T>
struct ForwardTail {
  T* topk_weight = nullptr;          // [T, k] ← weight, in the layer's dtype
  int32_t* topk_idx = nullptr;       // [T, k] ← idx
  uint8_t* kept = nullptr;           // [T, k] ← kept
  int64_t* expert_counts = nullptr;  // [E] ← routed
  int64_t* kept_counts = nullptr;    // [E] ← kept_count
  double* aux = nullptr;             // balance losses (fp64)
  double* z = nullptr;
  T* aux_value = nullptr;            // the same in the layer's dtype (rounded through fp32, as torch does)
  T* z_value = nullptr;
};
// The tail in at most two launches (one per chunk of tokens; one more block for the losses'
// final sums), instead of a copy or conversion per output.
template <class T>
void forward_tail(const RouterParams& p, const RoutingBuffers& r, const ForwardTail<T>& out, cudaStream_t stream);
// dweight[t, j] = ⟨dy_t, out[row(t, j)]⟩.
template <class T>
void routing_weight_grad(const T* dy, const T* out_rows, const RoutingBuffers& r, float* dweight,
                         int64_t num_tokens, int64_t top_k, int64_t hidden, cudaStream_t stream);
// dlogits [T, E] from dweight, d_aux, d_z (and dnoise [T, E] = dlogits ⊙ ε ⊙ σ(noise_pre) if given).
// d_aux_device / d_z_device, when given, override d_aux / d_z (device doubles: no host sync).
void router_backward(const RouterParams& p, const RoutingBuffers& r, const float* dweight, double d_aux,
                     double d_z, const double* d_aux_device, const double* d_z_device, float* dlogits,
                     float* dnoise, cudaStream_t stream);
// out[g, n] = Σ rows of group g of src[row, n]  (bias gradients), written as T. offsets = nullptr
// means one group of rows [0, single_group_rows).
template <class T, class TS>
void group_column_sums(const TS* src, const int64_t* offsets, int64_t groups, int64_t n, T* out, cudaStream_t stream,
                       int64_t single_group_rows = 0);
// c[row, n] += bias[g(row), n] where g(row) is the group whose offsets range holds row (offsets =
// nullptr: one group, rows_max rows). Rows past offsets[groups] are left alone.
template <class TC, class TB>
void add_group_bias(TC* c, const TB* bias, const int64_t* offsets, int64_t groups, int64_t rows_max, int64_t n,
                    cudaStream_t stream);
// Elementwise helpers.
// out[t, h] += a[t, h] · jitter(t, h), the Switch router input's derivative (jitter recomputed).
void add_jittered(const float* a, float* out, int64_t num_tokens, int64_t hidden, double eps, uint64_t seed,
                  int64_t token_offset, cudaStream_t stream);
template <class T>
void convert(const float* src, T* dst, int64_t n, cudaStream_t stream);
// dst[i] = Σ_s partials[s · n + i] over `splits` partial results, in order (deterministic).
template <class T>
void sum_partials(const float* partials, int splits, T* dst, int64_t n, cudaStream_t stream);
template <class T>
void fill_nan(T* dst, int64_t n, cudaStream_t stream);
// offsets[0] = 0, offsets[1] = count: the row offsets of a single group, on the device.
void set_range(int64_t* offsets, int64_t count, cudaStream_t stream);
// offsets[g] = count * g / groups for g = 0 .. groups: `groups` near-equal row ranges.
void set_even_split(int64_t* offsets, int64_t groups, int64_t count, cudaStream_t stream);

}  // namespace fusedmoe::cuda
