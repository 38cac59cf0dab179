// src/protocol/threads_backend.cpp — Backend::kThreads: the fused layer's forward protocol run by
// one CPU thread per rank over the CpuThreadsTransport, so that its logic — slots, flags with
// counts and epochs, bounded waits, the order of phases — is tested without a GPU, and under
// ThreadSanitizer in CI (tests/cpp/test_protocol.cpp, target fusedmoe_protocol_tsan).
//
// Rank r of W, one launch with epoch ε (monotonic per backend object, 0 never used):
//   1. dispatch: every kept (token, j) row of r goes to its expert's owner: put the row and its
//      token·k + j into the owner's recv_rows / recv_meta at layout.recv_row(r, local expert,
//      psum, slot); then signal the owner's recv_flags[r][local expert] = {ε, count}, count 0
//      included. Data first, flag second (release): the planted fault flag_before_data raises the
//      flags first and puts the rows only after the rank's own expert phase.
//   2. experts: for every source s and local expert, wait for its flag (acquire), take the count
//      from it (offsets = prefix of the counts, in local-expert order), run the FFN over those
//      rows, put every result row into s's ret_rows[token·k + j], then signal s's
//      ret_flags[expert] = {ε, rows} (only for a non-empty segment: s waits only where it sent).
//   3. combine: wait for ret_flags[e] of every expert r sent rows to, check the count, and sum.
//   4. end: signal launch_flags[r] = {ε, 0} in every rank's heap. Step 1 starts by waiting until
//      every rank's launch_flags entry in r's heap reached ε − 1: no rank may see a flag (or
//      rows) of launch ε while it still runs launch ε − 1 (a rank that sent nothing to a slower
//      peer would otherwise run ahead, and the peer's claim of (r, e) could read launch ε's
//      count — with mixed epochs, dropless offsets from two launches).
// Peers on other nodes (ThreadsOptions::lsa_size > 0: teams of lsa_size consecutive ranks load
// and store into each other's heaps, other teams are reached as NCCL GIN reaches them): rows
// and results are staged in the sender's own heap (out_rows / out_meta / out_ret at the index
// they will have at the receiver, layout.hpp) and moved by one put per segment, and every flag
// word f becomes a signal add of f minus the value this rank last gave that signal (gin_sent),
// so that the receiver's signal reads f — the same {epoch | count} word as a flag. Results of
// such a peer arrive in segment order in ret_recv, where the combine finds (t, j) at the index
// its dispatch gave the row.
// Why no cycle of waits exists: phase 1 waits only for the end of the previous launch, which
// never waits on this one; phase 2 waits only for phase-1 flags, which every rank raises
// unconditionally before it waits on anything of this launch; phase 3 waits only for phase-2
// signals, which depend on phase 1 alone. Every wait is bounded (ThreadsOptions::timeout) and a
// failure aborts all ranks and is raised as a fusedmoe::Error naming rank, flag and values.
#include "protocol/threads_backend.hpp"

#include <algorithm>
#include <mutex>
#include <thread>

#include "core/backend.hpp"
#include "cpu/ffn.hpp"
#include "cpu/routing.hpp"
#include "cpu/tensor_io.hpp"
#include "cpu/thread_pool.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/planner.hpp"
#include "protocol/transport.hpp"

namespace fusedmoe::protocol {

namespace {
std::mutex g_options_mutex;
ThreadsOptions g_options;
}  // namespace

void set_threads_options(const ThreadsOptions& options) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  g_options = options;
}

ThreadsOptions threads_options() {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  return g_options;
}

namespace {

class ThreadsBackend final : public BackendImpl {
 public:
  void forward(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args,
               const std::vector<int64_t>& tokens_per_rank, const ForwardOutputs& out) override {
    if (c.dtype == DType::kFloat64) run<double>(c, w, args, tokens_per_rank, out);
    else run<float>(c, w, args, tokens_per_rank, out);
  }
  // The protocol covers the forward pass; backward runs the CPU backend (same results).
  void backward(const MoeConfig& c, const MoeWeights& w, const BackwardArgs& args,
                const std::vector<int64_t>& tokens_per_rank, const MoeGrads& grads) override {
    if (!cpu_) cpu_ = make_cpu_backend();
    cpu_->backward(c, w, args, tokens_per_rank, grads);
  }

 private:
  template <class T>
  void run(const MoeConfig& c, const MoeWeights& w, const ForwardArgs& args, const std::vector<int64_t>& tokens_per_rank,
           const ForwardOutputs& out) {
    const ThreadsOptions options = threads_options();
    const cpu::Routing routing = cpu::route(c, w, args, tokens_per_rank);
    const int64_t max_tokens = *std::max_element(tokens_per_rank.begin(), tokens_per_rank.end());
    LayoutParams params = make_plan(c, max_tokens, DeviceInfo{}).layout;
    params.gin = options.lsa_size > 0 && options.lsa_size < c.world_size;
    const WorkspaceLayout layout = WorkspaceLayout::make(params);
    const int64_t signals = params.gin ? WorkspaceLayout::gin_signal_count(c.world_size) : 0;
    if (transport_.ensure(c.world_size, layout.total_bytes, signals)) epoch_ = 0;
    if (++epoch_ == 0) ++epoch_;  // epoch 0 is the state of fresh memory
    transport_.reset_errors();
    Launch<T> launch{c, w, args, routing, layout, options, epoch_, transport_, typed_mut<T>(out.y)};
    std::vector<std::thread> ranks;
    for (int r = 0; r < c.world_size; ++r) ranks.emplace_back([&launch, r] { launch.rank_program(r); });
    for (auto& t : ranks) t.join();
    FUSEDMOE_CHECK(!transport_.aborted(), "threads backend: " << transport_.failure().message());
    cpu::write_routing_outputs(c, routing, out);
  }

  template <class T>
  static T* typed_mut(const TensorView& v) { return static_cast<T*>(v.data); }

  template <class T>
  struct Launch {
    const MoeConfig& c;
    const MoeWeights& w;
    const ForwardArgs& args;
    const cpu::Routing& r;
    const WorkspaceLayout& layout;
    const ThreadsOptions& options;
    uint32_t epoch;
    CpuThreadsTransport& transport;
    T* y;

    int64_t row_bytes() const { return c.hidden_size * static_cast<int64_t>(sizeof(T)); }
    int64_t recv_flag_offset(int source, int64_t local) const {
      return layout.recv_flags.offset + 8 * layout.recv_flag_index(source, local);
    }
    // Whether ranks a and b are in different load/store teams (GIN between them).
    bool remote(int a, int b) const { return options.lsa_size > 0 && a / options.lsa_size != b / options.lsa_size; }
    // Puts `bytes` from this rank's heap to `peer`'s, then publishes flag word `flag` on the
    // peer's signal `signal` (whose last value from this rank is gin_sent[sent_slot]).
    void gin_publish(int rank, int peer, int64_t signal, int64_t sent_slot, uint64_t flag, int64_t dst_offset = 0,
                     int64_t src_offset = 0, int64_t bytes = 0) {
      uint64_t* last = transport.at<uint64_t>(rank, layout.gin_sent.offset) + sent_slot;
      const uint64_t add = flag - *last;
      *last = flag;
      transport.gin_put(peer, dst_offset, rank, src_offset, static_cast<size_t>(bytes), signal, add);
    }
    int64_t launch_flag_offset(int source) const { return layout.launch_flags.offset + 8 * layout.launch_flag_index(source); }
    int64_t ret_flag_offset(int64_t expert) const { return layout.ret_flags.offset + 8 * layout.ret_flag_index(expert, 0); }

    void rank_program(int rank) {
      const cpu::SerialScope serial;  // the rank threads are the parallelism
      const bool sends = rank != options.silent_rank;
      // Planted fault flag_before_data: the flags go out first and the rows only after this
      // rank's own expert phase, which has by then computed on rows that were not there (its
      // own rows at least, so the wrong output does not depend on thread timing); the rows
      // other ranks read race with these late puts (ThreadSanitizer reports it).
      const bool late_rows = options.flag_before_data;
      bool ok = !sends || previous_launch_done(rank);
      if (ok && sends) dispatch(rank, !late_rows, true);
      ok = ok && experts(rank);
      if (ok && sends && late_rows) dispatch(rank, true, false);
      if (ok) combine(rank);
      // The end of this launch, failed or not (a failed launch raises an error on the host; the
      // next one must not wait for it). Planted fault unfinished_rank: never announced.
      if (rank != options.unfinished_rank)
        for (int q = 0; q < c.world_size; ++q) {
          if (remote(rank, q))
            gin_publish(rank, q, layout.gin_launch_signal(rank), layout.gin_sent_launch(q), make_flag(epoch, 0));
          else
            transport.signal(q, launch_flag_offset(rank), make_flag(epoch, 0));
        }
    }

    // Every rank finished the previous launch (the flags are in this rank's heap).
    bool previous_launch_done(int rank) {
      for (int q = 0; q < c.world_size; ++q) {
        uint64_t flag = 0;
        const std::string what = "the end of rank " + std::to_string(q) + "'s previous launch";
        const bool ok = remote(rank, q) ? transport.wait_signal(rank, layout.gin_launch_signal(q), previous_epoch(epoch),
                                                                what, options.timeout, &flag)
                                        : transport.wait(rank, launch_flag_offset(q), previous_epoch(epoch), what,
                                                         options.timeout, &flag);
        if (!ok) return false;
      }
      return true;
    }

    // Rows and their metadata into the owners' heaps (rows), then the owners' flags (flags).
    void dispatch(int rank, bool rows, bool flags) {
      const int64_t E = c.num_experts, k = c.top_k, H = c.hidden_size;
      const T* x = static_cast<const T*>(args.x.data);
      const std::vector<int64_t> psum_before = cpu::dispatch_psum(c, r, rank);
      auto send_rows = [&] {
        for (int64_t t = r.rank_begin[rank]; t < r.rank_begin[rank + 1]; ++t)
          for (int64_t j = 0; j < k; ++j) {
            const size_t i = static_cast<size_t>(t * k + j);
            if (!r.kept[i]) continue;
            const int64_t e = r.idx[i];
            const int owner = c.expert_rank(e);
            const int64_t row = layout.recv_row(rank, c.expert_local_index(e), psum_before[static_cast<size_t>(e)], r.slot[i]);
            const int32_t meta = static_cast<int32_t>((t - r.rank_begin[rank]) * k + j);
            if (remote(rank, owner)) {  // staged in this rank's heap, put with the flag
              const int64_t out = layout.out_row(owner, rank, row);
              transport.put(rank, layout.out_rows.offset + out * row_bytes(), x + t * H, static_cast<size_t>(row_bytes()));
              transport.put(rank, layout.out_meta.offset + out * 4, &meta, 4);
              continue;
            }
            transport.put(owner, layout.recv_rows.offset + row * row_bytes(), x + t * H, static_cast<size_t>(row_bytes()));
            transport.put(owner, layout.recv_meta.offset + row * 4, &meta, 4);
          }
      };
      auto raise_flags = [&] {
        for (int64_t e = 0; e < E; ++e) {
          const int owner = c.expert_rank(e);
          const int64_t local = c.expert_local_index(e), count = r.kept_count[static_cast<size_t>(rank * E + e)];
          const uint64_t flag = make_flag(epoch, static_cast<uint32_t>(count));
          if (!remote(rank, owner)) {
            transport.signal(owner, recv_flag_offset(rank, local), flag);
            continue;
          }
          // The segment's rows, then its metadata with the signal (visible after both puts).
          const int64_t first = layout.recv_row(rank, local, psum_before[static_cast<size_t>(e)], 0);
          const int64_t out = layout.out_row(owner, rank, first);
          transport.gin_put(owner, layout.recv_rows.offset + first * row_bytes(), rank,
                            layout.out_rows.offset + out * row_bytes(), static_cast<size_t>(count * row_bytes()),
                            /*signal=*/-1, 0);
          gin_publish(rank, owner, layout.gin_dispatch_signal(rank, local), layout.gin_sent_dispatch(owner, local), flag,
                      layout.recv_meta.offset + first * 4, layout.out_meta.offset + out * 4, count * 4);
        }
      };
      if (rows) send_rows();
      if (flags) raise_flags();
    }

    bool experts(int rank) {
      const int64_t H = c.hidden_size, N1 = c.ffn_in_width(), I = c.ffn_size;
      const cpu::FfnShape shape{H, I, N1, c.ffn};
      std::vector<T> pre, act, rows_out;
      for (int step = 0; step < c.world_size; ++step) {
        const int source = (rank + step) % c.world_size;  // start with our own rows
        int64_t psum = 0;
        for (int64_t local = 0; local < c.num_local_experts(rank); ++local) {
          const int64_t e = c.global_expert(rank, local);
          uint64_t flag = 0;
          const std::string what = "dispatch flag (source " + std::to_string(source) + ", local expert " +
                                   std::to_string(local) + ")";
          const bool far = remote(rank, source);
          if (!(far ? transport.wait_signal(rank, layout.gin_dispatch_signal(source, local), epoch, what,
                                            options.timeout, &flag)
                    : transport.wait(rank, recv_flag_offset(source, local), epoch, what, options.timeout, &flag)))
            return false;
          const int64_t count = flag_count(flag);
          const int64_t first = layout.recv_row(source, local, psum, 0);
          psum += WorkspaceLayout::segment_span(count);
          if (count == 0) continue;
          pre.resize(static_cast<size_t>(count * N1));
          act.resize(static_cast<size_t>(count * I));
          rows_out.resize(static_cast<size_t>(count * H));
          const T* rows_in = transport.at<T>(rank, layout.recv_rows.offset) + first * H;
          cpu::ffn_up<T>(shape, count, rows_in, cpu::typed<T>(w.w1) + e * H * N1, cpu::ptr_or_null<T>(w.b1, e * N1),
                         pre.data(), act.data());
          cpu::ffn_down<T>(shape, count, act.data(), cpu::typed<T>(w.w2) + e * I * H, cpu::ptr_or_null<T>(w.b2, e * H),
                           rows_out.data());
          const uint64_t done = make_flag(epoch, static_cast<uint32_t>(count));
          if (far) {  // in segment order into out_ret, one put into the source's ret_recv
            transport.put(rank, layout.out_ret.offset + first * row_bytes(), rows_out.data(),
                          static_cast<size_t>(count * row_bytes()));
            gin_publish(rank, source, layout.gin_return_signal(rank, local), layout.gin_sent_return(source, local), done,
                        layout.ret_recv.offset + layout.ret_recv_row(rank, source, first) * row_bytes(),
                        layout.out_ret.offset + first * row_bytes(), count * row_bytes());
            continue;
          }
          const int32_t* meta = transport.at<int32_t>(rank, layout.recv_meta.offset) + first;
          for (int64_t row = 0; row < count; ++row)
            transport.put(source, layout.ret_rows.offset + meta[row] * row_bytes(), &rows_out[static_cast<size_t>(row * H)],
                          static_cast<size_t>(row_bytes()));
          transport.signal(source, ret_flag_offset(e), done);
        }
      }
      return true;
    }

    void combine(int rank) {
      const int64_t E = c.num_experts, k = c.top_k, H = c.hidden_size;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t expected = r.kept_count[static_cast<size_t>(rank * E + e)];
        if (expected == 0) continue;
        uint64_t flag = 0;
        const int owner = c.expert_rank(e);
        const std::string what = "return flag of expert " + std::to_string(e);
        if (!(remote(rank, owner) ? transport.wait_signal(rank, layout.gin_return_signal(owner, c.expert_local_index(e)),
                                                          epoch, what, options.timeout, &flag)
                                  : transport.wait(rank, ret_flag_offset(e), epoch, what, options.timeout, &flag)))
          return;
        if (flag_count(flag) != static_cast<uint32_t>(expected)) {  // no throwing on a rank thread
          transport.fail(WaitFailure{.rank = rank, .violation = "expected " + std::to_string(expected) +
                                                                " rows back from expert " + std::to_string(e) +
                                                                ", its return flag says " + std::to_string(flag_count(flag))});
          return;
        }
      }
      const int64_t begin = r.rank_begin[rank], tokens = r.rank_begin[rank + 1] - begin;
      std::vector<double> acc(static_cast<size_t>(tokens * H), 0.0);
      const T* ret = transport.at<T>(rank, layout.ret_rows.offset);
      const T* ret_far = transport.at<T>(rank, layout.ret_recv.offset);
      const std::vector<int64_t> psum_before = cpu::dispatch_psum(c, r, rank);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const size_t i = static_cast<size_t>((begin + t) * k + j);
          if (!r.kept[i]) continue;
          const int64_t e = r.idx[i];
          const int owner = c.expert_rank(e);
          const T* row = ret + (t * k + j) * H;
          if (remote(rank, owner)) {  // at the index this rank's dispatch gave it, in the owner's block
            const int64_t recv = layout.recv_row(rank, c.expert_local_index(e), psum_before[static_cast<size_t>(e)], r.slot[i]);
            row = ret_far + layout.ret_recv_row(owner, rank, recv) * H;
          }
          for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(t * H + h)] += r.weight[i] * static_cast<double>(row[h]);
        }
      if (c.num_shared_experts > 0 && tokens > 0) {  // shared experts on the rank's own tokens
        const cpu::FfnShape shape{H, c.shared_size(), c.shared_in_width(), c.ffn};
        const int64_t Is = c.shared_size(), Ns1 = c.shared_in_width();
        std::vector<T> pre(static_cast<size_t>(tokens * Ns1)), act(static_cast<size_t>(tokens * Is)),
            shared_out(static_cast<size_t>(tokens * H));
        const T* x = static_cast<const T*>(args.x.data) + begin * H;
        for (int64_t s = 0; s < c.num_shared_experts; ++s) {
          cpu::ffn_up<T>(shape, tokens, x, cpu::typed<T>(w.shared_w1) + s * H * Ns1,
                         cpu::ptr_or_null<T>(w.shared_b1, s * Ns1), pre.data(), act.data());
          cpu::ffn_down<T>(shape, tokens, act.data(), cpu::typed<T>(w.shared_w2) + s * Is * H,
                           cpu::ptr_or_null<T>(w.shared_b2, s * H), shared_out.data());
          for (size_t i = 0; i < acc.size(); ++i) acc[i] += static_cast<double>(shared_out[i]);
        }
      }
      for (int64_t i = 0; i < tokens * H; ++i) y[begin * H + i] = static_cast<T>(acc[static_cast<size_t>(i)]);
    }
  };

  CpuThreadsTransport transport_;
  uint32_t epoch_ = 0;
  std::unique_ptr<BackendImpl> cpu_;
};

}  // namespace
}  // namespace fusedmoe::protocol

namespace fusedmoe {
std::unique_ptr<BackendImpl> make_threads_backend() { return std::make_unique<protocol::ThreadsBackend>(); }
}  // namespace fusedmoe
