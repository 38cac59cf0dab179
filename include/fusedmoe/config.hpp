// fusedmoe/config.hpp — MoeConfig: the shapes, kinds and world of one MoE layer.
//
// Every field is a runtime value. validate() throws fusedmoe::Error naming the first bad field;
// problems() lists all of them. Test: tests/cpp/test_config.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fusedmoe {

// Expert FFN. MLPs: y = act(x·W1 + b1)·W2 + b2 with W1 [H, I].
// Gated (GLU) kinds: W1 is [H, 2I]; columns [0, I) are the gate half g, [I, 2I) the up half u;
// the activation is act(g) ⊙ u. GELU is the exact (erf) GELU.
enum class FfnKind { kReluMlp, kGeluMlp, kSwiGlu, kGeGlu };

// Router. All gates compute logits l = x·Wgᵀ (+ bg) in at least fp32.
//  kSoftmaxTopK : p = softmax(l); the k largest p; w = p (renormalised if asked).
//  kSigmoidTopK : s = sigmoid(l); the k largest s + selection_bias (DeepSeek-V3: the bias steers
//                 selection only and gets no gradient); w = s (renormalised if asked).
//  kNoisyTopK   : in training l' = l + ε ⊙ softplus(x·Wnᵀ), ε ~ N(0,1); then as softmax top-k on
//                 l' (Shazeer et al. 2017, renormalised = softmax over the kept logits).
//  kSwitchTop1  : k = 1; in training the router sees x ⊙ U(1-jitter_eps, 1+jitter_eps)
//                 (multiplicative jitter of Switch Transformer); w = p, never renormalised.
//  kGShardTop2  : k = 2; softmax top-2; w renormalised over the two; in training the second
//                 expert is dropped when 2·w₂ < u, u ~ U(0,1) (GShard random routing).
// Noise comes from a counter-based generator keyed by (seed, global token index, ...), so every
// backend draws the same numbers (see fusedmoe/noise.hpp).
enum class GateKind { kSoftmaxTopK, kSigmoidTopK, kNoisyTopK, kSwitchTop1, kGShardTop2 };

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Precision of the expert GEMMs for fp32 data on GPUs: TF32 tensor cores or exact fp32.
enum class Fp32Math { kTf32, kExact };

struct MoeConfig {
  int64_t hidden_size = 0;         // H
  int64_t ffn_size = 0;            // I (per routed expert)
  int64_t num_experts = 0;         // E (routed experts)
  int64_t top_k = 1;               // k, 1 <= k <= E
  FfnKind ffn = FfnKind::kSwiGlu;
  GateKind gate = GateKind::kSoftmaxTopK;
  bool renormalize = true;         // divide the k weights by their sum
  // Capacity. 0 = dropless. Otherwise each expert accepts at most
  //   C = ceil(capacity_factor · T_r · k / E)
  // rows from each source rank r holding T_r tokens (GShard's per-group capacity: every rank
  // decides its drops from its own tokens, with no exchange of counts). Slots are granted in
  // choice-major order: all first choices in token order, then all second choices, ... (so a
  // token's first choice wins over another token's second). A dropped (token, j) contributes 0.
  double capacity_factor = 0.0;
  int64_t num_shared_experts = 0;  // S experts applied to every token, weight 1
  int64_t shared_ffn_size = 0;     // I of each shared expert; 0 = ffn_size
  bool expert_bias = false;        // b1 [E, N1], b2 [E, H] (and the shared experts' biases)
  bool gate_bias = false;          // bg [E], trained like Wg
  double jitter_eps = 1e-2;        // kSwitchTop1 jitter half-width
  DType dtype = DType::kFloat32;
  Fp32Math fp32_math = Fp32Math::kTf32;
  int world_size = 1;              // W ranks of the expert-parallel group
  int rank = 0;                    // this process's rank (emulated backends run all ranks)
  // expert_placement[e] = rank that owns expert e. Empty = contiguous blocks of ceil(E/W).
  std::vector<int> expert_placement;

  // --- derived quantities -------------------------------------------------------------------
  bool gated() const { return ffn == FfnKind::kSwiGlu || ffn == FfnKind::kGeGlu; }
  int64_t ffn_in_width() const { return gated() ? 2 * ffn_size : ffn_size; }  // N1
  int64_t shared_size() const { return shared_ffn_size > 0 ? shared_ffn_size : ffn_size; }
  int64_t shared_in_width() const { return gated() ? 2 * shared_size() : shared_size(); }
  bool dropless() const { return capacity_factor == 0.0; }
  // Rows each expert accepts from one source rank holding num_tokens tokens.
  int64_t capacity(int64_t num_tokens) const;
  int expert_rank(int64_t expert_idx) const;
  int64_t expert_local_index(int64_t expert_idx) const;
  int64_t num_local_experts(int rank_idx) const;
  int64_t max_local_experts() const;
  // Global expert index of local expert local_idx on rank_idx.
  int64_t global_expert(int rank_idx, int64_t local_idx) const;

  std::vector<std::string> problems() const;  // empty when valid
  void validate() const;                      // throws fusedmoe::Error listing problems()
  std::string summary() const;                // one line
};

std::string to_string(FfnKind kind);
std::string to_string(GateKind kind);
std::string to_string(DType dtype);
std::string to_string(Fp32Math math);
// Parsers accept the to_string names (and a few aliases); they throw naming `argument`.
FfnKind parse_ffn_kind(std::string_view text, std::string_view argument = "ffn");
GateKind parse_gate_kind(std::string_view text, std::string_view argument = "gate");
DType parse_dtype(std::string_view text, std::string_view argument = "dtype");
size_t dtype_size(DType dtype);

// Sets one field from its name (as in MoeConfig) and a textual value; throws naming the key.
void set_config_field(MoeConfig& config, std::string_view key, std::string_view value);
// Parses "key = value" lines (# comments) into config; throws naming the file and line.
void load_config_file(MoeConfig& config, const std::string& path);
// "key=value;key=value" with every field; parse_config_string(to_config_string(c)) == c.
std::string to_config_string(const MoeConfig& config);
MoeConfig parse_config_string(std::string_view text);

}  // namespace fusedmoe
