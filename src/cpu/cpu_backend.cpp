// src/cpu/cpu_backend.cpp — the CPU backend: the whole layer for W emulated ranks in one
// process, moving rows through each rank's symmetric workspace exactly as the GPU protocol does
// (fusedmoe/layout.hpp): dispatch writes x rows into the owner's recv_rows at the slot the
// layout gives and raises the (source, expert) flag carrying the row count; the owner reads the
// counts from its flags, runs each (source, expert) segment through the expert FFN and writes
// every result row into the source's ret_rows[token·k + j]; the source combines.
// Backward runs the same routes in reverse (dY out along the routes, dX back).
// It is the oracle of every GPU test. Test: tests/cpp/test_cpu_layer.cpp.
#include <algorithm>
#include <cstring>
#include <memory>

#include "core/backend.hpp"
#include "cpu/ffn.hpp"
#include "cpu/ffn_math.hpp"
#include "cpu/gemm.hpp"
#include "cpu/routing.hpp"
#include "cpu/tensor_io.hpp"
#include "cpu/thread_pool.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/layout.hpp"
#include "fusedmoe/planner.hpp"

namespace fusedmoe::cpu {
namespace {

// One rank's symmetric workspace, addressed through WorkspaceLayout.
template <class T>
struct RankHeap {
  const WorkspaceLayout* layout = nullptr;
  std::vector<unsigned char> bytes;

  template <class U>
  U* at(const Section& s) { return reinterpret_cast<U*>(bytes.data() + s.offset); }
  T* recv_row(int64_t row) { return at<T>(layout->recv_rows) + row * layout->p.hidden_size; }
  int32_t* recv_meta() { return at<int32_t>(layout->recv_meta); }
  uint64_t* recv_flags() { return at<uint64_t>(layout->recv_flags); }
  T* ret_row(int64_t row) { return at<T>(layout->ret_rows) + row * layout->p.hidden_size; }
};

// A segment: the rows one source sent to one local expert of one rank.
struct Segment {
  int owner = 0;           // rank that computes it
  int source = 0;          // rank the rows came from
  int64_t expert = 0;      // global expert index
  int64_t local_expert = 0;
  int64_t first_row = 0;   // in the owner's recv_rows
  int64_t rows = 0;
};

template <class T>
class Emulation {
 public:
  Emulation(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args,
            const std::vector<int64_t>& tokens_per_rank)
      : c_(c) {
    const int64_t max_tokens = *std::max_element(tokens_per_rank.begin(), tokens_per_rank.end());
    layout_ = WorkspaceLayout::make(make_plan(c, max_tokens, DeviceInfo{}).layout);
    heaps_.resize(static_cast<size_t>(c.world_size));
    for (auto& heap : heaps_) {
      heap.layout = &layout_;
      heap.bytes.assign(static_cast<size_t>(layout_.total_bytes), 0);
    }
    routing_ = route(c, w, args, tokens_per_rank);
  }

  const Routing& routing() const { return routing_; }
  const std::vector<Segment>& segments() const { return segments_; }
  RankHeap<T>& heap(int rank) { return heaps_[static_cast<size_t>(rank)]; }
  const WorkspaceLayout& layout() const { return layout_; }
  int64_t rank_begin(int rank) const { return routing_.rank_begin[static_cast<size_t>(rank)]; }

  // Dispatch: every kept (t, j) row goes to its expert's owner; then every (source, expert)
  // flag is raised with its count (zero counts included). Epoch 1: one launch per heap.
  void dispatch(const T* rows_by_token, bool with_meta) {
    const int64_t H = c_.hidden_size, E = c_.num_experts, k = c_.top_k;
    const Routing& r = routing_;
    for (int source = 0; source < c_.world_size; ++source) {
      const std::vector<int64_t> psum_before = dispatch_psum(c_, r, source);  // per global expert
      for (int64_t t = rank_begin(source); t < rank_begin(source + 1); ++t)
        for (int64_t j = 0; j < k; ++j) {
          const size_t i = static_cast<size_t>(t * k + j);
          if (!r.kept[i]) continue;
          const int64_t e = r.idx[i];
          RankHeap<T>& dest = heap(c_.expert_rank(e));
          const int64_t row = layout_.recv_row(source, c_.expert_local_index(e),
                                               psum_before[static_cast<size_t>(e)], r.slot[i]);
          std::memcpy(dest.recv_row(row), rows_by_token + t * H, sizeof(T) * static_cast<size_t>(H));
          if (with_meta) dest.recv_meta()[row] = static_cast<int32_t>((t - rank_begin(source)) * k + j);
        }
      for (int64_t e = 0; e < E; ++e) {
        RankHeap<T>& dest = heap(c_.expert_rank(e));
        dest.recv_flags()[layout_.recv_flag_index(source, c_.expert_local_index(e))] =
            make_flag(1, static_cast<uint32_t>(r.kept_count[static_cast<size_t>(source * E + e)]));
      }
    }
    if (with_meta) build_segments();
  }

  // The owner learns each segment's size from the flags alone (the count rides in the flag).
  void build_segments() {
    segments_.clear();
    for (int owner = 0; owner < c_.world_size; ++owner) {
      RankHeap<T>& h = heap(owner);
      for (int source = 0; source < c_.world_size; ++source) {
        int64_t psum = 0;
        for (int64_t local = 0; local < c_.num_local_experts(owner); ++local) {
          const uint64_t flag = h.recv_flags()[layout_.recv_flag_index(source, local)];
          FUSEDMOE_CHECK(flag_epoch(flag) == 1, "internal: flag (" << source << ", " << local
                                                << ") on rank " << owner << " was not raised");
          const int64_t count = flag_count(flag);
          segments_.push_back(Segment{.owner = owner, .source = source,
                                      .expert = c_.global_expert(owner, local), .local_expert = local,
                                      .first_row = layout_.recv_row(source, local, psum, 0), .rows = count});
          psum += WorkspaceLayout::segment_span(count);
        }
      }
    }
  }

  // Runs fn(segment_indices of one expert) for every expert, experts in parallel.
  template <class Fn>
  void for_each_expert(Fn&& fn) {
    std::vector<std::vector<size_t>> by_expert(static_cast<size_t>(c_.num_experts));
    for (size_t s = 0; s < segments_.size(); ++s)
      by_expert[static_cast<size_t>(segments_[s].expert)].push_back(s);
    parallel_for(c_.num_experts, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) fn(e, by_expert[static_cast<size_t>(e)]);
    });
  }

 private:
  const MoeConfig& c_;
  WorkspaceLayout layout_;
  std::vector<RankHeap<T>> heaps_;
  Routing routing_;
  std::vector<Segment> segments_;
};

// ------------------------------------------------------------------------------ backend --

template <class T>
class CpuBackend final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args,
               const std::vector<int64_t>& tokens_per_rank, const ForwardOutputs& out) override {
    Emulation<T> em(c, w, args, tokens_per_rank);
    em.dispatch(typed<T>(args.x), /*with_meta=*/true);
    run_experts(c, w, em, nullptr);
    combine(c, w, args, em, typed_mut<T>(out.y));
    write_routing_outputs(c, em.routing(), out);
  }

  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& args,
                const std::vector<int64_t>& tokens_per_rank, const MoeGrads& g) override {
    const ForwardArgs& fa = args.forward;
    const int64_t num_tokens = fa.x.shape[0], H = c.hidden_size, k = c.top_k, E = c.num_experts;
    Emulation<T> em(c, w, fa, tokens_per_rank);
    em.dispatch(typed<T>(fa.x), /*with_meta=*/true);
    // Forward again, keeping each received row's pre-activation and activation.
    ExpertCache cache;
    run_experts(c, w, em, &cache);
    const Routing& r = em.routing();
    const T* dy = typed<T>(args.dy);

    // dL/dw(t, j) = ⟨dy_t, out(t, j)⟩ on the source rank, from its ret_rows.
    std::vector<double> dweight(static_cast<size_t>(num_tokens * k), 0.0);
    for (int q = 0; q < c.world_size; ++q)
      for (int64_t t = em.rank_begin(q); t < em.rank_begin(q + 1); ++t)
        for (int64_t j = 0; j < k; ++j) {
          const size_t i = static_cast<size_t>(t * k + j);
          if (!r.kept[i]) continue;
          const T* out_row = em.heap(q).ret_row((t - em.rank_begin(q)) * k + j);
          double dot = 0.0;
          for (int64_t h = 0; h < H; ++h) dot += static_cast<double>(dy[t * H + h]) * static_cast<double>(out_row[h]);
          dweight[i] = dot;
        }

    // dY travels to the experts along the saved routes: row (t, j) carries w(t, j) · dy_t.
    std::vector<T> scaled(static_cast<size_t>(num_tokens * k * H));
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t h = 0; h < H; ++h)
          scaled[static_cast<size_t>((t * k + j) * H + h)] =
              static_cast<T>(r.weight[static_cast<size_t>(t * k + j)] * static_cast<double>(dy[t * H + h]));
    std::vector<std::vector<T>> grad_rows(static_cast<size_t>(c.world_size));
    for (int q = 0; q < c.world_size; ++q)
      grad_rows[static_cast<size_t>(q)].assign(static_cast<size_t>(c.world_size * em.layout().rows_per_source * H), T(0));
    for (int q = 0; q < c.world_size; ++q) {
      RankHeap<T>& heap = em.heap(q);
      for (const Segment& s : em.segments()) {
        if (s.owner != q) continue;
        for (int64_t row = s.first_row; row < s.first_row + s.rows; ++row) {
          const int64_t t = em.rank_begin(s.source) + heap.recv_meta()[row] / k;
          const int64_t j = heap.recv_meta()[row] % k;
          std::memcpy(&grad_rows[static_cast<size_t>(q)][static_cast<size_t>(row * H)],
                      &scaled[static_cast<size_t>((t * k + j) * H)], sizeof(T) * static_cast<size_t>(H));
        }
      }
    }

    // Expert backward per expert (segments of one expert accumulate into its gradients).
    const FfnShape shape{c.hidden_size, c.ffn_size, c.ffn_in_width(), c.ffn};
    const int64_t N1 = c.ffn_in_width(), I = c.ffn_size;
    std::vector<T> dw1(static_cast<size_t>(E * H * N1), T(0)), dw2(static_cast<size_t>(E * I * H), T(0));
    std::vector<T> db1(c.expert_bias ? static_cast<size_t>(E * N1) : 0, T(0));
    std::vector<T> db2(c.expert_bias ? static_cast<size_t>(E * H) : 0, T(0));
    em.for_each_expert([&](int64_t expert, const std::vector<size_t>& seg_ids) {
      for (size_t id : seg_ids) {
        const Segment& s = em.segments()[id];
        if (s.rows == 0) continue;
        RankHeap<T>& owner = em.heap(s.owner);
        std::vector<T> dx_rows(static_cast<size_t>(s.rows * H));
        const auto& cached = cache.at(id);
        ffn_backward<T>(shape, s.rows, owner.recv_row(s.first_row), cached.pre.data(), cached.act.data(),
                        &grad_rows[static_cast<size_t>(s.owner)][static_cast<size_t>(s.first_row * H)],
                        typed<T>(w.w1) + expert * H * N1, typed<T>(w.w2) + expert * I * H,
                        dw1.data() + expert * H * N1, c.expert_bias ? db1.data() + expert * N1 : nullptr,
                        dw2.data() + expert * I * H, c.expert_bias ? db2.data() + expert * H : nullptr,
                        dx_rows.data());
        // dX travels back into the source's ret_rows (its forward results are no longer needed).
        RankHeap<T>& source = em.heap(s.source);
        for (int64_t row = 0; row < s.rows; ++row)
          std::memcpy(source.ret_row(owner.recv_meta()[s.first_row + row]), &dx_rows[static_cast<size_t>(row * H)],
                      sizeof(T) * static_cast<size_t>(H));
      }
    });

    // Router backward, then dx = Σ_j returned rows + router path + shared experts.
    std::vector<double> dx(static_cast<size_t>(num_tokens * H), 0.0);
    route_backward(c, w, r, dweight, args.d_aux, args.d_z, dx, g);
    for (int q = 0; q < c.world_size; ++q)
      for (int64_t t = em.rank_begin(q); t < em.rank_begin(q + 1); ++t)
        for (int64_t j = 0; j < k; ++j) {
          if (!r.kept[static_cast<size_t>(t * k + j)]) continue;
          const T* row = em.heap(q).ret_row((t - em.rank_begin(q)) * k + j);
          for (int64_t h = 0; h < H; ++h) dx[static_cast<size_t>(t * H + h)] += static_cast<double>(row[h]);
        }
    shared_backward(c, w, fa, dy, dx, g);
    store_all(g.dx, dx);
    copy_out(g.d_w1, dw1);
    copy_out(g.d_w2, dw2);
    copy_out(g.d_b1, db1);
    copy_out(g.d_b2, db2);
  }

 private:
  struct SegmentCache {
    std::vector<T> pre, act;
  };
  using ExpertCache = std::vector<SegmentCache>;

  static void copy_out(const TensorView& v, const std::vector<T>& values) {
    if (v.defined() && !values.empty()) std::memcpy(v.data, values.data(), sizeof(T) * values.size());
  }

  // Every owner runs every segment it received; results go to the source's ret_rows.
  static void run_experts(const MoeConfig& c, const MoeWeights& w, Emulation<T>& em, ExpertCache* cache) {
    const FfnShape shape{c.hidden_size, c.ffn_size, c.ffn_in_width(), c.ffn};
    const int64_t H = c.hidden_size, N1 = c.ffn_in_width(), I = c.ffn_size;
    if (cache) cache->resize(em.segments().size());
    em.for_each_expert([&](int64_t expert, const std::vector<size_t>& seg_ids) {
      for (size_t id : seg_ids) {
        const Segment& s = em.segments()[id];
        if (s.rows == 0) continue;
        RankHeap<T>& owner = em.heap(s.owner);
        std::vector<T> pre(static_cast<size_t>(s.rows * N1)), act(static_cast<size_t>(s.rows * I));
        std::vector<T> out(static_cast<size_t>(s.rows * H));
        ffn_up<T>(shape, s.rows, owner.recv_row(s.first_row), typed<T>(w.w1) + expert * H * N1,
                  ptr_or_null<T>(w.b1, expert * N1), pre.data(), act.data());
        ffn_down<T>(shape, s.rows, act.data(), typed<T>(w.w2) + expert * I * H,
                    ptr_or_null<T>(w.b2, expert * H), out.data());
        RankHeap<T>& source = em.heap(s.source);
        for (int64_t row = 0; row < s.rows; ++row)
          std::memcpy(source.ret_row(owner.recv_meta()[s.first_row + row]), &out[static_cast<size_t>(row * H)],
                      sizeof(T) * static_cast<size_t>(H));
        if (cache) (*cache)[id] = SegmentCache{std::move(pre), std::move(act)};
      }
    });
  }

  // y_t = Σ_j w(t, j) · ret(t, j) (fp64 accumulation, fixed order over j) + shared experts.
  static void combine(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args, Emulation<T>& em, T* y) {
    const int64_t H = c.hidden_size, k = c.top_k, T_all = args.x.shape[0];
    const Routing& r = em.routing();
    std::vector<double> acc(static_cast<size_t>(T_all * H), 0.0);
    for (int q = 0; q < c.world_size; ++q)
      for (int64_t t = em.rank_begin(q); t < em.rank_begin(q + 1); ++t)
        for (int64_t j = 0; j < k; ++j) {
          const size_t i = static_cast<size_t>(t * k + j);
          if (!r.kept[i]) continue;
          const T* row = em.heap(q).ret_row((t - em.rank_begin(q)) * k + j);
          for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(t * H + h)] += r.weight[i] * static_cast<double>(row[h]);
        }
    if (c.num_shared_experts > 0) {
      const FfnShape shape{c.hidden_size, c.shared_size(), c.shared_in_width(), c.ffn};
      const int64_t Is = c.shared_size(), Ns1 = c.shared_in_width();
      std::vector<T> pre(static_cast<size_t>(T_all * Ns1)), act(static_cast<size_t>(T_all * Is)), out(static_cast<size_t>(T_all * H));
      for (int64_t s = 0; s < c.num_shared_experts; ++s) {
        ffn_up<T>(shape, T_all, typed<T>(args.x), typed<T>(w.shared_w1) + s * H * Ns1,
                  ptr_or_null<T>(w.shared_b1, s * Ns1), pre.data(), act.data());
        ffn_down<T>(shape, T_all, act.data(), typed<T>(w.shared_w2) + s * Is * H,
                    ptr_or_null<T>(w.shared_b2, s * H), out.data());
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += static_cast<double>(out[i]);
      }
    }
    for (size_t i = 0; i < acc.size(); ++i) y[i] = static_cast<T>(acc[i]);
  }

  static void shared_backward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args, const T* dy,
                              std::vector<double>& dx, const MoeGrads& g) {
    if (c.num_shared_experts == 0) return;
    const FfnShape shape{c.hidden_size, c.shared_size(), c.shared_in_width(), c.ffn};
    const int64_t T_all = args.x.shape[0], H = c.hidden_size, Is = c.shared_size(), Ns1 = c.shared_in_width();
    const int64_t S = c.num_shared_experts;
    std::vector<T> pre(static_cast<size_t>(T_all * Ns1)), act(static_cast<size_t>(T_all * Is));
    std::vector<T> dx_rows(static_cast<size_t>(T_all * H));
    std::vector<T> dw1(static_cast<size_t>(S * H * Ns1), T(0)), dw2(static_cast<size_t>(S * Is * H), T(0));
    std::vector<T> db1(c.expert_bias ? static_cast<size_t>(S * Ns1) : 0, T(0));
    std::vector<T> db2(c.expert_bias ? static_cast<size_t>(S * H) : 0, T(0));
    for (int64_t s = 0; s < S; ++s) {
      ffn_up<T>(shape, T_all, typed<T>(args.x), typed<T>(w.shared_w1) + s * H * Ns1,
                ptr_or_null<T>(w.shared_b1, s * Ns1), pre.data(), act.data());
      ffn_backward<T>(shape, T_all, typed<T>(args.x), pre.data(), act.data(), dy,
                      typed<T>(w.shared_w1) + s * H * Ns1, typed<T>(w.shared_w2) + s * Is * H,
                      dw1.data() + s * H * Ns1, c.expert_bias ? db1.data() + s * Ns1 : nullptr,
                      dw2.data() + s * Is * H, c.expert_bias ? db2.data() + s * H : nullptr, dx_rows.data());
      for (size_t i = 0; i < dx.size(); ++i) dx[i] += static_cast<double>(dx_rows[i]);
    }
    copy_out(g.d_shared_w1, dw1);
    copy_out(g.d_shared_w2, dw2);
    copy_out(g.d_shared_b1, db1);
    copy_out(g.d_shared_b2, db2);
  }
};

}  // namespace
}  // namespace fusedmoe::cpu

namespace fusedmoe {

namespace {
// Dispatches on the dtype the backend is called with.
class CpuBackendDispatch final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& a,
               const std::vector<int64_t>& tpr, const ForwardOutputs& o) override {
    if (c.dtype == DType::kFloat64) f64_.forward(c, w, a, tpr, o);
    else f32_.forward(c, w, a, tpr, o);
  }
  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& a,
                const std::vector<int64_t>& tpr, const MoeGrads& g) override {
    if (c.dtype == DType::kFloat64) f64_.backward(c, w, a, tpr, g);
    else f32_.backward(c, w, a, tpr, g);
  }

 private:
  cpu::CpuBackend<float> f32_;
  cpu::CpuBackend<double> f64_;
};
}  // namespace

std::unique_ptr<BackendImpl> make_cpu_backend() { return std::make_unique<CpuBackendDispatch>(); }

}  // namespace fusedmoe
