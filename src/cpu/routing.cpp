// src/cpu/routing.cpp — see routing.hpp. Test: tests/cpp/test_cpu_layer.cpp.
#include "cpu/routing.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ffn_math.hpp"
#include "cpu/gemm.hpp"
#include "cpu/tensor_io.hpp"
#include "fusedmoe/layout.hpp"
#include "fusedmoe/noise.hpp"

namespace fusedmoe::cpu {

bool renormalises(const MoeConfig& c) {
  if (c.gate == GateKind::kSwitchTop1) return false;
  if (c.gate == GateKind::kGShardTop2) return true;
  return c.renormalize;
}

namespace {

bool is_sigmoid(const MoeConfig& c) { return c.gate == GateKind::kSigmoidTopK; }

// "Load-balancing probability" of the aux loss: p for softmax gates, s / Σ s for sigmoid.
void balance_probs(const MoeConfig& c, const double* probs, int64_t E, double* q) {
  double sum = 0.0;
  for (int64_t e = 0; e < E; ++e) sum += probs[e];
  for (int64_t e = 0; e < E; ++e) q[e] = is_sigmoid(c) ? probs[e] / sum : probs[e];
}

}  // namespace

Routing route(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args,
              const std::vector<int64_t>& tokens_per_rank) {
  Routing r;
  const int64_t T = args.x.shape[0], H = c.hidden_size, E = c.num_experts, k = c.top_k;
  const int W = c.world_size;
  r.num_tokens = T;
  r.num_experts = E;
  r.top_k = k;
  r.rank_begin.assign(static_cast<size_t>(W + 1), 0);
  for (int q = 0; q < W; ++q) r.rank_begin[q + 1] = r.rank_begin[q] + tokens_per_rank[q];

  // Router input (Switch jitter multiplies the router's copy of x only).
  r.router_input = to_doubles(args.x);
  if (c.gate == GateKind::kSwitchTop1 && args.training && c.jitter_eps > 0.0) {
    r.jitter.resize(static_cast<size_t>(T * H));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const double u = noise::uniform(args.seed, noise::kSwitchJitter,
                                        static_cast<uint64_t>(args.token_offset + t), static_cast<uint64_t>(h));
        const double j = 1.0 - c.jitter_eps + 2.0 * c.jitter_eps * u;
        r.jitter[static_cast<size_t>(t * H + h)] = j;
        r.router_input[static_cast<size_t>(t * H + h)] *= j;
      }
  }
  // Logits = router_input · Wgᵀ + bg, in fp64.
  const std::vector<double> wg = to_doubles(w.gate_weight);
  r.logits.assign(static_cast<size_t>(T * E), 0.0);
  gemm<double>({.m = T, .n = E, .k = H, .lda = H, .ldb = H, .ldc = E, .trans_b = true},
               r.router_input.data(), wg.data(), r.logits.data());
  if (w.gate_bias.defined())
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) r.logits[static_cast<size_t>(t * E + e)] += load(w.gate_bias, e);
  if (c.gate == GateKind::kNoisyTopK && args.training) {
    const std::vector<double> x = to_doubles(args.x), wn = to_doubles(w.noise_weight);
    r.noise_pre.assign(static_cast<size_t>(T * E), 0.0);
    gemm<double>({.m = T, .n = E, .k = H, .lda = H, .ldb = H, .ldc = E, .trans_b = true},
                 x.data(), wn.data(), r.noise_pre.data());
    r.noise_eps.resize(static_cast<size_t>(T * E));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        const size_t i = static_cast<size_t>(t * E + e);
        r.noise_eps[i] = noise::normal(args.seed, noise::kNoisyGate,
                                       static_cast<uint64_t>(args.token_offset + t), static_cast<uint64_t>(e));
        r.logits[i] += r.noise_eps[i] * softplus(r.noise_pre[i]);
      }
  }
  // Probabilities, logsumexp, top-k, weights.
  r.probs.resize(static_cast<size_t>(T * E));
  r.lse.resize(static_cast<size_t>(T));
  r.selected.assign(static_cast<size_t>(T * k), -1);
  r.idx.assign(static_cast<size_t>(T * k), -1);
  r.weight.assign(static_cast<size_t>(T * k), 0.0);
  r.renorm_sum.assign(static_cast<size_t>(T), 1.0);
  const bool renorm = renormalises(c);
  parallel_for(T, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::vector<double> score(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const double* l = &r.logits[static_cast<size_t>(t * E)];
      double* p = &r.probs[static_cast<size_t>(t * E)];
      double max_l = -std::numeric_limits<double>::infinity();
      for (int64_t e = 0; e < E; ++e) max_l = std::max(max_l, l[e]);
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - max_l);
      r.lse[static_cast<size_t>(t)] = max_l + std::log(sum);
      for (int64_t e = 0; e < E; ++e)
        p[e] = is_sigmoid(c) ? sigmoid(l[e]) : std::exp(l[e] - r.lse[static_cast<size_t>(t)]);
      int32_t* sel = &r.selected[static_cast<size_t>(t * k)];
      if (args.forced_topk_idx) {
        std::copy_n(args.forced_topk_idx + t * k, k, sel);
      } else {
        for (int64_t e = 0; e < E; ++e) {
          order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
          score[static_cast<size_t>(e)] =
              p[e] + (is_sigmoid(c) && w.selection_bias.defined() ? load(w.selection_bias, e) : 0.0);
        }
        // Largest score first; ties go to the lower expert index.
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b)] ||
                 (score[static_cast<size_t>(a)] == score[static_cast<size_t>(b)] && a < b);
        });
        std::copy_n(order.begin(), k, sel);
      }
      double denom = 0.0;
      for (int64_t j = 0; j < k; ++j) if (sel[j] >= 0) denom += p[sel[j]];
      if (renorm && denom > 0.0) r.renorm_sum[static_cast<size_t>(t)] = denom;
      const double scale = 1.0 / r.renorm_sum[static_cast<size_t>(t)];
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(t * k + j);
        if (sel[j] < 0) continue;
        r.idx[i] = sel[j];
        r.weight[i] = p[sel[j]] * scale;
      }
      if (c.gate == GateKind::kGShardTop2 && args.training && !args.forced_topk_idx) {
        const double u = noise::uniform(args.seed, noise::kGShardSecond,
                                        static_cast<uint64_t>(args.token_offset + t), 0);
        const size_t second = static_cast<size_t>(t * k + 1);
        if (2.0 * r.weight[second] < u) {
          r.idx[second] = -1;
          r.weight[second] = 0.0;
        }
      }
    }
  }, 16);

  // Counts and capacity slots: per source rank, choice-major, token order.
  r.routed_count.assign(static_cast<size_t>(E), 0);
  r.kept_count.assign(static_cast<size_t>(W * E), 0);
  r.kept.assign(static_cast<size_t>(T * k), 0);
  r.slot.assign(static_cast<size_t>(T * k), -1);
  std::vector<int64_t> next(static_cast<size_t>(E));
  for (int q = 0; q < W; ++q) {
    const int64_t capacity = c.capacity(tokens_per_rank[q]);
    std::fill(next.begin(), next.end(), 0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = r.rank_begin[q]; t < r.rank_begin[q + 1]; ++t) {
        const size_t i = static_cast<size_t>(t * k + j);
        const int32_t e = r.idx[i];
        if (e < 0) continue;
        r.routed_count[static_cast<size_t>(e)]++;
        const int64_t s = next[static_cast<size_t>(e)]++;
        if (s < capacity) {
          r.kept[i] = 1;
          r.slot[i] = s;
          r.kept_count[static_cast<size_t>(q * E + e)]++;
        }
      }
  }

  // Balance losses over all tokens of the call.
  if (T > 0) {
    std::vector<double> mean_q(static_cast<size_t>(E), 0.0), q(static_cast<size_t>(E));
    double z = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      balance_probs(c, &r.probs[static_cast<size_t>(t * E)], E, q.data());
      for (int64_t e = 0; e < E; ++e) mean_q[static_cast<size_t>(e)] += q[static_cast<size_t>(e)] / static_cast<double>(T);
      z += r.lse[static_cast<size_t>(t)] * r.lse[static_cast<size_t>(t)];
    }
    double aux = 0.0;
    for (int64_t e = 0; e < E; ++e)
      aux += static_cast<double>(r.routed_count[static_cast<size_t>(e)]) / static_cast<double>(T * k) *
             mean_q[static_cast<size_t>(e)];
    r.aux_loss = static_cast<double>(E) * aux;
    r.z_loss = z / static_cast<double>(T);
  }
  return r;
}

void route_backward(const MoeConfig& c, const MoeWeights& w, const Routing& r,
                    const std::vector<double>& dweight, double d_aux, double d_z,
                    std::vector<double>& dx_router, const MoeGrads& grads) {
  const int64_t T = r.num_tokens, E = r.num_experts, k = r.top_k, H = c.hidden_size;
  const bool renorm = renormalises(c);
  std::vector<double> dlogits(static_cast<size_t>(T * E), 0.0);
  parallel_for(T, [&](int64_t t0, int64_t t1) {
    std::vector<double> dp(static_cast<size_t>(E)), q(static_cast<size_t>(E)), dq(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const double* p = &r.probs[static_cast<size_t>(t * E)];
      std::fill(dp.begin(), dp.end(), 0.0);
      // Weights: w_j = p_{sel_j} / S (renormalised) or p_{sel_j}.
      const int32_t* sel = &r.selected[static_cast<size_t>(t * k)];
      const double S = r.renorm_sum[static_cast<size_t>(t)];
      double dot = 0.0;  // Σ_j dw_j · w_j over the weights that exist
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(t * k + j);
        if (r.idx[i] >= 0) dot += dweight[i] * r.weight[i];
      }
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(t * k + j);
        if (r.idx[i] >= 0) dp[static_cast<size_t>(r.idx[i])] += dweight[i] / S;
        if (renorm && sel[j] >= 0) dp[static_cast<size_t>(sel[j])] -= dot / S;
      }
      // Aux loss: d/dq_e = d_aux · E · f_e / T, then through q = p (softmax) or s / Σ s.
      if (d_aux != 0.0) {
        double sum = 0.0;
        for (int64_t e = 0; e < E; ++e) sum += p[e];
        for (int64_t e = 0; e < E; ++e)
          dq[static_cast<size_t>(e)] = d_aux * static_cast<double>(E) *
                                       (static_cast<double>(r.routed_count[static_cast<size_t>(e)]) /
                                        static_cast<double>(T * k)) / static_cast<double>(T);
        if (is_sigmoid(c)) {
          double qdq = 0.0;
          for (int64_t e = 0; e < E; ++e) qdq += p[e] / sum * dq[static_cast<size_t>(e)];
          for (int64_t e = 0; e < E; ++e) dp[static_cast<size_t>(e)] += (dq[static_cast<size_t>(e)] - qdq) / sum;
        } else {
          for (int64_t e = 0; e < E; ++e) dp[static_cast<size_t>(e)] += dq[static_cast<size_t>(e)];
        }
      }
      double* dl = &dlogits[static_cast<size_t>(t * E)];
      if (is_sigmoid(c)) {
        for (int64_t e = 0; e < E; ++e) dl[e] = dp[static_cast<size_t>(e)] * p[e] * (1.0 - p[e]);
      } else {
        double pdp = 0.0;
        for (int64_t e = 0; e < E; ++e) pdp += p[e] * dp[static_cast<size_t>(e)];
        for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dp[static_cast<size_t>(e)] - pdp);
      }
      // z-loss: mean_t lse_t² → 2 · lse_t · softmax(l_t) / T.
      if (d_z != 0.0) {
        const double lse = r.lse[static_cast<size_t>(t)];
        const double* l = &r.logits[static_cast<size_t>(t * E)];
        for (int64_t e = 0; e < E; ++e)
          dl[e] += d_z * 2.0 * lse * std::exp(l[e] - lse) / static_cast<double>(T);
      }
    }
  }, 16);

  // Logits = router_input · Wgᵀ + bg (+ ε ⊙ softplus(x · Wnᵀ)).
  const std::vector<double> wg = to_doubles(w.gate_weight);
  if (grads.d_gate_weight.defined()) {
    std::vector<double> dwg(static_cast<size_t>(E * H));
    gemm<double>({.m = E, .n = H, .k = T, .lda = E, .ldb = H, .ldc = H, .trans_a = true},
                 dlogits.data(), r.router_input.data(), dwg.data());
    store_all(grads.d_gate_weight, dwg);
  }
  if (grads.d_gate_bias.defined()) {
    std::vector<double> dbg(static_cast<size_t>(E), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) dbg[static_cast<size_t>(e)] += dlogits[static_cast<size_t>(t * E + e)];
    store_all(grads.d_gate_bias, dbg);
  }
  std::vector<double> dxr(static_cast<size_t>(T * H));
  gemm<double>({.m = T, .n = H, .k = E, .lda = E, .ldb = H, .ldc = H},
               dlogits.data(), wg.data(), dxr.data());
  for (size_t i = 0; i < dxr.size(); ++i) dx_router[i] += r.jitter.empty() ? dxr[i] : dxr[i] * r.jitter[i];

  if (c.gate == GateKind::kNoisyTopK) {
    std::vector<double> dwn(static_cast<size_t>(E * H), 0.0);
    if (!r.noise_pre.empty()) {
      std::vector<double> dnoise(static_cast<size_t>(T * E));
      for (size_t i = 0; i < dnoise.size(); ++i)
        dnoise[i] = dlogits[i] * r.noise_eps[i] * sigmoid(r.noise_pre[i]);
      const std::vector<double> x = r.jitter.empty() ? r.router_input : std::vector<double>{};
      const std::vector<double> wn = to_doubles(w.noise_weight);
      gemm<double>({.m = E, .n = H, .k = T, .lda = E, .ldb = H, .ldc = H, .trans_a = true},
                   dnoise.data(), x.data(), dwn.data());
      gemm<double>({.m = T, .n = H, .k = E, .lda = E, .ldb = H, .ldc = H},
                   dnoise.data(), wn.data(), dxr.data());
      for (size_t i = 0; i < dxr.size(); ++i) dx_router[i] += dxr[i];
    }
    store_all(grads.d_noise_weight, dwn);
  }
}

std::vector<int64_t> dispatch_psum(const MoeConfig& c, const Routing& r, int source) {
  const int64_t E = c.num_experts;
  std::vector<int64_t> psum_before(static_cast<size_t>(E), 0);
  for (int owner = 0; owner < c.world_size; ++owner) {
    int64_t running = 0;
    for (int64_t local = 0; local < c.num_local_experts(owner); ++local) {
      const int64_t e = c.global_expert(owner, local);
      psum_before[static_cast<size_t>(e)] = running;
      running += WorkspaceLayout::segment_span(r.kept_count[static_cast<size_t>(source * E + e)]);
    }
  }
  return psum_before;
}

void write_routing_outputs(const MoeConfig& c, const Routing& r, const ForwardOutputs& out) {
  const int64_t n = r.num_tokens * r.top_k, E = c.num_experts;
  if (out.topk_idx) std::copy(r.idx.begin(), r.idx.end(), out.topk_idx);
  if (out.kept) std::copy(r.kept.begin(), r.kept.end(), out.kept);
  if (out.topk_weight.defined())
    for (int64_t i = 0; i < n; ++i) store(out.topk_weight, i, r.weight[static_cast<size_t>(i)]);
  if (out.expert_counts) std::copy(r.routed_count.begin(), r.routed_count.end(), out.expert_counts);
  if (out.kept_counts)
    for (int64_t e = 0; e < E; ++e) {
      int64_t sum = 0;
      for (int q = 0; q < c.world_size; ++q) sum += r.kept_count[static_cast<size_t>(q * E + e)];
      out.kept_counts[e] = sum;
    }
  if (out.aux_loss) *out.aux_loss = r.aux_loss;
  if (out.z_loss) *out.z_loss = r.z_loss;
}

}  // namespace fusedmoe::cpu
