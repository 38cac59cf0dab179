// tests/cpp/test_protocol.cpp — the fused layer's protocol on CPU threads (Backend::kThreads):
// equal to the CPU oracle for W ∈ {1, 2, 4, 8} with skewed routing, zero-token experts, capacity
// overflow and uneven token splits; back-to-back launches with epoch flags and no reset; a rank
// that never sends, or whose previous launch never ended, is reported within the timeout; the
// planted "flag before data" ordering is caught. Also built with -fsanitize=thread (target fusedmoe_protocol_tsan).
#include <gtest/gtest.h>

#include <chrono>

#include "protocol/threads_backend.hpp"
#include "random_case.hpp"

namespace fusedmoe::testing {
namespace {

struct OptionsScope {
  explicit OptionsScope(protocol::ThreadsOptions options) : saved(protocol::threads_options()) {
    protocol::set_threads_options(options);
  }
  ~OptionsScope() { protocol::set_threads_options(saved); }
  protocol::ThreadsOptions saved;
};

MoeConfig world_config(int world, GateKind gate = GateKind::kSoftmaxTopK) {
  MoeConfig c;
  c.hidden_size = 24;
  c.ffn_size = 16;
  c.num_experts = 16;
  c.top_k = gate == GateKind::kSwitchTop1 ? 1 : 2;
  c.gate = gate;
  c.ffn = FfnKind::kSwiGlu;
  c.dtype = DType::kFloat64;
  c.world_size = world;
  return c;
}

void expect_forward_equal(const MoeConfig& c, const HostWeights& w, const Inputs& in, const std::string& what) {
  Result threads = run_layer(c, w, in, Backend::kThreads, /*with_backward=*/false);
  Result oracle = run_layer(c, w, in, Backend::kCpu, /*with_backward=*/false);
  expect_same(threads, oracle, 1e-12, what);
}

void expect_worlds_equal_oracle(const std::string& label) {
  for (int world : {1, 2, 4, 8}) {
    for (double capacity : {0.0, 0.75}) {
      MoeConfig c = world_config(world);
      c.capacity_factor = capacity;
      c.num_shared_experts = 1;
      const uint64_t seed = test_seed() + static_cast<uint64_t>(world * 10) + (capacity > 0);
      HostWeights w = HostWeights::random(c, seed, 6.0);  // skewed routing
      Inputs in = make_inputs(c, 61, seed);
      in.tokens_per_rank.assign(static_cast<size_t>(world), 0);
      for (int64_t t = 0; t < 61; ++t) in.tokens_per_rank[static_cast<size_t>((t * t) % world)]++;  // uneven
      expect_forward_equal(c, w, in, label + " W=" + std::to_string(world) + " capacity=" + std::to_string(capacity));
    }
  }
}

TEST(Protocol, ThreadsEqualOracleForWorldSizes) { expect_worlds_equal_oracle("load/store peers"); }

// Peers on other nodes (GIN): rows staged and put per segment, flags as signals that add,
// results in segment order. Every rank alone (lsa_size 1) and teams of two.
TEST(Protocol, GinPeersEqualOracle) {
  for (int lsa : {1, 2}) {
    OptionsScope scope({.lsa_size = lsa});
    expect_worlds_equal_oracle("GIN, teams of " + std::to_string(lsa));
  }
}

TEST(Protocol, AllTokensToOneExpertAndEmptyRanks) {
  MoeConfig c = world_config(4);
  c.top_k = 1;
  HostWeights w = HostWeights::random(c, test_seed());
  Inputs in = make_inputs(c, 40, test_seed());
  in.tokens_per_rank = {0, 25, 0, 15};
  in.forced.assign(40, 13);  // all to expert 13 on rank 3
  expect_forward_equal(c, w, in, "one expert");
  c.capacity_factor = 1.0;  // and overflow
  expect_forward_equal(c, w, in, "one expert, capacity");
}

// `count` random cases from seed `base` on the threads backend against the oracle.
void expect_random_cases_equal_oracle(uint64_t base, int count) {
  for (int i = 0; i < count && !::testing::Test::HasFailure(); ++i) {
    RandomCase rc = make_random_case(base + static_cast<uint64_t>(i));
    SCOPED_TRACE("replay: FUSEDMOE_TEST_SEED case " + std::to_string(base + static_cast<uint64_t>(i)) + " " + rc.describe);
    Result threads = run_layer(rc.config, rc.weights, rc.inputs, Backend::kThreads, false);
    Result oracle = run_layer(rc.config, rc.weights, rc.inputs, Backend::kCpu, false);
    expect_same(threads, oracle, rc.config.dtype == DType::kFloat64 ? 1e-12 : 1e-6, rc.describe);
  }
}

TEST(Protocol, RandomCasesAgainstOracle) { expect_random_cases_equal_oracle(test_seed(), 150); }

// Back-to-back launches reuse the flags (and GIN signals, whose adds must keep reading as the
// flag word of the launch) with no reset; load/store peers, and teams of two over GIN.
void expect_back_to_back_launches_equal_oracle() {
  MoeConfig c = world_config(4);
  HostWeights w = HostWeights::random(c, test_seed(), 3.0);
  MoeLayer threads(c, w.views(), Backend::kThreads), oracle(c, w.views(), Backend::kCpu);
  for (int launch = 0; launch < 300; ++launch) {
    // A different batch (and so different counts) every launch, into the same flags.
    Inputs in = make_inputs(c, 8 + launch % 37, test_seed() + static_cast<uint64_t>(launch));
    in.tokens_per_rank = {static_cast<int64_t>(launch % 5), 3, 0, 8 + launch % 37 - 3 - launch % 5};
    HostTensor y1 = poisoned(c.dtype, {8 + launch % 37, c.hidden_size}), y2 = y1;
    threads.forward(forward_args(in), {.y = y1.view()});
    oracle.forward(forward_args(in), {.y = y2.view()});
    ASSERT_LE(relative_error(y1, y2), 1e-12) << "launch " << launch;
  }
}

TEST(Protocol, BackToBackLaunchesReuseFlagsWithEpochs) { expect_back_to_back_launches_equal_oracle(); }

TEST(Protocol, BackToBackLaunchesOverGin) {
  OptionsScope scope({.lsa_size = 2});
  expect_back_to_back_launches_equal_oracle();
}

TEST(Protocol, RandomCasesOverGin) {
  OptionsScope scope({.lsa_size = 1});
  expect_random_cases_equal_oracle(test_seed() + 1000, 60);
}

TEST(Protocol, SilentRankIsReportedWithinTimeout) {
  OptionsScope scope({.timeout = std::chrono::milliseconds(300), .silent_rank = 2});
  MoeConfig c = world_config(4);
  HostWeights w = HostWeights::random(c, test_seed());
  Inputs in = make_inputs(c, 40, test_seed());
  const auto start = std::chrono::steady_clock::now();
  try {
    run_layer(c, w, in, Backend::kThreads, false);
    FAIL() << "a rank that never sends must make the others time out";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("timed out"), std::string::npos) << message;
    EXPECT_NE(message.find("dispatch flag (source 2"), std::string::npos) << message;
    EXPECT_NE(message.find("expected epoch"), std::string::npos) << message;
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

// A rank whose previous launch never announced its end (planted fault) holds every rank's
// next dispatch: the wait is bounded and names that rank; the launch after is correct again.
TEST(Protocol, UnfinishedPreviousLaunchIsReported) {
  MoeConfig c = world_config(4);
  HostWeights w = HostWeights::random(c, test_seed());
  MoeLayer threads(c, w.views(), Backend::kThreads), oracle(c, w.views(), Backend::kCpu);
  Inputs in = make_inputs(c, 40, test_seed());
  HostTensor expected = poisoned(c.dtype, {40, c.hidden_size});
  oracle.forward(forward_args(in), {.y = expected.view()});
  auto forward = [&] {
    HostTensor y = poisoned(c.dtype, {40, c.hidden_size});
    threads.forward(forward_args(in), {.y = y.view()});
    return relative_error(y, expected);
  };
  {
    OptionsScope scope({.timeout = std::chrono::milliseconds(300), .unfinished_rank = 1});
    EXPECT_LE(forward(), 1e-12);  // the launch itself is complete; only its end is not announced
  }
  OptionsScope scope({.timeout = std::chrono::milliseconds(300)});
  const auto start = std::chrono::steady_clock::now();
  try {
    forward();
    FAIL() << "the next launch must wait for rank 1's previous one and time out";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("timed out"), std::string::npos) << message;
    EXPECT_NE(message.find("end of rank 1's previous launch"), std::string::npos) << message;
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  EXPECT_LE(forward(), 1e-12);
}

TEST(Protocol, FlagBeforeDataIsCaught) {
  OptionsScope scope({.flag_before_data = true});
  MoeConfig c = world_config(4);
  HostWeights w = HostWeights::random(c, test_seed());
  Inputs in = make_inputs(c, 64, test_seed());
  // Poisoned receive buffers are not needed: a fresh transport holds zeros, and each rank's rows
  // arrive only after its own expert phase, so at least the rows a rank sends to itself are
  // computed while missing.
  Result threads = run_layer(c, w, in, Backend::kThreads, false);
  Result oracle = run_layer(c, w, in, Backend::kCpu, false);
  EXPECT_GT(relative_error(threads.y, oracle.y), 1e-3) << "the broken ordering went unnoticed";
}

}  // namespace
}  // namespace fusedmoe::testing
