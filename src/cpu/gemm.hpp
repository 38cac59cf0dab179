// src/cpu/gemm.hpp — a small row-major host GEMM for the CPU backend.
//
// C[M,N] (+)= op(A)[M,K] · op(B)[K,N], op = identity or transpose of the stored matrix.
// Written here rather than taken from a BLAS because the CPU backend is the project's oracle and
// must build everywhere with no extra dependency; it is only as fast as the CLI's default run and
// the tests need (a few GFLOP/s per core), never a performance path.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/thread_pool.hpp"

namespace fusedmoe::cpu {

struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;  // leading dimensions of the stored matrices
  bool trans_a = false;               // A stored [K, M]
  bool trans_b = false;               // B stored [N, K]
  bool accumulate = false;            // C += instead of C =
  bool parallel = true;               // split rows of C over the pool
};

template <class T>
void gemm(const GemmArgs& g, const T* a, const T* b, T* c) {
  if (g.m <= 0 || g.n <= 0) return;
  const T* b_rows = b;
  int64_t ldb = g.ldb;
  std::vector<T> b_copy;
  if (g.trans_b) {  // make B row-major [K, N] so that the inner loop runs over contiguous N
    b_copy.resize(static_cast<size_t>(g.k * g.n));
    for (int64_t j = 0; j < g.n; ++j)
      for (int64_t p = 0; p < g.k; ++p) b_copy[static_cast<size_t>(p * g.n + j)] = b[j * g.ldb + p];
    b_rows = b_copy.data();
    ldb = g.n;
  }
  auto rows = [&](int64_t row_begin, int64_t row_end) {
    constexpr int64_t kBlockK = 128;
    for (int64_t i = row_begin; i < row_end; ++i) {
      T* c_row = c + i * g.ldc;
      if (!g.accumulate) std::fill(c_row, c_row + g.n, T(0));
    }
    for (int64_t p0 = 0; p0 < g.k; p0 += kBlockK) {
      const int64_t p1 = std::min(g.k, p0 + kBlockK);
      for (int64_t i = row_begin; i < row_end; ++i) {
        T* c_row = c + i * g.ldc;
        for (int64_t p = p0; p < p1; ++p) {
          const T a_ip = g.trans_a ? a[p * g.lda + i] : a[i * g.lda + p];
          const T* b_row = b_rows + p * ldb;
          for (int64_t j = 0; j < g.n; ++j) c_row[j] += a_ip * b_row[j];
        }
      }
    }
  };
  const int64_t work = g.m * g.n * std::max<int64_t>(g.k, 1);
  if (g.parallel && work > (1 << 16)) {
    parallel_for(g.m, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, g.n * g.k)));
  } else {
    rows(0, g.m);
  }
}

}  // namespace fusedmoe::cpu
