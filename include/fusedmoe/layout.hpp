// fusedmoe/layout.hpp — the one description of every buffer of a rank's symmetric workspace.
//
// Host code sizes the allocation from it, kernels (and the CPU oracle) address through it, and
// tests/cpp/test_layout.cpp checks that sizes add up, sections are aligned and never overlap,
// and worst cases fit. Every rank of a world has the same layout (a symmetric region), so an
// offset computed on one rank addresses the same buffer on a peer.
//
// Sections of rank q's workspace (element = the layer's dtype; "rows" are H elements):
//   launch_flags [max(W, 64)] uint64  {epoch:32 | 0}: launch_flags[s] is the last launch
//               rank s finished. Before its dispatch writes into any peer's heap, a rank waits
//               until every rank finished the previous launch, so that no rank consumes a
//               flag (or rows) of a later launch while it still runs an earlier one. At offset 0:
//               it never moves when the layout changes, so a new layout (whose flag sections
//               are cleared) keeps it.
//   recv_rows   [W sources][rows_per_source][H]   rows other ranks dispatched to q's experts.
//               Within one source's block rows are ordered by q's local expert, and every
//               (source, expert) segment starts on a kSegmentAlign-row boundary (its span is
//               segment_span(count)), so that a 16-row store that starts inside a segment
//               ends in its padding, never in the next segment (the Hopper kernel's GEMM0
//               epilogue writes whole 16-row boxes by TMA). Dropless: expert e_l starts at
//               psum_{e' < e_l} segment_span(count(source, e')), so the block needs at most
//               T_max · min(k, E_local) + (kSegmentAlign - 1) · E_local rows. Capacity mode:
//               expert e_l owns the fixed range [e_l · C', e_l · C' + C), C = capacity(T_max),
//               C' = segment_span(C).
//   recv_meta   [W sources][rows_per_source] int32  token·k + j of each received row, so that
//               the owner knows where in the source's ret_rows the result goes.
//   recv_flags  [W sources][E_local] uint64  {epoch:32 | row count:32}, raised by the source.
//   hidden      [W sources][rows_per_source][I] activation between the two GEMMs (scratch).
//   ret_rows    [T_max][k][H]   expert outputs of q's tokens, returned by the owning ranks;
//               (token, j) lives at row token·k + j.
//   ret_flags   [E][m_tiles] uint64 epoch flags, one per returned tile of BLOCK_M rows.
//   counters    [W][E_local][m_tiles] uint32 tile-completion counters (scratch).
//   task_queue  [task_capacity] 16-byte task records + head/tail words.
//
// Peers outside the load/store team (other nodes) are reached through GIN puts of registered
// memory, so a world with such peers (LayoutParams::gin) adds, for the rows and flags that
// would otherwise be stored straight into the peer's heap:
//   gin_sent    [W peers][kGinSlots] uint64  (right after launch_flags: it never moves either)
//               the value each signal of that peer last got from this rank. Signals only add,
//               so a flag word f is published as SignalAdd(f - last) and the peer's signal
//               then reads exactly f: dispatch, return and launch flags keep their
//               {epoch | count} meaning. Each signal has one writer (ids: gin_*_signal).
//   gin_signals [gin_signal_count(W)] uint64  (after gin_sent, fixed too) this rank's signals
//               when GIN is emulated on one GPU (tests); NCCL keeps the real ones.
//   out_rows    [W owners][rows_per_source][H]  rows for owner q at the within-source index
//   out_meta    [W owners][rows_per_source]     they will have in q's recv_rows / recv_meta;
//               one put per (owner, local expert) segment moves both.
//   out_ret     [W sources][rows_per_source][H] results of received rows, at their recv_rows
//               index (in segment order, not scattered by token), one put per segment into
//   ret_recv    [W owners][rows_per_source][H]  the source's block of this owner, at the index
//               the source's dispatch gave the row (combine reads (t, j) there).
#pragma once

#include <cstdint>

#include "fusedmoe/macros.hpp"

namespace fusedmoe {

struct LayoutParams {
  int64_t world_size = 1;
  int64_t max_local_experts = 1;   // E_local (max over ranks)
  int64_t num_experts = 1;         // E
  int64_t top_k = 1;
  int64_t hidden_size = 1;         // H
  int64_t ffn_size = 1;            // I
  int64_t max_tokens = 0;          // T_max: most tokens any rank holds in one call
  int64_t capacity = 0;            // rows per (source, expert); 0 = dropless
  int64_t element_size = 4;        // bytes of the layer's dtype
  int64_t block_m = 128;           // rows per tile
  bool gin = false;                // some peers are reached through GIN (see the file comment)
};

struct Section {
  int64_t offset = 0;  // bytes from the workspace base
  int64_t bytes = 0;
};

struct WorkspaceLayout {
  static constexpr int64_t kAlignment = 256;  // TMA needs 16 B, swizzled tiles 128 B
  static constexpr int64_t kTaskBytes = 16;
  static constexpr int64_t kMinLaunchSlots = 64;  // launch_flags slots of worlds up to 64 ranks
  static constexpr int64_t kSegmentAlign = 16;    // rows: segments of recv_rows / hidden start here
  // GIN signal ids, per rank: [W sources][kGinLocal] dispatch, [W owners][kGinLocal] return,
  // [W] launch. Fixed per (writer, slot) whatever the config, so a signal never changes writer.
  static constexpr int64_t kGinLocal = 256;       // local experts of a rank (E <= 256)
  static constexpr int64_t kGinSlots = 2 * kGinLocal + 1;  // signals one rank writes on one peer

  LayoutParams p;
  int64_t rows_per_source = 0;
  int64_t m_tiles = 0;        // ceil(T_max / block_m): tiles of one (source, expert) or token range
  int64_t task_capacity = 0;  // worst-case number of tasks of one launch
  Section launch_flags, gin_sent, gin_signals, recv_rows, recv_meta, recv_flags, hidden, ret_rows, ret_flags, counters, task_queue;
  Section out_rows, out_meta, out_ret, ret_recv;  // GIN only (bytes 0 otherwise)
  int64_t total_bytes = 0;

  FUSEDMOE_HD static int64_t align_up(int64_t value, int64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
  }

  FUSEDMOE_HD static WorkspaceLayout make(const LayoutParams& params) {
    WorkspaceLayout l;
    l.p = params;
    const int64_t k_local = params.top_k < params.max_local_experts ? params.top_k
                                                                    : params.max_local_experts;
    l.rows_per_source = params.capacity > 0
                            ? params.max_local_experts * segment_span(params.capacity)
                            : align_up(params.max_tokens * k_local + (kSegmentAlign - 1) * params.max_local_experts,
                                       kSegmentAlign);
    l.m_tiles = (params.max_tokens + params.block_m - 1) / params.block_m;
    // Every (source, local expert) segment contributes at most ceil(count / block_m) m-tiles,
    // and sum over experts of ceil(c_e / BM) <= rows / BM + E_local. Each m-tile is one GEMM
    // task of each GEMM; plus one dispatch and one combine task per token tile.
    const int64_t gemm_tiles = params.world_size *
                               ((l.rows_per_source + params.block_m - 1) / params.block_m +
                                params.max_local_experts);
    l.task_capacity = 2 * gemm_tiles + 2 * l.m_tiles + 1;
    int64_t cursor = 0;
    auto take = [&cursor](int64_t bytes) {
      Section s;
      s.offset = cursor;
      s.bytes = bytes;
      cursor = align_up(cursor + bytes, kAlignment);
      return s;
    };
    const int64_t row_bytes = params.hidden_size * params.element_size;
    l.launch_flags = take((params.world_size > kMinLaunchSlots ? params.world_size : kMinLaunchSlots) * 8);
    l.gin_sent = take(params.gin ? params.world_size * kGinSlots * 8 : 0);
    l.gin_signals = take(params.gin ? gin_signal_count(params.world_size) * 8 : 0);
    l.recv_rows = take(params.world_size * l.rows_per_source * row_bytes);
    l.recv_meta = take(params.world_size * l.rows_per_source * 4);
    l.recv_flags = take(params.world_size * params.max_local_experts * 8);
    l.hidden = take(params.world_size * l.rows_per_source * params.ffn_size * params.element_size);
    l.ret_rows = take(params.max_tokens * params.top_k * row_bytes);
    l.ret_flags = take(params.num_experts * l.m_tiles * 8);
    l.counters = take(params.world_size * params.max_local_experts * l.m_tiles * 4);
    l.task_queue = take(l.task_capacity * kTaskBytes + 16);
    const int64_t block_rows = params.gin ? params.world_size * l.rows_per_source : 0;
    l.out_rows = take(block_rows * row_bytes);
    l.out_meta = take(block_rows * 4);
    l.out_ret = take(block_rows * row_bytes);
    l.ret_recv = take(block_rows * row_bytes);
    l.total_bytes = cursor;
    return l;
  }

  // Rows a segment of `count` rows takes in recv_rows / hidden (whole kSegmentAlign blocks).
  FUSEDMOE_HD static int64_t segment_span(int64_t count) { return align_up(count, kSegmentAlign); }

  // Row index (in rows of H) inside recv_rows for row `row` of local expert `local_expert` sent
  // by `source`. `psum_before` = the segment spans (segment_span of the row counts) the source
  // sent to q's local experts before this one (ignored in capacity mode, where the range is
  // fixed).
  FUSEDMOE_HD int64_t recv_row(int64_t source, int64_t local_expert, int64_t psum_before,
                               int64_t row) const {
    const int64_t within = p.capacity > 0 ? local_expert * segment_span(p.capacity) + row : psum_before + row;
    return source * rows_per_source + within;
  }
  FUSEDMOE_HD int64_t recv_flag_index(int64_t source, int64_t local_expert) const {
    return source * p.max_local_experts + local_expert;
  }
  FUSEDMOE_HD int64_t launch_flag_index(int64_t rank) const { return rank; }

  // GIN signal ids on a rank: the dispatch flag of (source, local expert), the return flag of
  // (owner, local expert) — one per expert, its owner the writer — and the launch flag of a rank.
  FUSEDMOE_HD int64_t gin_dispatch_signal(int64_t source, int64_t local_expert) const {
    return source * kGinLocal + local_expert;
  }
  FUSEDMOE_HD int64_t gin_return_signal(int64_t owner, int64_t local_expert) const {
    return (p.world_size + owner) * kGinLocal + local_expert;
  }
  FUSEDMOE_HD int64_t gin_launch_signal(int64_t rank) const { return 2 * p.world_size * kGinLocal + rank; }
  FUSEDMOE_HD static int64_t gin_signal_count(int64_t world_size) { return world_size * kGinSlots; }
  // Where the writer keeps the last value it gave signal `signal` of `peer` (index into gin_sent
  // in uint64 words). The writer of a signal is fixed by its id, so the slot is its id's offset
  // within the writer's share: dispatch slot = local expert, return slot = kGinLocal + local,
  // launch slot = 2 kGinLocal.
  FUSEDMOE_HD int64_t gin_sent_dispatch(int64_t owner, int64_t local_expert) const {
    return owner * kGinSlots + local_expert;
  }
  FUSEDMOE_HD int64_t gin_sent_return(int64_t source, int64_t local_expert) const {
    return source * kGinSlots + kGinLocal + local_expert;
  }
  FUSEDMOE_HD int64_t gin_sent_launch(int64_t peer) const { return peer * kGinSlots + 2 * kGinLocal; }
  // Index (rows) in out_rows / out_meta of a row headed for recv_rows row `recv_index` of
  // `owner`, sent by `source`: the owner's block becomes the first index.
  FUSEDMOE_HD int64_t out_row(int64_t owner, int64_t source, int64_t recv_index) const {
    return owner * rows_per_source + (recv_index - source * rows_per_source);
  }
  // Index (rows) in the source's ret_recv of a result computed by `owner` for the row that sits
  // at `recv_index` of the owner's recv_rows (source's block).
  FUSEDMOE_HD int64_t ret_recv_row(int64_t owner, int64_t source, int64_t recv_index) const {
    return out_row(owner, source, recv_index);  // the same exchange of blocks, the other way
  }
  FUSEDMOE_HD int64_t ret_row(int64_t token_idx, int64_t choice) const {
    return token_idx * p.top_k + choice;
  }
  FUSEDMOE_HD int64_t ret_flag_index(int64_t expert_idx, int64_t m_tile) const {
    return expert_idx * m_tiles + m_tile;
  }
  FUSEDMOE_HD int64_t counter_index(int64_t source, int64_t local_expert, int64_t m_tile) const {
    return (source * p.max_local_experts + local_expert) * m_tiles + m_tile;
  }
};

// Flag word: epoch in the high 32 bits, payload (row count) in the low 32 bits.
FUSEDMOE_HD uint64_t make_flag(uint32_t epoch, uint32_t count) {
  return (static_cast<uint64_t>(epoch) << 32) | count;
}
FUSEDMOE_HD uint32_t flag_epoch(uint64_t flag) { return static_cast<uint32_t>(flag >> 32); }
FUSEDMOE_HD uint32_t flag_count(uint64_t flag) { return static_cast<uint32_t>(flag & 0xffffffffu); }
// Wrap-safe "epoch a is at or after b".
FUSEDMOE_HD bool epoch_reached(uint32_t seen, uint32_t expected) {
  return static_cast<int32_t>(seen - expected) >= 0;
}
// Epochs run 1, 2, ..., 0xffffffff, 1, ... (0 is fresh memory): the launch before `epoch`.
// For epoch 1 that is 0xffffffff, which fresh memory (0) has reached too.
FUSEDMOE_HD uint32_t previous_epoch(uint32_t epoch) { return epoch == 1u ? 0xffffffffu : epoch - 1u; }

}  // namespace fusedmoe
