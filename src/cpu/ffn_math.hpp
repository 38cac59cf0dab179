// src/cpu/ffn_math.hpp — scalar activation functions and their derivatives (host), shared by
// the CPU backend and the naive reference. GELU is the exact erf form.
#pragma once

#include <cmath>

#include "fusedmoe/config.hpp"

namespace fusedmoe::cpu {

inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.7071067811865476)); }
inline double gelu_grad(double x) {
  return 0.5 * (1.0 + std::erf(x * 0.7071067811865476)) +
         x * 0.3989422804014327 * std::exp(-0.5 * x * x);
}
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double silu(double x) { return x * sigmoid(x); }
inline double silu_grad(double x) {
  double s = sigmoid(x);
  return s * (1.0 + x * (1.0 - s));
}
inline double softplus(double x) { return x > 30.0 ? x : std::log1p(std::exp(x)); }

// The scalar activation of an FFN kind: relu / gelu for MLPs, silu / gelu for the gate half of
// gated kinds.
inline double activation(FfnKind kind, double x) {
  switch (kind) {
    case FfnKind::kReluMlp: return x > 0.0 ? x : 0.0;
    case FfnKind::kGeluMlp: return gelu(x);
    case FfnKind::kSwiGlu: return silu(x);
    case FfnKind::kGeGlu: return gelu(x);
  }
  return 0.0;
}
inline double activation_grad(FfnKind kind, double x) {
  switch (kind) {
    case FfnKind::kReluMlp: return x > 0.0 ? 1.0 : 0.0;
    case FfnKind::kGeluMlp: return gelu_grad(x);
    case FfnKind::kSwiGlu: return silu_grad(x);
    case FfnKind::kGeGlu: return gelu_grad(x);
  }
  return 0.0;
}

}  // namespace fusedmoe::cpu
