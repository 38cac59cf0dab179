// tests/cpp/test_config.cpp — MoeConfig validation messages, derived values, parsing.
#include <gtest/gtest.h>

#include <fstream>

#include "fusedmoe/config.hpp"
#include "fusedmoe/error.hpp"

namespace fusedmoe {
namespace {

MoeConfig valid() {
  MoeConfig c;
  c.hidden_size = 64;
  c.ffn_size = 128;
  c.num_experts = 8;
  c.top_k = 2;
  return c;
}

void expect_problem(const MoeConfig& c, const std::string& needle) {
  try {
    c.validate();
    ADD_FAILURE() << "validate() accepted a config; expected a message containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Config, ValidConfigPasses) {
  EXPECT_NO_THROW(valid().validate());
  EXPECT_TRUE(valid().problems().empty());
}

TEST(Config, EachBadFieldIsNamedWithValueAndAllowedRange) {
  MoeConfig c = valid(); c.hidden_size = 0; expect_problem(c, "hidden_size = 0: must be > 0");
  c = valid(); c.ffn_size = -3; expect_problem(c, "ffn_size = -3");
  c = valid(); c.num_experts = 0; expect_problem(c, "num_experts = 0: must be in [1, 4096]");
  c = valid(); c.top_k = 9; expect_problem(c, "top_k = 9: must be in [1, num_experts = 8]");
  c = valid(); c.top_k = 0; expect_problem(c, "top_k = 0");
  c = valid(); c.gate = GateKind::kSwitchTop1; expect_problem(c, "gate 'switch' routes to exactly 1 expert");
  c = valid(); c.gate = GateKind::kGShardTop2; c.top_k = 1; expect_problem(c, "gate 'gshard' routes to exactly 2");
  c = valid(); c.capacity_factor = -1; expect_problem(c, "capacity_factor = -1");
  c = valid(); c.num_shared_experts = -1; expect_problem(c, "num_shared_experts = -1");
  c = valid(); c.jitter_eps = 1.5; expect_problem(c, "jitter_eps = 1.5");
  c = valid(); c.world_size = 0; expect_problem(c, "world_size = 0");
  c = valid(); c.world_size = 2; c.rank = 2; expect_problem(c, "rank = 2: must be in [0, world_size = 2)");
  c = valid(); c.world_size = 16; expect_problem(c, "world_size = 16: exceeds num_experts = 8");
  c = valid(); c.expert_placement = {0, 1}; expect_problem(c, "expert_placement has 2 entries");
  c = valid(); c.world_size = 2; c.expert_placement = {0, 1, 0, 1, 0, 1, 0, 5};
  expect_problem(c, "expert_placement[7] = 5");
}

TEST(Config, AllProblemsAreListed) {
  MoeConfig c;
  EXPECT_GE(c.problems().size(), 3u);  // hidden_size, ffn_size, num_experts
}

TEST(Config, DerivedValues) {
  MoeConfig c = valid();
  EXPECT_EQ(c.ffn_in_width(), 256);  // swiglu: gate + up halves
  c.ffn = FfnKind::kReluMlp;
  EXPECT_EQ(c.ffn_in_width(), 128);
  EXPECT_EQ(c.capacity(100), 100);  // dropless: a token picks an expert once
  c.capacity_factor = 1.25;
  EXPECT_EQ(c.capacity(100), 32);   // ceil(1.25 * 100 * 2 / 8) = 32
  c.capacity_factor = 100;
  EXPECT_EQ(c.capacity(10), 10);    // never above the token count
  c.world_size = 4;
  EXPECT_EQ(c.expert_rank(0), 0);
  EXPECT_EQ(c.expert_rank(7), 3);
  EXPECT_EQ(c.expert_local_index(5), 1);
  EXPECT_EQ(c.num_local_experts(2), 2);
  EXPECT_EQ(c.global_expert(3, 1), 7);
  c.num_experts = 7;  // uneven: ceil(7/4) = 2 per rank, last rank gets 1
  EXPECT_EQ(c.num_local_experts(3), 1);
  EXPECT_EQ(c.max_local_experts(), 2);
  c.expert_placement = {3, 3, 0, 1, 2, 0, 3};
  EXPECT_EQ(c.num_local_experts(3), 3);
  EXPECT_EQ(c.expert_local_index(6), 2);
  EXPECT_EQ(c.global_expert(0, 1), 5);
}

// The default placement answers by arithmetic, an explicit one by scanning: the same placement
// given explicitly must give the same answers, for every E and W (including uneven and empty
// last ranks).
TEST(Config, DefaultPlacementEqualsTheSamePlacementGivenExplicitly) {
  for (int64_t E = 1; E <= 40; ++E) {
    for (int W = 1; W <= 12; ++W) {
      MoeConfig implicit = valid();
      implicit.num_experts = E;
      implicit.world_size = W;
      MoeConfig explicit_ = implicit;
      const int64_t block = (E + W - 1) / W;
      for (int64_t e = 0; e < E; ++e) explicit_.expert_placement.push_back(static_cast<int>(e / block));
      EXPECT_EQ(implicit.max_local_experts(), explicit_.max_local_experts()) << "E " << E << " W " << W;
      for (int64_t e = 0; e < E; ++e) {
        EXPECT_EQ(implicit.expert_rank(e), explicit_.expert_rank(e));
        EXPECT_EQ(implicit.expert_local_index(e), explicit_.expert_local_index(e)) << "E " << E << " W " << W;
      }
      for (int r = 0; r < W; ++r) {
        ASSERT_EQ(implicit.num_local_experts(r), explicit_.num_local_experts(r)) << "E " << E << " W " << W;
        for (int64_t l = 0; l < implicit.num_local_experts(r); ++l)
          EXPECT_EQ(implicit.global_expert(r, l), explicit_.global_expert(r, l));
        EXPECT_THROW(implicit.global_expert(r, implicit.num_local_experts(r)), Error);
      }
    }
  }
}

TEST(Config, ParsersAcceptNamesAndRejectOthersByArgument) {
  EXPECT_EQ(parse_ffn_kind("SwiGLU"), FfnKind::kSwiGlu);
  EXPECT_EQ(parse_gate_kind("noisy-topk"), GateKind::kNoisyTopK);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBFloat16);
  try {
    parse_gate_kind("best", "--gate");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--gate: unknown gate kind 'best'"), std::string::npos);
  }
  MoeConfig c;
  EXPECT_THROW(set_config_field(c, "top_k", "two"), Error);
  EXPECT_THROW(set_config_field(c, "nonsense", "1"), Error);
  EXPECT_THROW(set_config_field(c, "renormalize", "maybe"), Error);
}

TEST(Config, StringRoundTrip) {
  MoeConfig c = valid();
  c.gate = GateKind::kSigmoidTopK;
  c.capacity_factor = 1.25;
  c.num_shared_experts = 2;
  c.world_size = 2;
  c.expert_placement = {1, 0, 1, 0, 1, 0, 1, 0};
  c.jitter_eps = 0.125;
  MoeConfig back = parse_config_string(to_config_string(c));
  EXPECT_EQ(to_config_string(back), to_config_string(c));
  EXPECT_EQ(back.expert_placement, c.expert_placement);
}

TEST(Config, FileWithCommentsAndErrorLine) {
  const std::string path = ::testing::TempDir() + "fusedmoe_cfg.txt";
  {
    std::ofstream f(path);
    f << "# a config\nhidden_size = 32\nffn_size=16 # inline\n\nnum_experts = 4\ntop_k = 2\ngate = gshard\n";
  }
  MoeConfig c;
  load_config_file(c, path);
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.gate, GateKind::kGShardTop2);
  EXPECT_NO_THROW(c.validate());
  {
    std::ofstream f(path);
    f << "hidden_size = 32\ntop_k = x\n";
  }
  try {
    load_config_file(c, path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_config_file(c, path + ".missing"), Error);
}

}  // namespace
}  // namespace fusedmoe
