// cli/report.cpp — see report.hpp.
#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <string>

namespace fusedmoe::cli {

namespace {

constexpr int kBarWidth = 40;  // characters of the busiest expert's bar

std::string gflops_text(double flops, double milliseconds) {
  if (!(milliseconds > 0.0) || !(flops > 0.0)) return "-";
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", flops / (milliseconds * 1e6));
  return text;
}

// "cpu is 11.6x faster"
std::string speedup_text(double reference_ms, double backend_ms, Backend backend) {
  if (!(reference_ms > 0.0) || !(backend_ms > 0.0)) return "";
  char text[64];
  std::snprintf(text, sizeof text, "%s is %.1fx faster", backend_name(backend).c_str(),
                reference_ms / backend_ms);
  return text;
}

void print_timing_row(std::FILE* out, const char* phase, double milliseconds, double flops,
                      const std::string& note) {
  std::fprintf(out, "  %-18s %12.3f %10.3f %10s   %s\n", phase, milliseconds, flops * 1e-9,
               gflops_text(flops, milliseconds).c_str(), note.c_str());
}

void print_check_row(std::FILE* out, const OutputCheck& check) {
  char error_text[32], diff_text[32];
  if (check.mismatches >= 0) {
    std::snprintf(error_text, sizeof error_text, "%lld differ",
                  static_cast<long long>(check.mismatches));
    std::snprintf(diff_text, sizeof diff_text, "-");
  } else if (std::isnan(check.relative_error) && std::isnan(check.max_abs_diff) &&
             check.non_finite == 0) {
    std::snprintf(error_text, sizeof error_text, "-");
    std::snprintf(diff_text, sizeof diff_text, "-");
  } else {
    std::snprintf(error_text, sizeof error_text, "%.3e", check.relative_error);
    std::snprintf(diff_text, sizeof diff_text, "%.3e", check.max_abs_diff);
  }
  std::fprintf(out, "  %-16s %12lld %13s %12s %11lld   %s\n", check.name.c_str(),
               static_cast<long long>(check.num_elements), error_text, diff_text,
               static_cast<long long>(check.non_finite), check.passed ? "PASS" : "FAIL");
}

std::string tokens_text(const RunReport& report) {
  std::string text = std::to_string(report.options.num_tokens);
  if (report.tokens_per_rank.size() > 1) {
    text += " (per rank:";
    for (int64_t rank_tokens : report.tokens_per_rank)
      text.append(" ").append(std::to_string(rank_tokens));
    text += ")";
  }
  return text;
}

double percent_of(int64_t part, int64_t whole) {
  return whole > 0 ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0;
}

void print_load_histogram(std::FILE* out, const RunReport& report) {
  const MoeConfig& config = report.options.config;
  const int64_t busiest =
      report.expert_counts.empty()
          ? 0
          : *std::max_element(report.expert_counts.begin(), report.expert_counts.end());
  std::fprintf(out, "\nexpert load ('#' kept, '.' dropped over capacity; bar scaled to %lld)\n",
               static_cast<long long>(busiest));
  std::fprintf(out, "  %6s %5s %9s %9s\n", "expert", "rank", "routed", "kept");
  for (size_t expert_idx = 0; expert_idx < report.expert_counts.size(); ++expert_idx) {
    const int64_t routed = report.expert_counts[expert_idx];
    const int64_t kept = report.kept_counts[expert_idx];
    int routed_width = 0, kept_width = 0;
    if (busiest > 0 && routed >= 0 && kept >= 0) {
      routed_width =
          static_cast<int>(std::lround(double(kBarWidth) * double(routed) / double(busiest)));
      kept_width =
          static_cast<int>(std::lround(double(kBarWidth) * double(kept) / double(busiest)));
      kept_width = std::min(kept_width, routed_width);
    }
    std::string bar(static_cast<size_t>(kept_width), '#');
    bar.append(static_cast<size_t>(routed_width - kept_width), '.');
    std::fprintf(out, "  %6zu %5d %9lld %9lld%s%s\n", expert_idx,
                 config.expert_rank(static_cast<int64_t>(expert_idx)),
                 static_cast<long long>(routed), static_cast<long long>(kept),
                 bar.empty() ? "" : "  ", bar.c_str());
  }
}

}  // namespace

void print_report(const RunReport& report, std::FILE* out) {
  const RunOptions& options = report.options;
  const MoeConfig& config = options.config;

  std::fprintf(out, "\nconfig    %s\n", config.summary().c_str());
  std::fprintf(out, "tokens    %s\n", tokens_text(report).c_str());
  std::fprintf(out, "run       seed %llu, %s, gate scale %g\n",
               static_cast<unsigned long long>(options.seed),
               options.training ? "training" : "inference", options.gate_scale);
  std::fprintf(out, "backend   %s (%s)\n", backend_name(report.backend).c_str(),
               report.backend_reason.c_str());

  std::fprintf(out, "\n  %-18s %12s %10s %10s\n", "phase", "time (ms)", "GFLOP", "GFLOP/s");
  const std::string median_note = "median of " + std::to_string(options.iterations);
  print_timing_row(out, "forward", report.forward_ms, report.forward_flops, median_note);
  const bool backward = !std::isnan(report.backward_ms);
  if (backward)
    print_timing_row(out, "backward", report.backward_ms, report.backward_flops,
                     median_note + "; FLOPs taken as 2x forward");
  else
    std::fprintf(out, "  %-18s %12s   %s\n", "backward", "-",
                 "not run: the fused backend's backward needs world_size = 1");
  if (options.check) {
    print_timing_row(out, "naive forward", report.reference_forward_ms, report.forward_flops,
                     "reference, once; " + speedup_text(report.reference_forward_ms,
                                                        report.forward_ms, report.backend));
    if (backward)
      print_timing_row(out, "naive backward", report.reference_backward_ms, report.backward_flops,
                       "reference, once; " + speedup_text(report.reference_backward_ms,
                                                          report.backward_ms, report.backend));
  }

  if (options.check) {
    std::string precision = to_string(config.dtype);
    if (config.dtype == DType::kFloat32 && (report.backend == Backend::kCuda || report.backend == Backend::kFused))
      precision += ", " + to_string(config.fp32_math);
    std::fprintf(out, "\ncheck against the naive reference, tolerance %g on relative error (%s)\n",
                 report.tolerance, precision.c_str());
  } else {
    std::fprintf(out,
                 "\ncheck skipped (--no-check): outputs only checked to be written and finite\n");
  }
  std::fprintf(out, "  %-16s %12s %13s %12s %11s   %s\n", "output", "elements", "rel. error",
               "max |diff|", "non-finite", "result");
  for (const OutputCheck& check : report.checks) print_check_row(out, check);

  const int64_t dropped = report.selected_assignments - report.kept_assignments;
  const int64_t dropped_over_capacity = report.routed_assignments - report.kept_assignments;
  const int64_t dropped_by_random_routing = report.selected_assignments - report.routed_assignments;
  std::fprintf(out,
               "\ntokens dropped   %lld of %lld assignments not kept (%.2f %%): %lld over "
               "capacity, %lld by random routing; %lld tokens lost every expert\n",
               static_cast<long long>(dropped), static_cast<long long>(report.selected_assignments),
               percent_of(dropped, report.selected_assignments),
               static_cast<long long>(dropped_over_capacity),
               static_cast<long long>(dropped_by_random_routing),
               static_cast<long long>(report.tokens_without_expert));
  std::fprintf(out, "aux loss         %.6g\n", report.aux_loss);
  std::fprintf(out, "z loss           %.6g\n", report.z_loss);

  print_load_histogram(out, report);

  const auto num_passed = std::count_if(report.checks.begin(), report.checks.end(),
                                        [](const OutputCheck& check) { return check.passed; });
  std::fprintf(out, "\nresult: %s (%lld of %zu checks pass)\n", report.passed() ? "PASS" : "FAIL",
               static_cast<long long>(num_passed), report.checks.size());
  std::fflush(out);
}

}  // namespace fusedmoe::cli
