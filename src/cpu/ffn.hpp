// src/cpu/ffn.hpp — the expert FFN on host rows (forward and backward), shared by the CPU
// backend and the CPU-threads protocol backend. T = float or double; GEMMs through gemm.hpp.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/ffn_math.hpp"
#include "cpu/gemm.hpp"
#include "cpu/tensor_io.hpp"

namespace fusedmoe::cpu {


struct FfnShape {
  int64_t hidden, ffn, in_width;  // H, I, N1
  FfnKind kind;
};

// pre [rows, N1] = x·W1 + b1 ; act [rows, I] = activation(pre)
template <class T>
inline void ffn_up(const FfnShape& s, int64_t rows, const T* x, const T* w1, const T* b1, T* pre, T* act) {
  gemm<T>({.m = rows, .n = s.in_width, .k = s.hidden, .lda = s.hidden, .ldb = s.in_width, .ldc = s.in_width},
          x, w1, pre);
  const bool gated = s.in_width != s.ffn;
  for (int64_t r = 0; r < rows; ++r) {
    T* p = pre + r * s.in_width;
    if (b1) for (int64_t n = 0; n < s.in_width; ++n) p[n] += b1[n];
    for (int64_t i = 0; i < s.ffn; ++i) {
      const double a = activation(s.kind, static_cast<double>(p[i]));
      act[r * s.ffn + i] = static_cast<T>(gated ? a * static_cast<double>(p[s.ffn + i]) : a);
    }
  }
}

// out [rows, H] = act·W2 + b2
template <class T>
inline void ffn_down(const FfnShape& s, int64_t rows, const T* act, const T* w2, const T* b2, T* out) {
  gemm<T>({.m = rows, .n = s.hidden, .k = s.ffn, .lda = s.ffn, .ldb = s.hidden, .ldc = s.hidden}, act, w2, out);
  if (b2)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < s.hidden; ++h) out[r * s.hidden + h] += b2[h];
}

// Backward of one FFN over `rows` rows with upstream gradient g [rows, H]. Accumulates into
// dw1/db1/dw2/db2 (any may be null) and writes dx [rows, H].
template <class T>
inline void ffn_backward(const FfnShape& s, int64_t rows, const T* x, const T* pre, const T* act, const T* g,
                  const T* w1, const T* w2, T* dw1, T* db1, T* dw2, T* db2, T* dx) {
  if (rows == 0) return;
  std::vector<T> dact(static_cast<size_t>(rows * s.ffn)), dpre(static_cast<size_t>(rows * s.in_width));
  gemm<T>({.m = rows, .n = s.ffn, .k = s.hidden, .lda = s.hidden, .ldb = s.hidden, .ldc = s.ffn, .trans_b = true},
          g, w2, dact.data());
  if (dw2)
    gemm<T>({.m = s.ffn, .n = s.hidden, .k = rows, .lda = s.ffn, .ldb = s.hidden, .ldc = s.hidden,
             .trans_a = true, .accumulate = true}, act, g, dw2);
  if (db2)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < s.hidden; ++h) db2[h] += g[r * s.hidden + h];
  const bool gated = s.in_width != s.ffn;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < s.ffn; ++i) {
      const double da = static_cast<double>(dact[static_cast<size_t>(r * s.ffn + i)]);
      const double p = static_cast<double>(pre[r * s.in_width + i]);
      if (gated) {
        const double up = static_cast<double>(pre[r * s.in_width + s.ffn + i]);
        dpre[static_cast<size_t>(r * s.in_width + i)] = static_cast<T>(da * up * activation_grad(s.kind, p));
        dpre[static_cast<size_t>(r * s.in_width + s.ffn + i)] = static_cast<T>(da * activation(s.kind, p));
      } else {
        dpre[static_cast<size_t>(r * s.in_width + i)] = static_cast<T>(da * activation_grad(s.kind, p));
      }
    }
  if (dw1)
    gemm<T>({.m = s.hidden, .n = s.in_width, .k = rows, .lda = s.hidden, .ldb = s.in_width, .ldc = s.in_width,
             .trans_a = true, .accumulate = true}, x, dpre.data(), dw1);
  if (db1)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < s.in_width; ++n) db1[n] += dpre[static_cast<size_t>(r * s.in_width + n)];
  gemm<T>({.m = rows, .n = s.hidden, .k = s.in_width, .lda = s.in_width, .ldb = s.in_width, .ldc = s.hidden,
           .trans_b = true}, dpre.data(), w1, dx);
}

template <class T>
const T* ptr_or_null(const TensorView& v, int64_t offset) {
  return v.defined() ? typed<T>(v) + offset : nullptr;
}

}  // namespace fusedmoe::cpu
