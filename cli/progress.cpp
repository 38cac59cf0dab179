// cli/progress.cpp — see progress.hpp.
#include "progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace fusedmoe::cli {

namespace {
constexpr std::chrono::milliseconds kTickInterval{100};
}  // namespace

Progress::Progress(int num_phases)
    : num_phases_(num_phases),
      stderr_is_terminal_(isatty(fileno(stderr)) != 0),
      run_start_(Clock::now()) {
  ticker_ = std::thread([this] { ticker_loop(); });
}

Progress::~Progress() {
  {
    std::lock_guard lock(mutex_);
    end_phase_locked();
    stopping_ = true;
  }
  wake_.notify_all();
  ticker_.join();
}

double Progress::seconds_since(Clock::time_point start) const {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void Progress::begin_phase(std::string name, double expected_seconds) {
  std::lock_guard lock(mutex_);
  end_phase_locked();
  ++phase_idx_;
  phase_name_ = std::move(name);
  phase_active_ = true;
  phase_expected_seconds_ = expected_seconds;
  phase_start_ = Clock::now();
  phase_shown_ = false;
  refresh_locked();
}

void Progress::end_phase() {
  std::lock_guard lock(mutex_);
  end_phase_locked();
}

void Progress::end_phase_locked() {
  if (!phase_active_) return;
  phase_active_ = false;
  if (!phase_shown_) return;
  double phase_seconds = seconds_since(phase_start_);
  if (stderr_is_terminal_) {
    // The final time of the phase; the next phase or the destructor overwrites the line.
    std::fprintf(stderr, "\r[%d/%d] %s ... %.1f s\033[K", phase_idx_, num_phases_,
                 phase_name_.c_str(), phase_seconds);
  } else {
    std::fprintf(stderr, "[%d/%d] %s done in %.1f s\n", phase_idx_, num_phases_,
                 phase_name_.c_str(), phase_seconds);
  }
  std::fflush(stderr);
}

void Progress::refresh_locked() {
  if (!phase_active_) return;
  bool due =
      seconds_since(run_start_) > kShowAfterSeconds || phase_expected_seconds_ > kShowAfterSeconds;
  if (!phase_shown_ && !due) return;
  if (stderr_is_terminal_) {
    std::fprintf(stderr, "\r[%d/%d] %s ... %.1f s\033[K", phase_idx_, num_phases_,
                 phase_name_.c_str(), seconds_since(phase_start_));
    line_drawn_ = true;
  } else if (!phase_shown_) {
    std::fprintf(stderr, "[%d/%d] %s ...\n", phase_idx_, num_phases_, phase_name_.c_str());
  }
  phase_shown_ = true;
  std::fflush(stderr);
}

void Progress::ticker_loop() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, kTickInterval);
    if (!stopping_) refresh_locked();
  }
  if (line_drawn_) {
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
  }
}

}  // namespace fusedmoe::cli
