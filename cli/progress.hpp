// cli/progress.hpp — the progress display of `fusedmoe run` on stderr.
//
// Quiet for short runs. A phase is shown once the whole run has taken more than
// kShowAfterSeconds, or at once when it is expected to be slow. On a terminal one status line,
// "[3/5] naive reference forward ... 4.2 s", is redrawn in place (\r) by a ticker thread and
// erased at the end; otherwise each shown phase gets a plain line when it starts and one when it
// ends, so logs stay readable.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace fusedmoe::cli {

class Progress {
 public:
  static constexpr double kShowAfterSeconds = 2.0;

  explicit Progress(int num_phases);
  ~Progress();  // ends the current phase and erases the status line
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Ends the current phase (if any) and starts the next one.
  void begin_phase(std::string name, double expected_seconds);
  // Ends the current phase.
  void end_phase();

 private:
  using Clock = std::chrono::steady_clock;
  double seconds_since(Clock::time_point start) const;
  void ticker_loop();
  void refresh_locked();  // shows the phase if due; redraws the terminal line
  void end_phase_locked();

  const int num_phases_;
  const bool stderr_is_terminal_;
  const Clock::time_point run_start_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  int phase_idx_ = 0;  // 1-based; 0 before the first phase
  std::string phase_name_;
  bool phase_active_ = false;
  double phase_expected_seconds_ = 0.0;
  Clock::time_point phase_start_;
  bool phase_shown_ = false;  // its start was printed (plain) or it is on the status line
  bool line_drawn_ = false;   // the terminal status line holds text
  std::thread ticker_;
};

}  // namespace fusedmoe::cli
