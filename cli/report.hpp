// cli/report.hpp — the result table of `fusedmoe run`: config, backend, times and GFLOP/s,
// per-output errors with PASS/FAIL, dropped assignments, balance losses and the per-expert load.
#pragma once

#include <cstdio>

#include "run_command.hpp"

namespace fusedmoe::cli {

void print_report(const RunReport& report, std::FILE* out);

}  // namespace fusedmoe::cli
