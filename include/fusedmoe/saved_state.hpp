// fusedmoe/saved_state.hpp — what a forward keeps for its backward (cuda backend), so that
// backward does not recompute the router, the dispatch and the two expert GEMMs.
//
// One device buffer of SavedLayout::total bytes holds the routing (logits, probabilities, the
// selection, the expert-ordered row map), the expert-ordered input rows, the expert FFN's
// pre-activation and activation and its output rows. Every section is `fixed` or
// `T · per-token` bytes, each rounded up to 16 B, so the total is fixed + T · per_token: torch's
// fake kernel computes it from a symbolic T (python/fusedmoe/_ops.py mirrors `make`; a test
// compares the two). Row sections hold T · k rows (the most a forward can keep).
//
// Alignment: the sections of 256 B or more per token (the rows the GEMMs load and store by TMA,
// the jitter's router input) start on 256 B for every T: the fixed part is padded to 256 B, and
// before such a section the per-token bytes so far are padded to a multiple of 256, its own
// rounded up to one (the buffer itself comes 512-B aligned from torch's allocator). With 16-B
// sections only, mixtral's rows began 80 B past a 128-B line: every row segment of a TMA load or
// store touched one line more, and its stores wrote partial sectors.
#pragma once

#include <cstdint>

#include "fusedmoe/config.hpp"

namespace fusedmoe {

struct SavedLayout {
  struct Span {
    int64_t offset = 0, bytes = 0;
  };
  // fixed: int64 [E], [E], [E + 1]
  Span routed, kept_count, row_offsets;
  // per token: fp32 [T, E] x 3 (noise_pre: noisy gate only); fp32 lse | prob_sum | renorm_sum
  // [T] each; int32 [T, k] x 5; uint8 [T, k]; fp32 [T, H] (Switch router input with jitter)
  Span logits, probs, noise_pre, stats, selected, idx, weight, row_of, row_source, kept, router_input;
  // per token, rows of the layer's dtype: [T·k, H], [T·k, N1], [T·k, I], [T·k, H]
  Span xperm, pre, act, out_rows;
  int64_t fixed_bytes = 0, per_token_bytes = 0, total = 0;
  static constexpr int64_t kAlign = 256;  // start of every large section (see above)

  static SavedLayout make(const MoeConfig& c, int64_t num_tokens) {
    SavedLayout l;
    const int64_t T = num_tokens, E = c.num_experts, k = c.top_k, H = c.hidden_size;
    const int64_t es = static_cast<int64_t>(dtype_size(c.dtype));
    auto round_up = [](int64_t b, int64_t to) { return (b + to - 1) / to * to; };
    auto round16 = [&](int64_t b) { return round_up(b, 16); };
    int64_t offset = 0;
    auto fixed = [&](Span& s, int64_t bytes) {
      s = {offset, round16(bytes)};
      offset += s.bytes;
      l.fixed_bytes += s.bytes;
    };
    fixed(l.routed, 8 * E);
    fixed(l.kept_count, 8 * E);
    fixed(l.row_offsets, 8 * (E + 1));
    offset = l.fixed_bytes = round_up(l.fixed_bytes, kAlign);
    auto per_token = [&](Span& s, int64_t bytes_per_token) {
      int64_t bytes = round16(bytes_per_token);
      if (bytes >= kAlign) {  // pad the per-token bytes so far, then this section's own
        const int64_t pad = round_up(l.per_token_bytes, kAlign) - l.per_token_bytes;
        offset += T * pad;
        l.per_token_bytes += pad;
        bytes = round_up(bytes, kAlign);
      }
      s = {offset, T * bytes};
      offset += s.bytes;
      l.per_token_bytes += bytes;
    };
    per_token(l.logits, 4 * E);
    per_token(l.probs, 4 * E);
    per_token(l.noise_pre, c.gate == GateKind::kNoisyTopK ? 4 * E : 0);
    per_token(l.stats, 12);
    per_token(l.selected, 4 * k);
    per_token(l.idx, 4 * k);
    per_token(l.weight, 4 * k);
    per_token(l.row_of, 4 * k);
    per_token(l.row_source, 4 * k);
    per_token(l.kept, k);
    per_token(l.router_input, c.gate == GateKind::kSwitchTop1 && c.jitter_eps > 0 ? 4 * H : 0);
    per_token(l.xperm, k * H * es);
    per_token(l.pre, k * c.ffn_in_width() * es);
    per_token(l.act, k * c.ffn_size * es);
    per_token(l.out_rows, k * H * es);
    l.total = offset;
    return l;
  }
};

}  // namespace fusedmoe
