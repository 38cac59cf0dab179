// src/cpu/naive_backend.cpp — the deliberately naive reference: loops over tokens, experts and
// elements in fp64, no layout, no slots, no batching, written independently of the CPU backend
// (only the scalar activations of ffn_math.hpp are shared). Its router derivative uses the full
// softmax/sigmoid Jacobian rather than the CPU backend's closed forms. Cross-checks the CPU
// backend in tests/cpp/test_differential.cpp and in `fusedmoe run`.
#include <cmath>
#include <limits>
#include <vector>

#include "core/backend.hpp"
#include "cpu/ffn_math.hpp"
#include "cpu/tensor_io.hpp"
#include "fusedmoe/noise.hpp"

namespace fusedmoe {
namespace {

using cpu::load;
using Vec = std::vector<double>;

struct TokenRoute {
  Vec router_x;       // [H] input the router saw
  Vec jitter;         // [H] its multiplicative jitter (1 without)
  Vec logits, probs;  // [E]
  Vec noise_pre;      // [E] (noisy, training)
  Vec eps;            // [E]
  double lse = 0;
  std::vector<int> chosen;  // [k] before GShard drop
  std::vector<int> used;    // [k] after drop (-1 = none)
  Vec weight;               // [k]
  std::vector<bool> kept;   // [k]
};

class Naive {
 public:
  Naive(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& a, const std::vector<int64_t>& tpr)
      : c(c), w(w), a(a), tpr(tpr) {
    T = a.x.shape[0];
    H = c.hidden_size; E = c.num_experts; K = c.top_k; I = c.ffn_size; N1 = c.ffn_in_width();
    routes.resize(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) route_token(t);
    apply_capacity();
  }

  double x(int64_t t, int64_t h) const { return load(a.x, t * H + h); }
  bool renorm() const {
    if (c.gate == GateKind::kSwitchTop1) return false;
    if (c.gate == GateKind::kGShardTop2) return true;
    return c.renormalize;
  }

  void route_token(int64_t t) {
    TokenRoute& r = routes[static_cast<size_t>(t)];
    const uint64_t gt = static_cast<uint64_t>(a.token_offset + t);
    r.router_x.assign(static_cast<size_t>(H), 0);
    r.jitter.assign(static_cast<size_t>(H), 1.0);
    for (int64_t h = 0; h < H; ++h) {
      if (c.gate == GateKind::kSwitchTop1 && a.training && c.jitter_eps > 0)
        r.jitter[static_cast<size_t>(h)] =
            1.0 - c.jitter_eps + 2.0 * c.jitter_eps * noise::uniform(a.seed, noise::kSwitchJitter, gt, static_cast<uint64_t>(h));
      r.router_x[static_cast<size_t>(h)] = x(t, h) * r.jitter[static_cast<size_t>(h)];
    }
    r.logits.assign(static_cast<size_t>(E), 0);
    r.noise_pre.assign(static_cast<size_t>(E), 0);
    r.eps.assign(static_cast<size_t>(E), 0);
    for (int64_t e = 0; e < E; ++e) {
      double l = w.gate_bias.defined() ? load(w.gate_bias, e) : 0.0;
      for (int64_t h = 0; h < H; ++h) l += r.router_x[static_cast<size_t>(h)] * load(w.gate_weight, e * H + h);
      if (c.gate == GateKind::kNoisyTopK && a.training) {
        double n = 0;
        for (int64_t h = 0; h < H; ++h) n += x(t, h) * load(w.noise_weight, e * H + h);
        r.noise_pre[static_cast<size_t>(e)] = n;
        r.eps[static_cast<size_t>(e)] = noise::normal(a.seed, noise::kNoisyGate, gt, static_cast<uint64_t>(e));
        l += r.eps[static_cast<size_t>(e)] * cpu::softplus(n);
      }
      r.logits[static_cast<size_t>(e)] = l;
    }
    double m = -std::numeric_limits<double>::infinity();
    for (double l : r.logits) m = std::max(m, l);
    double s = 0;
    for (double l : r.logits) s += std::exp(l - m);
    r.lse = m + std::log(s);
    r.probs.assign(static_cast<size_t>(E), 0);
    for (int64_t e = 0; e < E; ++e)
      r.probs[static_cast<size_t>(e)] = c.gate == GateKind::kSigmoidTopK ? 1.0 / (1.0 + std::exp(-r.logits[static_cast<size_t>(e)]))
                                                                         : std::exp(r.logits[static_cast<size_t>(e)] - r.lse);
    // Top-k by repeated arg-max (first index wins ties).
    r.chosen.assign(static_cast<size_t>(K), -1);
    std::vector<bool> taken(static_cast<size_t>(E), false);
    for (int64_t j = 0; j < K; ++j) {
      if (a.forced_topk_idx) {
        r.chosen[static_cast<size_t>(j)] = a.forced_topk_idx[t * K + j];
        continue;
      }
      int best = -1;
      double best_score = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (taken[static_cast<size_t>(e)]) continue;
        double score = r.probs[static_cast<size_t>(e)];
        if (c.gate == GateKind::kSigmoidTopK && w.selection_bias.defined()) score += load(w.selection_bias, e);
        if (best < 0 || score > best_score) { best = static_cast<int>(e); best_score = score; }
      }
      taken[static_cast<size_t>(best)] = true;
      r.chosen[static_cast<size_t>(j)] = best;
    }
    double denom = 0;
    for (int e : r.chosen) if (e >= 0) denom += r.probs[static_cast<size_t>(e)];
    r.used = r.chosen;
    r.weight.assign(static_cast<size_t>(K), 0);
    for (int64_t j = 0; j < K; ++j) {
      int e = r.chosen[static_cast<size_t>(j)];
      if (e < 0) continue;
      r.weight[static_cast<size_t>(j)] = r.probs[static_cast<size_t>(e)] / (renorm() && denom > 0 ? denom : 1.0);
    }
    if (c.gate == GateKind::kGShardTop2 && a.training && !a.forced_topk_idx &&
        2.0 * r.weight[1] < noise::uniform(a.seed, noise::kGShardSecond, gt, 0)) {
      r.used[1] = -1;
      r.weight[1] = 0;
    }
  }

  void apply_capacity() {
    int64_t begin = 0;
    for (int q = 0; q < c.world_size; ++q) {
      const int64_t end = begin + tpr[static_cast<size_t>(q)];
      const int64_t cap = c.dropless() ? std::numeric_limits<int64_t>::max()
                                       : static_cast<int64_t>(std::ceil(c.capacity_factor * static_cast<double>(tpr[static_cast<size_t>(q)] * K) / static_cast<double>(E)));
      std::vector<int64_t> taken(static_cast<size_t>(E), 0);
      for (int64_t j = 0; j < K; ++j)
        for (int64_t t = begin; t < end; ++t) {
          TokenRoute& r = routes[static_cast<size_t>(t)];
          if (r.kept.empty()) r.kept.assign(static_cast<size_t>(K), false);
          int e = r.used[static_cast<size_t>(j)];
          if (e < 0) continue;
          r.kept[static_cast<size_t>(j)] = taken[static_cast<size_t>(e)]++ < cap;
        }
      begin = end;
    }
  }

  // One expert on one row: pre [N1], act [I], out [H].
  void expert_forward(const TensorView& w1, const TensorView& b1, const TensorView& w2, const TensorView& b2,
                      int64_t index, int64_t ffn, const Vec& in, Vec& pre, Vec& act, Vec& out) const {
    const int64_t n1 = c.gated() ? 2 * ffn : ffn;
    pre.assign(static_cast<size_t>(n1), 0);
    for (int64_t n = 0; n < n1; ++n) {
      double s = b1.defined() ? load(b1, index * n1 + n) : 0.0;
      for (int64_t h = 0; h < H; ++h) s += in[static_cast<size_t>(h)] * load(w1, (index * H + h) * n1 + n);
      pre[static_cast<size_t>(n)] = s;
    }
    act.assign(static_cast<size_t>(ffn), 0);
    for (int64_t i = 0; i < ffn; ++i) {
      double g = cpu::activation(c.ffn, pre[static_cast<size_t>(i)]);
      act[static_cast<size_t>(i)] = c.gated() ? g * pre[static_cast<size_t>(ffn + i)] : g;
    }
    out.assign(static_cast<size_t>(H), 0);
    for (int64_t h = 0; h < H; ++h) {
      double s = b2.defined() ? load(b2, index * H + h) : 0.0;
      for (int64_t i = 0; i < ffn; ++i) s += act[static_cast<size_t>(i)] * load(w2, (index * ffn + i) * H + h);
      out[static_cast<size_t>(h)] = s;
    }
  }

  Vec token_row(int64_t t) const {
    Vec v(static_cast<size_t>(H));
    for (int64_t h = 0; h < H; ++h) v[static_cast<size_t>(h)] = x(t, h);
    return v;
  }

  const MoeConfig& c;
  const MoeWeights& w;
  const ForwardArgs& a;
  const std::vector<int64_t>& tpr;
  int64_t T = 0, H = 0, E = 0, K = 0, I = 0, N1 = 0;
  std::vector<TokenRoute> routes;
};

void accumulate_expert_backward(const Naive& n, const TensorView& w1, const TensorView& w2, int64_t index, int64_t ffn,
                                const Vec& in, const Vec& pre, const Vec& act, const Vec& g, Vec& dw1, Vec& db1,
                                Vec& dw2, Vec& db2, Vec& dx) {
  const int64_t H = n.H, n1 = n.c.gated() ? 2 * ffn : ffn;
  Vec dact(static_cast<size_t>(ffn), 0);
  for (int64_t i = 0; i < ffn; ++i)
    for (int64_t h = 0; h < H; ++h) {
      dact[static_cast<size_t>(i)] += g[static_cast<size_t>(h)] * load(w2, (index * ffn + i) * H + h);
      dw2[static_cast<size_t>((index * ffn + i) * H + h)] += act[static_cast<size_t>(i)] * g[static_cast<size_t>(h)];
    }
  if (!db2.empty())
    for (int64_t h = 0; h < H; ++h) db2[static_cast<size_t>(index * H + h)] += g[static_cast<size_t>(h)];
  Vec dpre(static_cast<size_t>(n1), 0);
  for (int64_t i = 0; i < ffn; ++i) {
    const double p = pre[static_cast<size_t>(i)];
    if (n.c.gated()) {
      dpre[static_cast<size_t>(i)] = dact[static_cast<size_t>(i)] * pre[static_cast<size_t>(ffn + i)] * cpu::activation_grad(n.c.ffn, p);
      dpre[static_cast<size_t>(ffn + i)] = dact[static_cast<size_t>(i)] * cpu::activation(n.c.ffn, p);
    } else {
      dpre[static_cast<size_t>(i)] = dact[static_cast<size_t>(i)] * cpu::activation_grad(n.c.ffn, p);
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t m = 0; m < n1; ++m) {
      dw1[static_cast<size_t>((index * H + h) * n1 + m)] += in[static_cast<size_t>(h)] * dpre[static_cast<size_t>(m)];
      dx[static_cast<size_t>(h)] += dpre[static_cast<size_t>(m)] * load(w1, (index * H + h) * n1 + m);
    }
  if (!db1.empty())
    for (int64_t m = 0; m < n1; ++m) db1[static_cast<size_t>(index * n1 + m)] += dpre[static_cast<size_t>(m)];
}

class NaiveBackend final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& a,
               const std::vector<int64_t>& tpr, const ForwardOutputs& o) override {
    Naive n(c, w, a, tpr);
    Vec pre, act, out;
    std::vector<int64_t> routed(static_cast<size_t>(n.E), 0), kept(static_cast<size_t>(n.E), 0);
    for (int64_t t = 0; t < n.T; ++t) {
      const TokenRoute& r = n.routes[static_cast<size_t>(t)];
      const Vec in = n.token_row(t);
      Vec y(static_cast<size_t>(n.H), 0);
      for (int64_t j = 0; j < n.K; ++j) {
        const int e = r.used[static_cast<size_t>(j)];
        if (o.topk_idx) o.topk_idx[t * n.K + j] = e;
        if (o.topk_weight.defined()) cpu::store(o.topk_weight, t * n.K + j, r.weight[static_cast<size_t>(j)]);
        if (o.kept) o.kept[t * n.K + j] = r.kept[static_cast<size_t>(j)] ? 1 : 0;
        if (e < 0) continue;
        routed[static_cast<size_t>(e)]++;
        if (!r.kept[static_cast<size_t>(j)]) continue;
        kept[static_cast<size_t>(e)]++;
        n.expert_forward(w.w1, w.b1, w.w2, w.b2, e, n.I, in, pre, act, out);
        for (int64_t h = 0; h < n.H; ++h) y[static_cast<size_t>(h)] += r.weight[static_cast<size_t>(j)] * out[static_cast<size_t>(h)];
      }
      for (int64_t s = 0; s < c.num_shared_experts; ++s) {
        n.expert_forward(w.shared_w1, w.shared_b1, w.shared_w2, w.shared_b2, s, c.shared_size(), in, pre, act, out);
        for (int64_t h = 0; h < n.H; ++h) y[static_cast<size_t>(h)] += out[static_cast<size_t>(h)];
      }
      for (int64_t h = 0; h < n.H; ++h) cpu::store(o.y, t * n.H + h, y[static_cast<size_t>(h)]);
    }
    if (o.expert_counts) for (int64_t e = 0; e < n.E; ++e) o.expert_counts[e] = routed[static_cast<size_t>(e)];
    if (o.kept_counts) for (int64_t e = 0; e < n.E; ++e) o.kept_counts[e] = kept[static_cast<size_t>(e)];
    double aux = 0, z = 0;
    losses(n, routed, aux, z);
    if (o.aux_loss) *o.aux_loss = aux;
    if (o.z_loss) *o.z_loss = z;
  }

  // aux = E Σ_e (routed_e / (T k)) · mean_t q_te ; z = mean_t lse_t²
  static void losses(const Naive& n, const std::vector<int64_t>& routed, double& aux, double& z) {
    aux = 0; z = 0;
    if (n.T == 0) return;
    for (int64_t e = 0; e < n.E; ++e) {
      double mean_q = 0;
      for (int64_t t = 0; t < n.T; ++t) mean_q += q_of(n, t, e);
      aux += static_cast<double>(routed[static_cast<size_t>(e)]) / static_cast<double>(n.T * n.K) * mean_q / static_cast<double>(n.T);
    }
    aux *= static_cast<double>(n.E);
    for (int64_t t = 0; t < n.T; ++t) z += n.routes[static_cast<size_t>(t)].lse * n.routes[static_cast<size_t>(t)].lse;
    z /= static_cast<double>(n.T);
  }
  static double q_of(const Naive& n, int64_t t, int64_t e) {
    const TokenRoute& r = n.routes[static_cast<size_t>(t)];
    if (n.c.gate != GateKind::kSigmoidTopK) return r.probs[static_cast<size_t>(e)];
    double s = 0;
    for (double p : r.probs) s += p;
    return r.probs[static_cast<size_t>(e)] / s;
  }

  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& ba,
                const std::vector<int64_t>& tpr, const MoeGrads& g) override {
    const ForwardArgs& a = ba.forward;
    Naive n(c, w, a, tpr);
    const int64_t H = n.H, E = n.E, K = n.K, I = n.I, N1 = n.N1, S = c.num_shared_experts;
    const int64_t Is = c.shared_size(), Ns1 = c.shared_in_width();
    Vec dx(static_cast<size_t>(n.T * H), 0), dwg(static_cast<size_t>(E * H), 0), dbg(static_cast<size_t>(E), 0);
    Vec dwn(static_cast<size_t>(E * H), 0);
    Vec dw1(static_cast<size_t>(E * H * N1), 0), dw2(static_cast<size_t>(E * I * H), 0);
    Vec db1(c.expert_bias ? static_cast<size_t>(E * N1) : 0, 0), db2(c.expert_bias ? static_cast<size_t>(E * H) : 0, 0);
    Vec sdw1(static_cast<size_t>(S * H * Ns1), 0), sdw2(static_cast<size_t>(S * Is * H), 0);
    Vec sdb1(c.expert_bias ? static_cast<size_t>(S * Ns1) : 0, 0), sdb2(c.expert_bias ? static_cast<size_t>(S * H) : 0, 0);
    std::vector<int64_t> routed(static_cast<size_t>(E), 0);
    for (const auto& r : n.routes)
      for (int e : r.used) if (e >= 0) routed[static_cast<size_t>(e)]++;
    Vec pre, act, out, g_row(static_cast<size_t>(H)), dxe(static_cast<size_t>(H));
    for (int64_t t = 0; t < n.T; ++t) {
      const TokenRoute& r = n.routes[static_cast<size_t>(t)];
      const Vec in = n.token_row(t);
      Vec dy(static_cast<size_t>(H));
      for (int64_t h = 0; h < H; ++h) dy[static_cast<size_t>(h)] = load(ba.dy, t * H + h);
      Vec dweight(static_cast<size_t>(K), 0);
      for (int64_t j = 0; j < K; ++j) {
        const int e = r.used[static_cast<size_t>(j)];
        if (e < 0 || !r.kept[static_cast<size_t>(j)]) continue;
        n.expert_forward(w.w1, w.b1, w.w2, w.b2, e, I, in, pre, act, out);
        for (int64_t h = 0; h < H; ++h) {
          dweight[static_cast<size_t>(j)] += dy[static_cast<size_t>(h)] * out[static_cast<size_t>(h)];
          g_row[static_cast<size_t>(h)] = r.weight[static_cast<size_t>(j)] * dy[static_cast<size_t>(h)];
        }
        std::fill(dxe.begin(), dxe.end(), 0.0);
        accumulate_expert_backward(n, w.w1, w.w2, e, I, in, pre, act, g_row, dw1, db1, dw2, db2, dxe);
        for (int64_t h = 0; h < H; ++h) dx[static_cast<size_t>(t * H + h)] += dxe[static_cast<size_t>(h)];
      }
      for (int64_t s = 0; s < S; ++s) {
        n.expert_forward(w.shared_w1, w.shared_b1, w.shared_w2, w.shared_b2, s, Is, in, pre, act, out);
        std::fill(dxe.begin(), dxe.end(), 0.0);
        accumulate_expert_backward(n, w.shared_w1, w.shared_w2, s, Is, in, pre, act, dy, sdw1, sdb1, sdw2, sdb2, dxe);
        for (int64_t h = 0; h < H; ++h) dx[static_cast<size_t>(t * H + h)] += dxe[static_cast<size_t>(h)];
      }
      // Router: dL/dprob_e from the weights (explicitly, through the renormalisation quotient).
      Vec dprob(static_cast<size_t>(E), 0);
      double denom = 0;
      for (int e : r.chosen) if (e >= 0) denom += r.probs[static_cast<size_t>(e)];
      const bool rn = n.renorm() && denom > 0;
      for (int64_t j = 0; j < K; ++j) {
        const int e = r.used[static_cast<size_t>(j)];
        if (e < 0) continue;
        for (int64_t m = 0; m < K; ++m) {  // ∂w_j/∂p_{chosen_m}
          const int em = r.chosen[static_cast<size_t>(m)];
          if (em < 0) continue;
          double dwdp = 0;
          if (!rn) dwdp = (em == e) ? 1.0 : 0.0;
          else dwdp = ((em == e) ? 1.0 / denom : 0.0) - r.probs[static_cast<size_t>(e)] / (denom * denom);
          dprob[static_cast<size_t>(em)] += dweight[static_cast<size_t>(j)] * dwdp;
        }
      }
      // Aux loss through q (explicit Jacobian for the sigmoid normalisation).
      if (ba.d_aux != 0) {
        double ssum = 0;
        for (double p : r.probs) ssum += p;
        for (int64_t e = 0; e < E; ++e) {
          const double dq = ba.d_aux * static_cast<double>(E) * static_cast<double>(routed[static_cast<size_t>(e)]) /
                            static_cast<double>(n.T * K) / static_cast<double>(n.T);
          for (int64_t m = 0; m < E; ++m) {
            double dqdp;
            if (c.gate != GateKind::kSigmoidTopK) dqdp = (m == e) ? 1.0 : 0.0;
            else dqdp = ((m == e) ? 1.0 / ssum : 0.0) - r.probs[static_cast<size_t>(e)] / (ssum * ssum);
            dprob[static_cast<size_t>(m)] += dq * dqdp;
          }
        }
      }
      // Probabilities to logits (full Jacobian), plus the z-loss.
      Vec dlogit(static_cast<size_t>(E), 0);
      for (int64_t m = 0; m < E; ++m) {
        for (int64_t e = 0; e < E; ++e) {
          double dpdl;
          const double pe = r.probs[static_cast<size_t>(e)];
          if (c.gate == GateKind::kSigmoidTopK) dpdl = (m == e) ? pe * (1 - pe) : 0.0;
          else dpdl = pe * (((m == e) ? 1.0 : 0.0) - r.probs[static_cast<size_t>(m)]);
          dlogit[static_cast<size_t>(m)] += dprob[static_cast<size_t>(e)] * dpdl;
        }
        dlogit[static_cast<size_t>(m)] += ba.d_z * 2.0 * r.lse * std::exp(r.logits[static_cast<size_t>(m)] - r.lse) / static_cast<double>(n.T);
      }
      for (int64_t e = 0; e < E; ++e) {
        const double dl = dlogit[static_cast<size_t>(e)];
        dbg[static_cast<size_t>(e)] += dl;
        const double dn = (c.gate == GateKind::kNoisyTopK && a.training)
                              ? dl * r.eps[static_cast<size_t>(e)] * cpu::sigmoid(r.noise_pre[static_cast<size_t>(e)]) : 0.0;
        for (int64_t h = 0; h < H; ++h) {
          dwg[static_cast<size_t>(e * H + h)] += dl * r.router_x[static_cast<size_t>(h)];
          dx[static_cast<size_t>(t * H + h)] += dl * load(w.gate_weight, e * H + h) * r.jitter[static_cast<size_t>(h)];
          if (dn != 0) {
            dwn[static_cast<size_t>(e * H + h)] += dn * in[static_cast<size_t>(h)];
            dx[static_cast<size_t>(t * H + h)] += dn * load(w.noise_weight, e * H + h);
          }
        }
      }
    }
    cpu::store_all(g.dx, dx);
    cpu::store_all(g.d_gate_weight, dwg);
    cpu::store_all(g.d_gate_bias, dbg);
    cpu::store_all(g.d_noise_weight, dwn);
    cpu::store_all(g.d_w1, dw1);
    cpu::store_all(g.d_w2, dw2);
    cpu::store_all(g.d_b1, db1);
    cpu::store_all(g.d_b2, db2);
    cpu::store_all(g.d_shared_w1, sdw1);
    cpu::store_all(g.d_shared_w2, sdw2);
    cpu::store_all(g.d_shared_b1, sdb1);
    cpu::store_all(g.d_shared_b2, sdb2);
  }
};

}  // namespace

std::unique_ptr<BackendImpl> make_naive_backend() { return std::make_unique<NaiveBackend>(); }

}  // namespace fusedmoe
