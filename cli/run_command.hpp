// cli/run_command.hpp — `fusedmoe run`: build a layer with random weights, time forward and
// backward on the chosen backend, check every output against the naive reference, report.
// Tests: cli/tests.cmake.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.hpp"

namespace fusedmoe::cli {

// One compared output (tensor, scalar loss or the routing itself).
struct OutputCheck {
  std::string name;  // "y", "d_w1", "aux_loss", "routing", ...
  int64_t num_elements = 0;
  double relative_error = 0.0;  // ‖out − ref‖ / ‖ref‖; NaN when not compared (--no-check)
  double max_abs_diff = 0.0;    // max |out − ref|; NaN when not compared
  int64_t mismatches = -1;      // routing only: differing entries; -1 for numeric outputs
  int64_t non_finite = 0;       // NaN/inf elements (outputs are poisoned with NaN beforehand)
  bool passed = false;
};

struct RunReport {
  RunOptions options;
  Backend backend = Backend::kCpu;  // the backend that ran (kAuto resolved)
  std::string backend_reason;       // why that backend
  std::vector<int64_t> tokens_per_rank;
  double forward_ms = 0.0;  // medians over options.iterations
  double backward_ms = 0.0;
  double reference_forward_ms = 0.0;  // naive reference, one run (when checked)
  double reference_backward_ms = 0.0;
  double forward_flops = 0.0;
  double backward_flops = 0.0;
  double tolerance = 0.0;  // on relative errors
  std::vector<OutputCheck> checks;
  int64_t selected_assignments = 0;   // T·k
  int64_t routed_assignments = 0;     // with an expert (GShard random routing may drop)
  int64_t kept_assignments = 0;       // computed (within capacity)
  int64_t tokens_without_expert = 0;  // tokens none of whose assignments was kept
  double aux_loss = 0.0;
  double z_loss = 0.0;
  std::vector<int64_t> expert_counts;  // [E] routed
  std::vector<int64_t> kept_counts;    // [E] kept

  bool passed() const;
};

// Runs `fusedmoe run` with the arguments after "run"; returns the exit status (0 pass, 1 a
// check failed). Throws UsageError / fusedmoe::Error for bad arguments or configuration.
int run_command(const std::vector<std::string>& args);

}  // namespace fusedmoe::cli
