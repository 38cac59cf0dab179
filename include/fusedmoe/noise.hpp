// fusedmoe/noise.hpp — counter-based random numbers shared by every backend.
//
// The noisy gate, Switch jitter and GShard random routing need random numbers that the CPU
// oracle, the GPU stages and the fused kernel draw identically. A value is a pure function of
// (seed, stream, global token index, column): no state, no ordering, host and device alike.
// Test: tests/cpp/test_layout.cpp (NoiseTest).
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedmoe/macros.hpp"

namespace fusedmoe::noise {

enum Stream : uint64_t { kNoisyGate = 1, kSwitchJitter = 2, kGShardSecond = 3 };

FUSEDMOE_HD uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

FUSEDMOE_HD uint64_t hash(uint64_t seed, uint64_t stream, uint64_t token_idx, uint64_t column) {
  uint64_t h = mix64(seed ^ (stream * 0xD1B54A32D192ED03ull));
  h = mix64(h ^ token_idx);
  return mix64(h ^ (column * 0x8CB92BA72F3D8DD7ull));
}

// Uniform in the open interval (0, 1), 53 random bits.
FUSEDMOE_HD double uniform(uint64_t seed, uint64_t stream, uint64_t token_idx, uint64_t column) {
  uint64_t bits = hash(seed, stream, token_idx, column) >> 11;
  return (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller from two uniforms of the same (token, column).
FUSEDMOE_HD double normal(uint64_t seed, uint64_t stream, uint64_t token_idx, uint64_t column) {
  double u1 = uniform(seed, stream, token_idx, 2 * column);
  double u2 = uniform(seed, stream, token_idx, 2 * column + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace fusedmoe::noise
