// cli/options.cpp — parsing and help text of `fusedmoe run` flags (see options.hpp).
#include "options.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>
#include <string_view>

#include "fusedmoe/error.hpp"

namespace fusedmoe::cli {

namespace {

// What a flag sets.
enum class FlagTarget {
  kConfigField,  // a MoeConfig field, through set_config_field
  kConfigFile,
  kTokens,
  kSeed,
  kBackend,
  kTraining,
  kGateScale,
  kIterations,
  kNoCheck,
  kTolerance,
  kTransport,
  kNcclIdFile,
  kHelp,
};

// How a flag takes its value.
enum class ValueKind {
  kRequired,      // --flag VALUE or --flag=VALUE
  kOptionalBool,  // --flag (= true), --flag=BOOL, or --flag BOOL when BOOL is a boolean word
  kSwitch,        // --flag, no value
};

struct FlagSpec {
  std::string_view name;  // as typed, e.g. "--hidden-size"
  FlagTarget target;
  std::string_view config_key;  // MoeConfig field name for kConfigField
  ValueKind value_kind;
  std::string_view value_name;  // placeholder in the help, e.g. "N"
  std::string_view meaning;
};

constexpr std::array kLayerFlags = {
    FlagSpec{"--hidden-size", FlagTarget::kConfigField, "hidden_size", ValueKind::kRequired, "N",
             "hidden size H"},
    FlagSpec{"--ffn-size", FlagTarget::kConfigField, "ffn_size", ValueKind::kRequired, "N",
             "FFN size I of each routed expert"},
    FlagSpec{"--num-experts", FlagTarget::kConfigField, "num_experts", ValueKind::kRequired, "N",
             "routed experts E"},
    FlagSpec{"--top-k", FlagTarget::kConfigField, "top_k", ValueKind::kRequired, "N",
             "experts per token k"},
    FlagSpec{"--ffn", FlagTarget::kConfigField, "ffn", ValueKind::kRequired, "KIND",
             "expert FFN: relu, gelu, swiglu, geglu"},
    FlagSpec{"--gate", FlagTarget::kConfigField, "gate", ValueKind::kRequired, "KIND",
             "router: softmax, sigmoid, noisy, switch (k=1), gshard (k=2)"},
    FlagSpec{"--renormalize", FlagTarget::kConfigField, "renormalize", ValueKind::kOptionalBool,
             "[BOOL]", "divide the k gate weights by their sum"},
    FlagSpec{"--capacity-factor", FlagTarget::kConfigField, "capacity_factor", ValueKind::kRequired,
             "X", "expert capacity factor, 0 = dropless"},
    FlagSpec{"--num-shared-experts", FlagTarget::kConfigField, "num_shared_experts",
             ValueKind::kRequired, "N", "shared experts S applied to every token"},
    FlagSpec{"--shared-ffn-size", FlagTarget::kConfigField, "shared_ffn_size", ValueKind::kRequired,
             "N", "FFN size of each shared expert, 0 = ffn-size"},
    FlagSpec{"--expert-bias", FlagTarget::kConfigField, "expert_bias", ValueKind::kOptionalBool,
             "[BOOL]", "biases b1, b2 in every expert"},
    FlagSpec{"--gate-bias", FlagTarget::kConfigField, "gate_bias", ValueKind::kOptionalBool,
             "[BOOL]", "trained bias on the router logits"},
    FlagSpec{"--jitter-eps", FlagTarget::kConfigField, "jitter_eps", ValueKind::kRequired, "X",
             "switch gate: jitter half-width in training"},
    FlagSpec{"--dtype", FlagTarget::kConfigField, "dtype", ValueKind::kRequired, "NAME",
             "data type of tensors: fp64 or fp32"},
    FlagSpec{"--fp32-math", FlagTarget::kConfigField, "fp32_math", ValueKind::kRequired, "NAME",
             "fp32 expert GEMMs on GPUs: tf32 or exact"},
    FlagSpec{"--world-size", FlagTarget::kConfigField, "world_size", ValueKind::kRequired, "N",
             "expert-parallel ranks W, emulated in this process"},
    FlagSpec{"--expert-placement", FlagTarget::kConfigField, "expert_placement",
             ValueKind::kRequired, "LIST", "owning rank of each expert, e.g. 0,0,1,1"},
};

constexpr std::array kRunFlags = {
    FlagSpec{"--config", FlagTarget::kConfigFile, "", ValueKind::kRequired, "FILE",
             "MoeConfig fields as 'key = value' lines; later flags win"},
    FlagSpec{"--tokens", FlagTarget::kTokens, "", ValueKind::kRequired, "T",
             "tokens T over all ranks, split as evenly as possible"},
    FlagSpec{"--seed", FlagTarget::kSeed, "", ValueKind::kRequired, "N",
             "seed of weights, inputs and gate noise"},
    FlagSpec{"--backend", FlagTarget::kBackend, "", ValueKind::kRequired, "NAME",
             "auto (cuda if a device is found, except fp64), cpu, naive, cuda, threads (the fused protocol on one CPU thread per rank), fused (the persistent kernel; W ranks emulated on one GPU; forward)"},
    FlagSpec{"--training", FlagTarget::kTraining, "", ValueKind::kSwitch, "",
             "training mode: gate noise, jitter, random routing"},
    FlagSpec{"--gate-scale", FlagTarget::kGateScale, "", ValueKind::kRequired, "X",
             "scale of router weights; larger = more peaked routing"},
    FlagSpec{"--iters", FlagTarget::kIterations, "", ValueKind::kRequired, "N",
             "timed repetitions; the median time is reported"},
    FlagSpec{"--no-check", FlagTarget::kNoCheck, "", ValueKind::kSwitch, "",
             "skip the naive reference; only check outputs are finite"},
    FlagSpec{"--tolerance", FlagTarget::kTolerance, "", ValueKind::kRequired, "X",
             "largest relative error that passes"},
    FlagSpec{"--transport", FlagTarget::kTransport, "", ValueKind::kRequired, "NAME",
             "local (W ranks emulated here) or nccl (one process per GPU under mpirun/srun/torchrun: this process is one rank; backend fused, forward)"},
    FlagSpec{"--nccl-id-file", FlagTarget::kNcclIdFile, "", ValueKind::kRequired, "FILE",
             "--transport nccl: file through which rank 0 hands the NCCL unique id to the others (one node)"},
    FlagSpec{"--help", FlagTarget::kHelp, "", ValueKind::kSwitch, "", "this help (also -h)"},
};

const FlagSpec* find_flag(std::string_view name) {
  for (const FlagSpec& spec : kLayerFlags)
    if (spec.name == name) return &spec;
  for (const FlagSpec& spec : kRunFlags)
    if (spec.name == name) return &spec;
  return nullptr;
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> previous_row(b.size() + 1), current_row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) previous_row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    current_row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t substitution = previous_row[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current_row[j] = std::min({previous_row[j] + 1, current_row[j - 1] + 1, substitution});
    }
    std::swap(previous_row, current_row);
  }
  return previous_row[b.size()];
}

// "unknown flag '--top_k' (did you mean --top-k?)"
std::string unknown_flag_message(std::string_view name) {
  std::string normalized(name);
  std::replace(normalized.begin(), normalized.end(), '_', '-');
  std::transform(normalized.begin(), normalized.end(), normalized.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const FlagSpec* best_match = nullptr;
  size_t best_distance = 3;  // suggest only close matches
  auto consider = [&](const FlagSpec& spec) {
    size_t distance = edit_distance(normalized, spec.name);
    if (distance < best_distance) {
      best_distance = distance;
      best_match = &spec;
    }
  };
  for (const FlagSpec& spec : kLayerFlags) consider(spec);
  for (const FlagSpec& spec : kRunFlags) consider(spec);
  std::string message = "unknown flag '" + std::string(name) + "'";
  if (best_match) message += " (did you mean " + std::string(best_match->name) + "?)";
  return message + "; see 'fusedmoe run --help'";
}

bool is_bool_word(std::string_view text) {
  std::string lowered(text);
  std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (std::string_view word : {"true", "false", "on", "off", "yes", "no", "1", "0"})
    if (lowered == word) return true;
  return false;
}

template <class Integer>
Integer parse_integer(std::string_view text, std::string_view flag, Integer min_value,
                      Integer max_value) {
  Integer value{};
  auto [end, status] = std::from_chars(text.data(), text.data() + text.size(), value);
  bool parsed = !text.empty() && status == std::errc() && end == text.data() + text.size();
  if (!parsed || value < min_value || value > max_value) {
    std::ostringstream message;
    message << flag << ": expected an integer ";
    if (max_value == std::numeric_limits<Integer>::max())
      message << ">= " << min_value;
    else
      message << "in [" << min_value << ", " << max_value << "]";
    message << ", got '" << text << "'";
    throw UsageError(message.str());
  }
  return value;
}

double parse_finite_number(std::string_view text, std::string_view flag) {
  std::string owned(text);
  char* end = nullptr;
  double value = owned.empty() ? 0.0 : std::strtod(owned.c_str(), &end);
  if (owned.empty() || end != owned.c_str() + owned.size() || !std::isfinite(value))
    throw UsageError(std::string(flag) + ": expected a finite number, got '" + owned + "'");
  return value;
}

void apply_flag(const FlagSpec& spec, std::string_view value, RunOptions& options) {
  switch (spec.target) {
    case FlagTarget::kConfigField:
      set_config_field(options.config, spec.config_key, value);
      break;
    case FlagTarget::kConfigFile:
      load_config_file(options.config, std::string(value));
      break;
    case FlagTarget::kTokens:
      options.num_tokens =
          parse_integer<int64_t>(value, spec.name, 0, std::numeric_limits<int64_t>::max());
      break;
    case FlagTarget::kSeed:
      options.seed =
          parse_integer<uint64_t>(value, spec.name, 0, std::numeric_limits<uint64_t>::max());
      break;
    case FlagTarget::kBackend:
      try {
        options.backend = parse_backend(std::string(value));
      } catch (const Error&) {
        throw UsageError(std::string(spec.name) + ": unknown backend '" + std::string(value) +
                         "' (allowed: auto, cpu, naive, cuda, threads, fused)");
      }
      break;
    case FlagTarget::kTraining:
      options.training = true;
      break;
    case FlagTarget::kGateScale:
      options.gate_scale = parse_finite_number(value, spec.name);
      break;
    case FlagTarget::kIterations:
      options.iterations = parse_integer<int>(value, spec.name, 1, 100000);
      break;
    case FlagTarget::kNoCheck:
      options.check = false;
      break;
    case FlagTarget::kTolerance:
      options.tolerance = parse_finite_number(value, spec.name);
      if (*options.tolerance < 0.0)
        throw UsageError(std::string(spec.name) + ": must be >= 0, got '" + std::string(value) +
                         "'");
      break;
    case FlagTarget::kTransport:
      if (value != "local" && value != "nccl")
        throw UsageError(std::string(spec.name) + ": unknown transport '" + std::string(value) +
                         "' (allowed: local, nccl)");
      options.transport = std::string(value);
      break;
    case FlagTarget::kNcclIdFile:
      options.nccl_id_file = std::string(value);
      break;
    case FlagTarget::kHelp:
      options.show_help = true;
      break;
  }
}

std::string number_text(double value) {
  std::ostringstream text;
  text << value;
  return text.str();
}

// Default of every flag as shown in the help: layer fields from the default config (through
// to_config_string, so the help cannot drift from the code), run flags from RunOptions{}.
std::string default_text(const FlagSpec& spec) {
  static const std::map<std::string, std::string> config_defaults = [] {
    std::map<std::string, std::string> defaults;
    std::istringstream fields(to_config_string(default_run_config()));
    std::string field;
    while (std::getline(fields, field, ';')) {
      size_t equals = field.find('=');
      if (equals != std::string::npos) defaults[field.substr(0, equals)] = field.substr(equals + 1);
    }
    return defaults;
  }();
  const RunOptions run_defaults;
  switch (spec.target) {
    case FlagTarget::kConfigField: {
      auto found = config_defaults.find(std::string(spec.config_key));
      std::string value = found == config_defaults.end() ? "?" : found->second;
      if (spec.value_kind == ValueKind::kOptionalBool) return value == "1" ? "true" : "false";
      if (spec.config_key == "expert_placement" && value.empty()) return "contiguous blocks";
      return value;
    }
    case FlagTarget::kConfigFile:
      return "none";
    case FlagTarget::kTokens:
      return std::to_string(run_defaults.num_tokens);
    case FlagTarget::kSeed:
      return std::to_string(run_defaults.seed);
    case FlagTarget::kBackend:
      return backend_name(run_defaults.backend);
    case FlagTarget::kTraining:
      return run_defaults.training ? "on" : "off";
    case FlagTarget::kGateScale:
      return number_text(run_defaults.gate_scale);
    case FlagTarget::kIterations:
      return std::to_string(run_defaults.iterations);
    case FlagTarget::kNoCheck:
      return run_defaults.check ? "off" : "on";
    case FlagTarget::kTolerance:
      return "1e-6 for fp64, 1e-4 for fp32, 5e-3 for fp32 on cuda with tf32";
    case FlagTarget::kTransport:
      return run_defaults.transport;
    case FlagTarget::kNcclIdFile:
      return "/tmp/fusedmoe-nccl-<launcher pid>.id";
    case FlagTarget::kHelp:
      return "";
  }
  return "";
}

void append_flag_lines(std::ostringstream& text, const FlagSpec* begin, const FlagSpec* end) {
  constexpr size_t kNameColumnWidth = 26;
  for (const FlagSpec* spec = begin; spec != end; ++spec) {
    std::string name_and_value(spec->name);
    if (!spec->value_name.empty()) name_and_value.append(" ").append(spec->value_name);
    text << "  " << name_and_value;
    size_t padding =
        name_and_value.size() < kNameColumnWidth ? kNameColumnWidth - name_and_value.size() : 1;
    text << std::string(padding, ' ') << spec->meaning;
    std::string default_value = default_text(*spec);
    if (!default_value.empty()) text << " (default: " << default_value << ")";
    text << "\n";
  }
}

}  // namespace

double tolerance_for(const MoeConfig& config, Backend backend) {
  if (config.dtype == DType::kFloat64) return 1e-6;
  if ((backend == Backend::kCuda || backend == Backend::kFused) && config.fp32_math == Fp32Math::kTf32) return 5e-3;
  return 1e-4;
}

std::string backend_name(Backend backend) {
  switch (backend) {
    case Backend::kAuto:
      return "auto";
    case Backend::kCpu:
      return "cpu";
    case Backend::kNaive:
      return "naive";
    case Backend::kCuda:
      return "cuda";
    case Backend::kThreads:
      return "threads";
    case Backend::kFused:
      return "fused";
  }
  return "?";
}

MoeConfig default_run_config() {
  return MoeConfig{.hidden_size = 256,
                   .ffn_size = 512,
                   .num_experts = 8,
                   .top_k = 2,
                   .ffn = FfnKind::kSwiGlu,
                   .gate = GateKind::kSoftmaxTopK,
                   .dtype = DType::kFloat64,
                   .world_size = 1,
                   .expert_placement = {}};
}

RunOptions parse_run_options(const std::vector<std::string>& args) {
  RunOptions options;
  options.config = default_run_config();
  // Help wins over every other flag, even malformed ones.
  for (const std::string& arg : args) {
    if (arg == "-h" || arg == "--help") {
      options.show_help = true;
      return options;
    }
  }
  const FlagSpec* previous_spec = nullptr;
  for (size_t arg_idx = 0; arg_idx < args.size(); ++arg_idx) {
    const std::string& arg = args[arg_idx];
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      if (previous_spec != nullptr && previous_spec->value_kind == ValueKind::kOptionalBool)
        throw UsageError(std::string(previous_spec->name) + ": expected a boolean " +
                         "(true/false, on/off, yes/no, 1/0), got '" + arg + "'");
      throw UsageError("unexpected argument '" + arg +
                       "'; 'fusedmoe run' takes only flags (see 'fusedmoe run --help')");
    }
    size_t equals = arg.find('=');
    std::string name = arg.substr(0, equals);
    const FlagSpec* spec = find_flag(name);
    if (spec == nullptr) throw UsageError(unknown_flag_message(name));
    bool has_inline_value = equals != std::string::npos;
    std::string value = has_inline_value ? arg.substr(equals + 1) : std::string();
    switch (spec->value_kind) {
      case ValueKind::kSwitch:
        if (has_inline_value) throw UsageError(name + " takes no value, got '" + arg + "'");
        break;
      case ValueKind::kOptionalBool:
        if (!has_inline_value) {
          bool next_is_bool = arg_idx + 1 < args.size() && is_bool_word(args[arg_idx + 1]);
          value = next_is_bool ? args[++arg_idx] : "true";
        }
        break;
      case ValueKind::kRequired:
        if (!has_inline_value) {
          if (arg_idx + 1 >= args.size())
            throw UsageError(name + " needs a value (" + std::string(spec->value_name) + ")");
          value = args[++arg_idx];
        }
        break;
    }
    apply_flag(*spec, value, options);
    previous_spec = spec;
  }
  return options;
}

std::string run_usage() {
  std::ostringstream text;
  text << "usage: fusedmoe run [--config FILE] [flags]\n"
          "\n"
          "Builds one MoE layer with random weights and inputs, runs forward and backward on the\n"
          "chosen backend (timed, median of --iters), then once on the naive reference, and\n"
          "compares every output and gradient. Prints a table with times, GFLOP/s, errors,\n"
          "dropped tokens, balance losses and the per-expert load.\n"
          "Exit status: 0 all checks pass, 1 a check failed, 2 bad arguments or configuration.\n"
          "\n"
          "Layer (one flag per MoeConfig field; a [BOOL] flag alone means true, or give\n"
          "true/false, on/off, yes/no, 1/0):\n";
  append_flag_lines(text, kLayerFlags.data(), kLayerFlags.data() + kLayerFlags.size());
  text << "\nRun:\n";
  append_flag_lines(text, kRunFlags.data(), kRunFlags.data() + kRunFlags.size());
  text << "\n"
          "Flags take their value as '--flag VALUE' or '--flag=VALUE' and apply in order.\n"
          "A --config file holds 'key = value' lines with the MoeConfig field names\n"
          "(hidden_size, top_k, ...) and '#' comments.\n";
  return text.str();
}

}  // namespace fusedmoe::cli
