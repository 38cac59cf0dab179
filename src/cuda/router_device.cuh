// src/cuda/router_device.cuh — the per-token router body shared by the modular gate kernel
// (stages.cu) and the fused persistent kernel (fused/): from one token's logits row, the
// probabilities (softmax, or sigmoid for the sigmoid gate), the top-k choice (forced when
// forced_topk_idx is given; selection bias added to the scores of the sigmoid gate; ties to the
// lower expert index), the renormalised weights and GShard's random second-choice drop in
// training. Run by a group of kWidth lanes per token (a full warp by default; 8 or 16 lanes let a
// warp handle 4 or 2 tokens at once — every lane of the warp must call it, a group without a
// token with active = false and any valid t); `score` is E floats of the group's shared memory.
#pragma once

#include <cfloat>
#include <climits>

#include "cuda/stages.cuh"
#include "fusedmoe/noise.hpp"

namespace fusedmoe::cuda {

__device__ __forceinline__ float router_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Latency matters here (a warp handles many tokens one after the other): the logits row is read
// from global memory once into `score`, every later pass works on shared memory, and choice j
// lives in lane j (its weight, index and GShard drop are written by that lane). The
// renormalising sum adds the chosen probabilities in choice order, as a sequential loop would.
template <class T, int kWidth = 32>
__device__ inline void gate_topk_token(const RouterParams& p, const T* selection_bias, const RoutingBuffers& r,
                                       int64_t t, float* score, bool active = true) {
  static_assert(kWidth == 8 || kWidth == 16 || kWidth == 32, "a group is 8, 16 or 32 lanes");
  const int lane = threadIdx.x % kWidth;
  auto group_max = [](float v) {
#pragma unroll
    for (int offset = kWidth / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  };
  auto group_sum = [](float v) {
#pragma unroll
    for (int offset = kWidth / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  };
  const int64_t E = p.num_experts, k = p.top_k;
  const float* l = r.logits + t * E;
  const bool sigmoid_gate = p.gate == GateKind::kSigmoidTopK;
  float m = -FLT_MAX;
  for (int64_t e = lane; e < E; e += kWidth) {
    const float v = l[e];
    score[e] = v;
    m = fmaxf(m, v);
  }
  m = group_max(m);
  float s = 0.f;
  for (int64_t e = lane; e < E; e += kWidth) s += expf(score[e] - m);
  s = group_sum(s);
  const float lse = m + logf(s);
  auto prob_of = [&](float logit) { return sigmoid_gate ? router_sigmoid(logit) : expf(logit - lse); };
  float psum = 0.f;
  for (int64_t e = lane; e < E; e += kWidth) {
    const float prob = prob_of(score[e]);
    if (active) r.probs[t * E + e] = prob;
    psum += prob;
    score[e] = prob + (sigmoid_gate && selection_bias ? to_f32(selection_bias[e]) : 0.f);
  }
  psum = group_sum(psum);
  __syncwarp();
  int32_t mine = -1;  // lane j < k: choice j
#pragma unroll 1
  for (int64_t j = 0; j < k; ++j) {
    int32_t pick;
    if (p.forced_topk_idx) {
      pick = p.forced_topk_idx[t * k + j];
    } else {
      float best = -FLT_MAX;
      int32_t best_idx = INT_MAX;
      for (int64_t e = lane; e < E; e += kWidth) {
        const float v = score[e];
        if (v > best || (v == best && e < best_idx)) { best = v; best_idx = static_cast<int32_t>(e); }
      }
      for (int offset = kWidth / 2; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, offset);
        const int32_t oi = __shfl_xor_sync(0xffffffffu, best_idx, offset);
        if (ov > best || (ov == best && oi < best_idx)) { best = ov; best_idx = oi; }
      }
      pick = best_idx;
      __syncwarp();
      if (lane == 0) score[pick] = -INFINITY;
      __syncwarp();
    }
    if (lane == j) mine = pick;
  }
  // The chosen probabilities, recomputed from the logits exactly as above (one load per lane).
  const float my_prob = mine >= 0 ? prob_of(l[mine]) : 0.f;
  float denom = 0.f;
  for (int64_t j = 0; j < k; ++j) denom += __shfl_sync(0xffffffffu, my_prob, static_cast<int>(j), kWidth);
  const float norm = (p.renormalize && denom > 0.f) ? denom : 1.f;
  if (!active) return;
  if (lane == 0) {
    r.renorm_sum[t] = norm;
    r.lse[t] = lse;
    r.prob_sum[t] = psum;
  }
  if (lane < k) {
    float weight = mine >= 0 ? my_prob / norm : 0.f;
    int32_t idx = mine;
    r.selected[t * k + lane] = mine;
    if (lane == 1 && p.gate == GateKind::kGShardTop2 && p.training && !p.forced_topk_idx) {
      const double u = noise::uniform(p.seed, noise::kGShardSecond, static_cast<uint64_t>(p.token_offset + t), 0);
      if (2.0 * static_cast<double>(weight) < u) {
        idx = -1;
        weight = 0.f;
      }
    }
    r.idx[t * k + lane] = idx;
    r.weight[t * k + lane] = weight;
  }
}


}  // namespace fusedmoe::cuda
