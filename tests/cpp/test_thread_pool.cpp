// tests/cpp/test_thread_pool.cpp — the CPU backend's thread pool: coverage, nesting, errors.
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "cpu/thread_pool.hpp"

namespace fusedmoe::cpu {
namespace {

TEST(ThreadPool, CoversEveryIndexOnceIncludingNestedCalls) {
  for (int64_t n : {0, 1, 7, 1000}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        hits[static_cast<size_t>(i)]++;
        parallel_for(3, [&](int64_t, int64_t) {});  // nested: runs inline
      }
    });
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
  }
}

TEST(ThreadPool, PropagatesExceptions) {
  EXPECT_THROW(parallel_for(100, [](int64_t, int64_t e) { if (e == 100) throw std::runtime_error("x"); }),
               std::runtime_error);
  std::atomic<int64_t> sum{0};
  parallel_for(100, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) sum += i; });
  EXPECT_EQ(sum.load(), 4950);
}

}  // namespace
}  // namespace fusedmoe::cpu
