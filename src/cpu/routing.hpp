// src/cpu/routing.hpp — the router of the CPU backend: logits, noise, probabilities, top-k,
// weights, capacity slots and balance losses, with its backward. Computed in fp64 whatever the
// layer's dtype. Semantics: fusedmoe/config.hpp (GateKind, capacity_factor).
#pragma once

#include <cstdint>
#include <vector>

#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe::cpu {

struct Routing {
  int64_t num_tokens = 0, num_experts = 0, top_k = 0;
  std::vector<double> router_input;  // [T, H] x, or x ⊙ jitter (Switch in training)
  std::vector<double> jitter;        // [T, H] multiplicative jitter (Switch in training), else empty
  std::vector<double> noise_pre;     // [T, E] x·Wnᵀ (noisy gate), else empty
  std::vector<double> noise_eps;     // [T, E] standard normal draws (noisy gate in training)
  std::vector<double> logits;        // [T, E] logits the probabilities are computed from
  std::vector<double> probs;         // [T, E] softmax(logits), or sigmoid(logits)
  std::vector<double> lse;           // [T]    logsumexp(logits)
  std::vector<int32_t> selected;     // [T, k] chosen experts before GShard's random drop
  std::vector<int32_t> idx;          // [T, k] experts used; -1 = none
  std::vector<double> weight;        // [T, k] gate weights (0 where idx = -1)
  std::vector<double> renorm_sum;    // [T]    Σ of the selected scores (1 when not renormalised)
  std::vector<uint8_t> kept;         // [T, k] 1 when computed (not dropped by capacity)
  std::vector<int64_t> slot;         // [T, k] row within its (source rank, expert) segment
  std::vector<int64_t> routed_count; // [E]
  std::vector<int64_t> kept_count;   // [W, E]
  std::vector<int64_t> rank_begin;   // [W + 1] token range of each rank
  double aux_loss = 0.0, z_loss = 0.0;
};

// Reads x and the gate weights as the layer's dtype.
Routing route(const MoeConfig& config, const MoeWeights& weights, const ForwardArgs& args,
              const std::vector<int64_t>& tokens_per_rank);

// dweight [T, k]: dL/d(gate weight) of every (t, j) (0 where not kept). Produces dL/dx of the
// router path (added into dx_router [T, H], fp64) and writes the gate parameters' gradients.
void route_backward(const MoeConfig& config, const MoeWeights& weights, const Routing& routing,
                    const std::vector<double>& dweight, double d_aux, double d_z,
                    std::vector<double>& dx_router, const MoeGrads& grads);

bool renormalises(const MoeConfig& config);

// For one source rank: per global expert e, the segment spans (WorkspaceLayout::segment_span of
// the rows) the source sends to e's owner for the owner's local experts before e (the psum of
// layout.recv_row), from the source's kept counts.
std::vector<int64_t> dispatch_psum(const MoeConfig& config, const Routing& routing, int source);

// Writes the routing outputs a forward call asked for (indices, weights, kept, counts, losses).
void write_routing_outputs(const MoeConfig& config, const Routing& routing, const ForwardOutputs& out);

}  // namespace fusedmoe::cpu
