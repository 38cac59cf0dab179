// tests/cpp/test_layout.cpp — workspace layout (sizes add up, alignment, no overlap, worst
// cases), flag words, the planner, and the counter-based noise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "fusedmoe/fusedmoe.hpp"

namespace fusedmoe {
namespace {

std::vector<Section> sections(const WorkspaceLayout& l) {
  return {l.launch_flags, l.gin_sent, l.gin_signals, l.recv_rows, l.recv_meta, l.recv_flags, l.hidden, l.ret_rows, l.ret_flags, l.counters, l.task_queue, l.out_rows, l.out_meta, l.out_ret, l.ret_recv};
}

LayoutParams params(int64_t world, int64_t local, int64_t k, int64_t tokens, int64_t capacity) {
  return LayoutParams{.world_size = world, .max_local_experts = local, .num_experts = world * local, .top_k = k,
                      .hidden_size = 48, .ffn_size = 80, .max_tokens = tokens, .capacity = capacity,
                      .element_size = 2, .block_m = 64};
}

TEST(Layout, SectionsAlignedOrderedNonOverlappingAndSumToTotal) {
  for (auto p : {params(1, 8, 2, 1000, 0), params(8, 4, 8, 333, 0), params(4, 2, 2, 17, 20), params(2, 1, 1, 0, 0)}) {
    WorkspaceLayout l = WorkspaceLayout::make(p);
    int64_t end = 0;
    for (const Section& s : sections(l)) {
      EXPECT_EQ(s.offset % WorkspaceLayout::kAlignment, 0);
      EXPECT_GE(s.offset, end) << "overlap";
      end = s.offset + s.bytes;
    }
    EXPECT_GE(l.total_bytes, end);
    EXPECT_LT(l.total_bytes - end, WorkspaceLayout::kAlignment);
    EXPECT_EQ(l.total_bytes % WorkspaceLayout::kAlignment, 0);
  }
}

TEST(Layout, SectionSizes) {
  WorkspaceLayout l = WorkspaceLayout::make(params(4, 3, 2, 100, 0));
  // dropless: T_max · min(k, E_local) rows plus the padding of E_local segments to 16-row
  // boundaries, rounded up to 16: 200 + 3 · 15 = 245 -> 256.
  EXPECT_EQ(l.rows_per_source, 256);
  EXPECT_EQ(l.recv_rows.bytes, 4 * 256 * 48 * 2);
  EXPECT_EQ(l.recv_meta.bytes, 4 * 256 * 4);
  EXPECT_EQ(l.recv_flags.bytes, 4 * 3 * 8);
  EXPECT_EQ(l.launch_flags.offset, 0);
  EXPECT_EQ(l.launch_flags.bytes, 64 * 8);
  EXPECT_EQ(l.hidden.bytes, 4 * 256 * 80 * 2);
  EXPECT_EQ(l.ret_rows.bytes, 100 * 2 * 48 * 2);
  EXPECT_EQ(l.m_tiles, 2);
  EXPECT_EQ(l.ret_flags.bytes, 12 * 2 * 8);
  WorkspaceLayout capped = WorkspaceLayout::make(params(4, 3, 2, 100, 20));
  EXPECT_EQ(capped.rows_per_source, 3 * 32);  // capacity 20 takes a 32-row range per expert
  WorkspaceLayout k_above_local = WorkspaceLayout::make(params(4, 1, 4, 10, 0));
  EXPECT_EQ(k_above_local.rows_per_source, 32);  // one row per local expert at most: 10 + 15 -> 32
}

// The launch flags stay where they are whatever the problem (a new layout clears the other flag
// sections but must keep the record of the last finished launch), and fit every rank.
TEST(Layout, LaunchFlagsNeverMove) {
  for (auto p : {params(1, 8, 2, 1000, 0), params(8, 4, 8, 333, 0), params(4, 2, 2, 17, 20), params(100, 1, 1, 3, 0)}) {
    const WorkspaceLayout l = WorkspaceLayout::make(p);
    EXPECT_EQ(l.launch_flags.offset, 0);
    EXPECT_GE(l.launch_flags.bytes, 8 * p.world_size);
    EXPECT_LE(l.launch_flags.bytes, l.recv_rows.offset);
  }
  EXPECT_EQ(previous_epoch(2), 1u);
  EXPECT_EQ(previous_epoch(1), 0xffffffffu);  // epochs skip 0
  EXPECT_TRUE(epoch_reached(0, previous_epoch(1)));  // fresh memory passes the first launch's gate
  EXPECT_TRUE(epoch_reached(0xffffffffu, previous_epoch(1)));  // and so does the launch before a wrap
  EXPECT_FALSE(epoch_reached(6, previous_epoch(8)));
}

// GIN (peers on other nodes): the staging sections exist only then and do not overlap; the
// records and signals sit at offsets that no other parameter moves; every (writer, slot) has
// its own signal id below the count; the exchange of blocks maps every (owner, source, row) to
// a distinct staging row inside the section.
TEST(Layout, GinSectionsAndSignals) {
  for (auto p : {params(4, 2, 2, 17, 0), params(8, 4, 8, 33, 5), params(2, 1, 1, 3, 0)}) {
    const WorkspaceLayout plain = WorkspaceLayout::make(p);
    EXPECT_EQ(plain.gin_sent.bytes, 0);
    EXPECT_EQ(plain.out_rows.bytes, 0);
    EXPECT_EQ(plain.ret_recv.bytes, 0);
    p.gin = true;
    const WorkspaceLayout l = WorkspaceLayout::make(p);
    const int64_t W = p.world_size;
    EXPECT_EQ(l.gin_sent.offset, l.launch_flags.offset + l.launch_flags.bytes);
    EXPECT_EQ(l.gin_sent.bytes, W * WorkspaceLayout::kGinSlots * 8);
    EXPECT_EQ(l.gin_signals.bytes, WorkspaceLayout::gin_signal_count(W) * 8);
    LayoutParams other = p;  // another problem on the same world: records and signals stay put
    other.max_tokens *= 3;
    other.hidden_size += 8;
    const WorkspaceLayout moved = WorkspaceLayout::make(other);
    EXPECT_EQ(moved.gin_sent.offset, l.gin_sent.offset);
    EXPECT_EQ(moved.gin_signals.offset, l.gin_signals.offset);
    std::set<int64_t> ids, sent;
    for (int64_t a = 0; a < W; ++a) {
      ids.insert(l.gin_launch_signal(a));
      for (int64_t b = 0; b < W; ++b) sent.insert(l.gin_sent_launch(b) + 1000000 * a);
      for (int64_t local = 0; local < p.max_local_experts; ++local) {
        ids.insert(l.gin_dispatch_signal(a, local));
        ids.insert(l.gin_return_signal(a, local));
        for (int64_t b = 0; b < W; ++b) {
          sent.insert(l.gin_sent_dispatch(b, local) + 1000000 * a);
          sent.insert(l.gin_sent_return(b, local) + 1000000 * a);
        }
      }
    }
    EXPECT_EQ(static_cast<int64_t>(ids.size()), W * (2 * p.max_local_experts + 1));
    EXPECT_LT(*ids.rbegin(), WorkspaceLayout::gin_signal_count(W));
    EXPECT_EQ(static_cast<int64_t>(sent.size()), W * W * (2 * p.max_local_experts + 1));
    for (int64_t slot : sent) EXPECT_LT(slot % 1000000, W * WorkspaceLayout::kGinSlots);
    std::set<int64_t> staged;
    for (int64_t owner = 0; owner < W; ++owner)
      for (int64_t row = 0; row < l.rows_per_source; ++row) {
        const int64_t source = (owner + 1) % W, recv = l.recv_row(source, 0, 0, row);
        const int64_t out = l.out_row(owner, source, recv);
        EXPECT_EQ(l.ret_recv_row(owner, source, recv), out);
        EXPECT_GE(out, 0);
        EXPECT_LT(out, W * l.rows_per_source);
        staged.insert(out);
      }
    EXPECT_EQ(static_cast<int64_t>(staged.size()), W * l.rows_per_source);
  }
}

// Worst case: every slot the router can produce lands inside the source's block, distinct
// (source, expert, row) map to distinct rows, and every segment starts on a 16-row boundary with
// its padded span (whole 16-row stores) inside the block and clear of the next segment.
TEST(Layout, RecvRowsOfAllSlotsAreDistinctAndInBounds) {
  for (int64_t capacity : {0, 5, 16, 17}) {
    const int64_t world = 3, local = 2, tokens = 7, k = 2;
    WorkspaceLayout l = WorkspaceLayout::make(params(world, local, k, tokens, capacity));
    std::set<int64_t> seen;
    for (int64_t s = 0; s < world; ++s) {
      // Worst dropless split for one source: all k·T rows over its local experts.
      const int64_t per_expert = capacity ? capacity : tokens;
      int64_t psum = 0;
      for (int64_t e = 0; e < local; ++e) {
        const int64_t rows = capacity ? capacity : (e == 0 ? per_expert : tokens * std::min(k, local) - per_expert);
        const int64_t first = l.recv_row(s, e, psum, 0);
        EXPECT_EQ(first % WorkspaceLayout::kSegmentAlign, 0);
        EXPECT_LE(first + WorkspaceLayout::segment_span(rows), (s + 1) * l.rows_per_source);
        for (int64_t r = 0; r < WorkspaceLayout::segment_span(rows); ++r) {
          const int64_t row = l.recv_row(s, e, psum, r);
          EXPECT_GE(row, s * l.rows_per_source);
          EXPECT_LT(row, (s + 1) * l.rows_per_source);
          EXPECT_TRUE(seen.insert(row).second) << "row " << row << " used twice";
        }
        psum += WorkspaceLayout::segment_span(rows);
      }
    }
  }
}

TEST(Layout, IndexFunctionsStayInsideTheirSections) {
  WorkspaceLayout l = WorkspaceLayout::make(params(8, 4, 8, 300, 0));
  EXPECT_LT(l.recv_flag_index(7, 3) * 8, l.recv_flags.bytes);
  EXPECT_LT(l.ret_row(299, 7) * 48 * 2, l.ret_rows.bytes);
  EXPECT_LT(l.ret_flag_index(31, l.m_tiles - 1) * 8, l.ret_flags.bytes);
  EXPECT_LT(l.counter_index(7, 3, l.m_tiles - 1) * 4, l.counters.bytes);
  EXPECT_GE(l.task_capacity * WorkspaceLayout::kTaskBytes, 0);
}

TEST(Flags, EpochAndCountPackAndWrapSafely) {
  const uint64_t f = make_flag(0xfffffffeu, 1234);
  EXPECT_EQ(flag_epoch(f), 0xfffffffeu);
  EXPECT_EQ(flag_count(f), 1234u);
  EXPECT_TRUE(epoch_reached(5, 5));
  EXPECT_TRUE(epoch_reached(6, 5));
  EXPECT_FALSE(epoch_reached(4, 5));
  EXPECT_TRUE(epoch_reached(1, 0xffffffffu));   // wrapped past
  EXPECT_FALSE(epoch_reached(0xffffffffu, 1));  // not yet wrapped
}

TEST(Planner, PlansFitSharedMemoryAndCoverTheShape) {
  MoeConfig c;
  c.hidden_size = 2048;
  c.ffn_size = 2048;
  c.num_experts = 64;
  c.top_k = 2;
  c.dtype = DType::kBFloat16;
  TilePlan plan = make_plan(c, 16384, DeviceInfo{});
  EXPECT_LE(plan.smem_bytes, DeviceInfo{}.smem_per_block);
  EXPECT_GE(plan.stages, 2);
  EXPECT_EQ(plan.num_blocks, 132);
  EXPECT_EQ(plan.n0_tiles * plan.block_n0, 2048);
  EXPECT_TRUE(plan.use_wgmma);
  EXPECT_FALSE(plan.to_string().empty());
  TilePlan decode = make_plan(c, 128, DeviceInfo{.sm_count = 114, .cc_major = 8});
  EXPECT_EQ(decode.block_m, 64);
  EXPECT_FALSE(decode.use_wgmma);
  EXPECT_EQ(decode.num_blocks, 114);
  EXPECT_THROW(make_plan(c, 16, DeviceInfo{.smem_per_block = 4096}), Error);
  EXPECT_THROW(make_plan(c, -1, DeviceInfo{}), Error);
}

// The backward's saved state: sections in order, no overlap, every section of 256 B or more per
// token on a 256-B boundary for any T, total = fixed + T * per_token, and one size pinned (the
// same number is pinned in tests/python/test_ops_forward.py against the Python mirror).
TEST(SavedLayout, LargeSectionsAlignedForEveryTokenCount) {
  MoeConfig c;
  c.num_experts = 8; c.top_k = 2; c.hidden_size = 4096; c.ffn_size = 14336;
  c.ffn = FfnKind::kSwiGlu; c.dtype = DType::kBFloat16;
  MoeConfig odd = c;  // sizes that are no multiple of anything
  odd.num_experts = 5; odd.top_k = 3; odd.hidden_size = 40; odd.ffn_size = 72; odd.gate = GateKind::kNoisyTopK;
  MoeConfig jitter = odd;
  jitter.gate = GateKind::kSwitchTop1; jitter.top_k = 1; jitter.jitter_eps = 0.01; jitter.hidden_size = 96;
  for (const MoeConfig& cfg : {c, odd, jitter}) {
    for (int64_t T : {0, 1, 3, 17, 1000, 8192}) {
      const SavedLayout l = SavedLayout::make(cfg, T);
      EXPECT_EQ(l.total, l.fixed_bytes + T * l.per_token_bytes);
      EXPECT_EQ(l.fixed_bytes % SavedLayout::kAlign, 0);
      int64_t end = 0;
      for (const SavedLayout::Span* s : {&l.routed, &l.kept_count, &l.row_offsets, &l.logits, &l.probs, &l.noise_pre,
                                         &l.stats, &l.selected, &l.idx, &l.weight, &l.row_of, &l.row_source, &l.kept,
                                         &l.router_input, &l.xperm, &l.pre, &l.act, &l.out_rows}) {
        EXPECT_GE(s->offset, end) << "overlap";
        EXPECT_EQ(s->offset % 16, 0);
        if (T > 0 && s->bytes >= T * SavedLayout::kAlign) EXPECT_EQ(s->offset % SavedLayout::kAlign, 0) << T;
        end = s->offset + s->bytes;
      }
      EXPECT_LE(end, l.total);
      const int64_t es = 2, k = cfg.top_k;
      EXPECT_GE(l.xperm.bytes, T * k * cfg.hidden_size * es);
      EXPECT_GE(l.pre.bytes, T * k * cfg.ffn_in_width() * es);
      EXPECT_GE(l.act.bytes, T * k * cfg.ffn_size * es);
    }
  }
  EXPECT_EQ(SavedLayout::make(c, 8192).total, 1679819008);
}

TEST(Noise, DeterministicUniformAndNormal) {
  EXPECT_EQ(noise::hash(1, 2, 3, 4), noise::hash(1, 2, 3, 4));
  EXPECT_NE(noise::hash(1, 2, 3, 4), noise::hash(1, 2, 3, 5));
  EXPECT_NE(noise::hash(1, 2, 3, 4), noise::hash(2, 2, 3, 4));
  double sum = 0, sum_sq = 0, nsum = 0, nsum_sq = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double u = noise::uniform(9, noise::kGShardSecond, static_cast<uint64_t>(i), 0);
    ASSERT_GT(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    sum_sq += u * u;
    const double z = noise::normal(9, noise::kNoisyGate, static_cast<uint64_t>(i), 3);
    nsum += z;
    nsum_sq += z * z;
  }
  EXPECT_NEAR(sum / n, 0.5, 0.01);
  EXPECT_NEAR(sum_sq / n - 0.25, 1.0 / 12.0 - 0.0, 0.01);
  EXPECT_NEAR(nsum / n, 0.0, 0.03);
  EXPECT_NEAR(nsum_sq / n, 1.0, 0.04);
}

}  // namespace
}  // namespace fusedmoe
