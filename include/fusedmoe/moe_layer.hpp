// fusedmoe/moe_layer.hpp — the C++ API: a MoE layer built from a config and weight views.
//
//   fusedmoe::MoeConfig cfg{.hidden_size = 512, .ffn_size = 1024, .num_experts = 8, .top_k = 2};
//   fusedmoe::MoeLayer layer(cfg, weights);                 // weights: MoeWeights of views
//   layer.forward({.x = x}, {.y = y, .topk_idx = idx});     // y [T, H]
//   layer.backward({.x = x, .dy = dy}, {.dx = dx, .d_w1 = dw1, ...});
//
// All tensors are dense row-major views the caller owns; the layer never allocates them.
// Shapes (E experts, S shared, H hidden, I ffn, N1 = I or 2I for gated FFNs, T tokens):
//   gate_weight [E, H]   gate_bias [E]   noise_weight [E, H]   selection_bias [E]
//   w1 [E, H, N1]  b1 [E, N1]  w2 [E, I, H]  b2 [E, H]           (y_e = act(x·w1 + b1)·w2 + b2)
//   shared_w1 [S, H, Ns1]  shared_b1 [S, Ns1]  shared_w2 [S, Is, H]  shared_b2 [S, H]
// With world_size W > 1 the call holds the tokens of all W ranks (emulated ranks in one process):
// x is the concatenation, tokens_per_rank says how many belong to each rank, and the weights are
// those of all E experts; expert e is computed by rank config.expert_rank(e).
// Errors: fusedmoe::Error naming the argument, its value and what is expected.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fusedmoe/config.hpp"

namespace fusedmoe {

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;

  bool defined() const { return data != nullptr; }
  int64_t numel() const;
  std::string shape_string() const;
};

struct MoeWeights {
  TensorView gate_weight, gate_bias, noise_weight, selection_bias;
  TensorView w1, b1, w2, b2;
  TensorView shared_w1, shared_b1, shared_w2, shared_b2;
};

struct ForwardArgs {
  TensorView x;                          // [T, H]
  std::vector<int64_t> tokens_per_rank;  // W entries summing to T; empty = T split evenly
  bool training = false;                 // noisy / jitter / random routing only in training
  uint64_t seed = 0;                     // noise key (fusedmoe/noise.hpp)
  int64_t token_offset = 0;              // global index of x's first token, for the noise key
  const int32_t* forced_topk_idx = nullptr;  // [T, k]: use this selection instead of top-k
  void* stream = nullptr;                // cudaStream_t for the CUDA backend (nullptr = default)
};

// Every pointer is optional except y. Pointers (and views) live where the backend computes:
// host memory for the cpu and naive backends, device memory for the cuda backend (which then
// never synchronises with the host: aux_loss and z_loss are doubles in device memory).
struct ForwardOutputs {
  TensorView y;                    // [T, H]
  int32_t* topk_idx = nullptr;     // [T, k] selected experts; -1 = no expert (GShard drop)
  TensorView topk_weight;          // [T, k] gate weights (before capacity drops)
  uint8_t* kept = nullptr;         // [T, k] 1 when (t, j) was computed, 0 when dropped
  int64_t* expert_counts = nullptr;  // [E] assignments before capacity
  int64_t* kept_counts = nullptr;    // [E] assignments computed
  double* aux_loss = nullptr;      // E · Σ_e f_e · P_e   (Switch / GShard load balancing)
  double* z_loss = nullptr;        // mean_t logsumexp(logits_t)²   (router z-loss)
  // cuda backends: the same two losses as one element each in the layer's dtype (rounded through
  // fp32), e.g. straight into the 0-dim tensors of the torch op. Optional.
  void* aux_loss_value = nullptr;
  void* z_loss_value = nullptr;
  // Device memory of MoeLayer::saved_bytes(T) bytes (when that is > 0): the forward keeps in it
  // what backward needs (fusedmoe/saved_state.hpp), for BackwardArgs::saved.
  void* saved = nullptr;
};

struct BackwardArgs {
  ForwardArgs forward;  // the same inputs as the forward call (routing is recomputed unless `saved`)
  TensorView dy;        // [T, H]
  double d_aux = 0.0;   // upstream gradient of aux_loss
  double d_z = 0.0;     // upstream gradient of z_loss
  // cuda backend: when given, the upstream gradients are read from device memory instead (so a
  // training step never synchronises with the host).
  const double* d_aux_device = nullptr;
  const double* d_z_device = nullptr;
  // ForwardOutputs::saved of the forward call on the same inputs: backward then reads routing,
  // rows and activations from it instead of recomputing the forward. Null: recomputed.
  const void* saved = nullptr;
};

// Every view is optional; given ones are overwritten with the gradient.
struct MoeGrads {
  TensorView dx;
  TensorView d_gate_weight, d_gate_bias, d_noise_weight;
  TensorView d_w1, d_b1, d_w2, d_b2;
  TensorView d_shared_w1, d_shared_b1, d_shared_w2, d_shared_b2;
};

struct LoadStats {
  // Per-expert sums are kept by the host backends; the cuda backend leaves them zero (its counts
  // stay on the device, in ForwardOutputs::expert_counts / kept_counts).
  std::vector<int64_t> routed;   // [E] assignments before capacity, summed over calls
  std::vector<int64_t> kept;     // [E] assignments computed
  int64_t tokens = 0;            // tokens seen
  int64_t calls = 0;
};

enum class Backend {
  kAuto,   // CUDA when built with it and a device is present, CPU otherwise
  kCpu,    // the multi-threaded CPU backend (the oracle), emulating W ranks
  kNaive,  // deliberately naive loops over tokens and experts (cross-check)
  kCuda,
  kThreads,  // the fused layer's protocol with one CPU thread per rank (forward; backward = cpu)
  kFused,    // the single persistent GPU kernel (forward; W ranks emulated on one GPU); backward = cuda
};
std::string to_string(Backend backend);
Backend parse_backend(const std::string& text);

class BackendImpl;  // one per backend, in src/

class MoeLayer {
 public:
  MoeLayer(MoeConfig config, MoeWeights weights, Backend backend = Backend::kAuto);
  ~MoeLayer();
  MoeLayer(MoeLayer&&) noexcept;
  MoeLayer& operator=(MoeLayer&&) noexcept;

  void set_weights(MoeWeights weights);  // checked like the constructor's
  void forward(const ForwardArgs& args, const ForwardOutputs& out);
  void backward(const BackwardArgs& args, const MoeGrads& grads);

  // Bytes of the symmetric workspace of one rank for calls of up to max_tokens_per_rank tokens.
  size_t workspace_size(int64_t max_tokens_per_rank) const;
  // Bytes of ForwardOutputs::saved for a forward of num_tokens tokens; 0 where this backend's
  // backward always recomputes (cpu, naive, threads, fused).
  size_t saved_bytes(int64_t num_tokens) const;
  const MoeConfig& config() const { return config_; }
  const MoeWeights& weights() const { return weights_; }
  Backend backend() const { return backend_; }
  const LoadStats& load_stats() const { return stats_; }
  void reset_load_stats();

  static bool cuda_available();

 private:
  void check_forward(const ForwardArgs& args, const char* what) const;
  std::vector<int64_t> tokens_of_ranks(int64_t num_tokens, const std::vector<int64_t>& requested) const;
  MoeConfig config_;
  MoeWeights weights_;
  Backend backend_;
  std::unique_ptr<BackendImpl> impl_;
  LoadStats stats_;
};

// Splits T tokens into W rank shares (empty request = even split); validates a given split.
std::vector<int64_t> resolve_tokens_per_rank(const MoeConfig& config, int64_t num_tokens,
                                             const std::vector<int64_t>& requested);

}  // namespace fusedmoe
