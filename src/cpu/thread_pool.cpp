// src/cpu/thread_pool.cpp — see thread_pool.hpp.
#include "cpu/thread_pool.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedmoe::cpu {

namespace {

thread_local bool inside_pool = false;

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { loop(i); });
    size_ = threads;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int chunks) {
    std::unique_lock<std::mutex> call_lock(call_mutex_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      chunks_ = chunks;
      pending_ = chunks - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    run_chunk(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_chunk(int chunk) {
    int64_t begin = n_ * chunk / chunks_, end = n_ * (chunk + 1) / chunks_;
    if (begin >= end) return;
    inside_pool = true;
    try {
      (*fn_)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    inside_pool = false;
  }
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= chunks_) continue;
      }
      run_chunk(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  int size_ = 1;
  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int chunks_ = 1;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool instance(num_threads());
  return instance;
}

}  // namespace

SerialScope::SerialScope() : saved_(inside_pool) { inside_pool = true; }
SerialScope::~SerialScope() { inside_pool = saved_; }

int num_threads() {
  static const int threads = [] {
    if (const char* env = std::getenv("FUSEDMOE_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return std::min(v, 256);
    }
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk) {
  if (n <= 0) return;
  int64_t chunks = std::min<int64_t>(num_threads(), (n + min_chunk - 1) / std::max<int64_t>(1, min_chunk));
  if (chunks <= 1 || inside_pool) {
    fn(0, n);
    return;
  }
  // Workers beyond `chunks` skip the generation; pending counts only the helpers that run.
  Pool& p = pool();
  p.run(n, fn, static_cast<int>(std::min<int64_t>(chunks, p.size())));
}

}  // namespace fusedmoe::cpu
