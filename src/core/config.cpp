// src/core/config.cpp — MoeConfig validation, derived quantities, parsing.
// Test: tests/cpp/test_config.cpp.
#include "fusedmoe/config.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>

#include "fusedmoe/error.hpp"

namespace fusedmoe {

namespace {

std::string lower(std::string_view text) {
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  std::replace(out.begin(), out.end(), '-', '_');
  return out;
}

std::string trim(std::string_view text) {
  size_t begin = text.find_first_not_of(" \t\r\n");
  if (begin == std::string_view::npos) return {};
  size_t end = text.find_last_not_of(" \t\r\n");
  return std::string(text.substr(begin, end - begin + 1));
}

int64_t parse_int(std::string_view text, std::string_view key) {
  std::string t = trim(text);
  int64_t value = 0;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  FUSEDMOE_CHECK(ec == std::errc() && ptr == t.data() + t.size() && !t.empty(),
                 key << ": expected an integer, got '" << text << "'");
  return value;
}

double parse_double(std::string_view text, std::string_view key) {
  std::string t = trim(text);
  char* end = nullptr;
  double value = std::strtod(t.c_str(), &end);
  FUSEDMOE_CHECK(!t.empty() && end == t.c_str() + t.size() && std::isfinite(value),
                 key << ": expected a number, got '" << text << "'");
  return value;
}

bool parse_bool(std::string_view text, std::string_view key) {
  std::string t = lower(trim(text));
  if (t == "1" || t == "true" || t == "on" || t == "yes") return true;
  if (t == "0" || t == "false" || t == "off" || t == "no") return false;
  FUSEDMOE_CHECK(false, key << ": expected true/false, got '" << text << "'");
}

}  // namespace

// ------------------------------------------------------------------------------ enum names --

std::string to_string(FfnKind kind) {
  switch (kind) {
    case FfnKind::kReluMlp: return "relu";
    case FfnKind::kGeluMlp: return "gelu";
    case FfnKind::kSwiGlu: return "swiglu";
    case FfnKind::kGeGlu: return "geglu";
  }
  return "?";
}

std::string to_string(GateKind kind) {
  switch (kind) {
    case GateKind::kSoftmaxTopK: return "softmax";
    case GateKind::kSigmoidTopK: return "sigmoid";
    case GateKind::kNoisyTopK: return "noisy";
    case GateKind::kSwitchTop1: return "switch";
    case GateKind::kGShardTop2: return "gshard";
  }
  return "?";
}

std::string to_string(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat64: return "fp64";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat16: return "fp16";
  }
  return "?";
}

std::string to_string(Fp32Math math) { return math == Fp32Math::kTf32 ? "tf32" : "exact"; }

FfnKind parse_ffn_kind(std::string_view text, std::string_view argument) {
  std::string t = lower(text);
  if (t == "relu" || t == "relu_mlp") return FfnKind::kReluMlp;
  if (t == "gelu" || t == "gelu_mlp") return FfnKind::kGeluMlp;
  if (t == "swiglu") return FfnKind::kSwiGlu;
  if (t == "geglu") return FfnKind::kGeGlu;
  FUSEDMOE_CHECK(false, argument << ": unknown FFN kind '" << text
                                 << "' (allowed: relu, gelu, swiglu, geglu)");
}

GateKind parse_gate_kind(std::string_view text, std::string_view argument) {
  std::string t = lower(text);
  if (t == "softmax" || t == "softmax_topk" || t == "topk") return GateKind::kSoftmaxTopK;
  if (t == "sigmoid" || t == "sigmoid_topk" || t == "deepseek") return GateKind::kSigmoidTopK;
  if (t == "noisy" || t == "noisy_topk") return GateKind::kNoisyTopK;
  if (t == "switch" || t == "switch_top1") return GateKind::kSwitchTop1;
  if (t == "gshard" || t == "gshard_top2") return GateKind::kGShardTop2;
  FUSEDMOE_CHECK(false, argument << ": unknown gate kind '" << text
                                 << "' (allowed: softmax, sigmoid, noisy, switch, gshard)");
}

DType parse_dtype(std::string_view text, std::string_view argument) {
  std::string t = lower(text);
  if (t == "fp32" || t == "float32" || t == "float") return DType::kFloat32;
  if (t == "fp64" || t == "float64" || t == "double") return DType::kFloat64;
  if (t == "bf16" || t == "bfloat16") return DType::kBFloat16;
  if (t == "fp16" || t == "float16" || t == "half") return DType::kFloat16;
  FUSEDMOE_CHECK(false, argument << ": unknown dtype '" << text
                                 << "' (allowed: fp32, fp64, bf16, fp16)");
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
  }
  return 0;
}

// --------------------------------------------------------------------------- derived values --

int64_t MoeConfig::capacity(int64_t num_tokens) const {
  if (dropless()) return num_tokens;  // a token picks an expert at most once
  double c = std::ceil(capacity_factor * static_cast<double>(num_tokens * top_k) /
                       static_cast<double>(num_experts));
  return std::min<int64_t>(num_tokens, static_cast<int64_t>(c));
}

// The default placement (no expert_placement): contiguous blocks of ceil(E / W) experts, so
// every query below is arithmetic. An explicit placement is scanned (these are called per
// expert, and per row by the CPU backends: O(1) where it can be).
namespace {
int64_t block_experts(const MoeConfig& c) {
  return c.world_size >= 1 ? (c.num_experts + c.world_size - 1) / c.world_size : 0;
}
}  // namespace

int MoeConfig::expert_rank(int64_t expert_idx) const {
  if (!expert_placement.empty()) return expert_placement[static_cast<size_t>(expert_idx)];
  return static_cast<int>(expert_idx / block_experts(*this));
}

int64_t MoeConfig::expert_local_index(int64_t expert_idx) const {
  if (expert_placement.empty()) return expert_idx % block_experts(*this);
  int owner = expert_rank(expert_idx);
  int64_t local = 0;
  for (int64_t e = 0; e < expert_idx; ++e) local += expert_rank(e) == owner;
  return local;
}

int64_t MoeConfig::num_local_experts(int rank_idx) const {
  if (expert_placement.empty()) {
    const int64_t block = block_experts(*this);
    return std::clamp<int64_t>(num_experts - rank_idx * block, 0, block);
  }
  int64_t n = 0;
  for (int64_t e = 0; e < num_experts; ++e) n += expert_rank(e) == rank_idx;
  return n;
}

int64_t MoeConfig::max_local_experts() const {
  if (expert_placement.empty()) return num_experts > 0 ? block_experts(*this) : 0;  // rank 0's
  int64_t best = 0;
  for (int r = 0; r < world_size; ++r) best = std::max(best, num_local_experts(r));
  return best;
}

int64_t MoeConfig::global_expert(int rank_idx, int64_t local_idx) const {
  if (expert_placement.empty()) {
    FUSEDMOE_CHECK(local_idx >= 0 && local_idx < num_local_experts(rank_idx),
                   "local expert " << local_idx << " does not exist on rank " << rank_idx);
    return rank_idx * block_experts(*this) + local_idx;
  }
  int64_t seen = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (expert_rank(e) != rank_idx) continue;
    if (seen++ == local_idx) return e;
  }
  FUSEDMOE_CHECK(false, "local expert " << local_idx << " does not exist on rank " << rank_idx);
}

// ------------------------------------------------------------------------------ validation --

std::vector<std::string> MoeConfig::problems() const {
  std::vector<std::string> out;
  auto fail = [&](const std::string& message) { out.push_back(message); };
  auto str = [](auto v) { std::ostringstream os; os << v; return os.str(); };
  if (hidden_size <= 0) fail("hidden_size = " + str(hidden_size) + ": must be > 0");
  if (ffn_size <= 0) fail("ffn_size = " + str(ffn_size) + ": must be > 0");
  if (num_experts <= 0 || num_experts > 4096)
    fail("num_experts = " + str(num_experts) + ": must be in [1, 4096]");
  if (top_k < 1 || (num_experts > 0 && top_k > num_experts))
    fail("top_k = " + str(top_k) + ": must be in [1, num_experts = " + str(num_experts) + "]");
  if (gate == GateKind::kSwitchTop1 && top_k != 1)
    fail("top_k = " + str(top_k) + ": gate 'switch' routes to exactly 1 expert (top_k = 1)");
  if (gate == GateKind::kGShardTop2 && top_k != 2)
    fail("top_k = " + str(top_k) + ": gate 'gshard' routes to exactly 2 experts (top_k = 2)");
  if (gate == GateKind::kGShardTop2 && num_experts < 2)
    fail("num_experts = " + str(num_experts) + ": gate 'gshard' needs at least 2 experts");
  if (!(capacity_factor >= 0.0) || !std::isfinite(capacity_factor))
    fail("capacity_factor = " + str(capacity_factor) + ": must be 0 (dropless) or > 0");
  if (num_shared_experts < 0 || num_shared_experts > 64)
    fail("num_shared_experts = " + str(num_shared_experts) + ": must be in [0, 64]");
  if (shared_ffn_size < 0) fail("shared_ffn_size = " + str(shared_ffn_size) + ": must be >= 0");
  if (!(jitter_eps >= 0.0 && jitter_eps < 1.0))
    fail("jitter_eps = " + str(jitter_eps) + ": must be in [0, 1)");
  if (world_size < 1 || world_size > 1024)
    fail("world_size = " + str(world_size) + ": must be in [1, 1024]");
  if (rank < 0 || rank >= world_size)
    fail("rank = " + str(rank) + ": must be in [0, world_size = " + str(world_size) + ")");
  if (!expert_placement.empty()) {
    if (static_cast<int64_t>(expert_placement.size()) != num_experts) {
      fail("expert_placement has " + str(expert_placement.size()) +
           " entries: must be empty or one rank per expert (num_experts = " + str(num_experts) + ")");
    } else {
      for (size_t e = 0; e < expert_placement.size(); ++e) {
        if (expert_placement[e] < 0 || expert_placement[e] >= world_size) {
          fail("expert_placement[" + str(e) + "] = " + str(expert_placement[e]) +
               ": must be a rank in [0, world_size = " + str(world_size) + ")");
          break;
        }
      }
    }
  } else if (num_experts > 0 && world_size > num_experts) {
    fail("world_size = " + str(world_size) + ": exceeds num_experts = " + str(num_experts) +
         " (give expert_placement explicitly to leave ranks without experts)");
  }
  return out;
}

void MoeConfig::validate() const {
  auto list = problems();
  if (list.empty()) return;
  std::string message = "invalid MoeConfig: " + list.front();
  for (size_t i = 1; i < list.size(); ++i) message += "; " + list[i];
  throw Error(message);
}

std::string MoeConfig::summary() const {
  std::ostringstream os;
  os << "H=" << hidden_size << " I=" << ffn_size << " E=" << num_experts << " k=" << top_k
     << " ffn=" << to_string(ffn) << " gate=" << to_string(gate)
     << " renorm=" << (renormalize ? "on" : "off") << " capacity=";
  if (dropless()) os << "dropless"; else os << capacity_factor;
  if (num_shared_experts) os << " shared=" << num_shared_experts << "x" << shared_size();
  os << " dtype=" << to_string(dtype) << " W=" << world_size;
  return os.str();
}

// ------------------------------------------------------------------------- textual config --

void set_config_field(MoeConfig& c, std::string_view key_in, std::string_view value) {
  std::string key = lower(trim(key_in));
  if (key == "hidden_size" || key == "h") c.hidden_size = parse_int(value, key);
  else if (key == "ffn_size" || key == "i") c.ffn_size = parse_int(value, key);
  else if (key == "num_experts" || key == "e") c.num_experts = parse_int(value, key);
  else if (key == "top_k" || key == "k") c.top_k = parse_int(value, key);
  else if (key == "ffn") c.ffn = parse_ffn_kind(trim(value), key);
  else if (key == "gate") c.gate = parse_gate_kind(trim(value), key);
  else if (key == "renormalize") c.renormalize = parse_bool(value, key);
  else if (key == "capacity_factor") c.capacity_factor = parse_double(value, key);
  else if (key == "num_shared_experts") c.num_shared_experts = parse_int(value, key);
  else if (key == "shared_ffn_size") c.shared_ffn_size = parse_int(value, key);
  else if (key == "expert_bias") c.expert_bias = parse_bool(value, key);
  else if (key == "gate_bias") c.gate_bias = parse_bool(value, key);
  else if (key == "jitter_eps") c.jitter_eps = parse_double(value, key);
  else if (key == "dtype") c.dtype = parse_dtype(trim(value), key);
  else if (key == "fp32_math") {
    std::string v = lower(trim(value));
    FUSEDMOE_CHECK(v == "tf32" || v == "exact", key << ": expected tf32 or exact, got '" << value << "'");
    c.fp32_math = v == "tf32" ? Fp32Math::kTf32 : Fp32Math::kExact;
  } else if (key == "world_size" || key == "w") c.world_size = static_cast<int>(parse_int(value, key));
  else if (key == "rank") c.rank = static_cast<int>(parse_int(value, key));
  else if (key == "expert_placement") {
    c.expert_placement.clear();
    std::string list(value);
    std::replace(list.begin(), list.end(), ',', ' ');
    std::istringstream is(list);
    std::string item;
    while (is >> item) c.expert_placement.push_back(static_cast<int>(parse_int(item, key)));
  } else {
    FUSEDMOE_CHECK(false, "unknown config key '" << key_in << "'");
  }
}

void load_config_file(MoeConfig& config, const std::string& path) {
  std::ifstream in(path);
  FUSEDMOE_CHECK(in.good(), "config file '" << path << "': cannot be opened");
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    if (trim(line).empty()) continue;
    auto eq = line.find('=');
    if (eq == std::string::npos) eq = line.find(':');
    FUSEDMOE_CHECK(eq != std::string::npos,
                   "config file '" << path << "' line " << line_no << ": expected 'key = value'");
    try {
      set_config_field(config, line.substr(0, eq), line.substr(eq + 1));
    } catch (const Error& e) {
      FUSEDMOE_CHECK(false, "config file '" << path << "' line " << line_no << ": " << e.what());
    }
  }
}

std::string to_config_string(const MoeConfig& c) {
  std::ostringstream os;
  os.precision(17);
  os << "hidden_size=" << c.hidden_size << ";ffn_size=" << c.ffn_size
     << ";num_experts=" << c.num_experts << ";top_k=" << c.top_k << ";ffn=" << to_string(c.ffn)
     << ";gate=" << to_string(c.gate) << ";renormalize=" << (c.renormalize ? 1 : 0)
     << ";capacity_factor=" << c.capacity_factor << ";num_shared_experts=" << c.num_shared_experts
     << ";shared_ffn_size=" << c.shared_ffn_size << ";expert_bias=" << (c.expert_bias ? 1 : 0)
     << ";gate_bias=" << (c.gate_bias ? 1 : 0) << ";jitter_eps=" << c.jitter_eps
     << ";dtype=" << to_string(c.dtype) << ";fp32_math=" << to_string(c.fp32_math)
     << ";world_size=" << c.world_size << ";rank=" << c.rank << ";expert_placement=";
  for (size_t i = 0; i < c.expert_placement.size(); ++i) os << (i ? "," : "") << c.expert_placement[i];
  return os.str();
}

MoeConfig parse_config_string(std::string_view text) {
  MoeConfig config;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view item = text.substr(start, end - start);
    if (!trim(item).empty()) {
      size_t eq = item.find('=');
      FUSEDMOE_CHECK(eq != std::string_view::npos,
                     "config string: expected 'key=value', got '" << item << "'");
      set_config_field(config, item.substr(0, eq), item.substr(eq + 1));
    }
    start = end + 1;
  }
  return config;
}

}  // namespace fusedmoe
