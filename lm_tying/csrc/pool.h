// Threads kept between calls, shared by the library's parallel functions (the kernel and the pair generator).
//
// A thread started for each call often begins on the core of the calling thread and waits for the scheduler to
// move it (measured: a kernel call at a third of its speed, now and then); these wait for work instead.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lm_tying {

class Pool {
 public:
  // Runs job() on `threads` threads (the caller's included) and returns when all have finished. One call at a
  // time: callers on other threads wait their turn.
  void run(int threads, const std::function<void()>& job) {
    std::lock_guard<std::mutex> one_call_at_a_time(calls_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < threads - 1) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id, seen = generation_] { serve(id, seen); });  // it takes the next job
    }
    job_ = &job;
    active_ = pending_ = threads - 1;
    ++generation_;
    wake_.notify_all();
    lock.unlock();
    job();
    lock.lock();
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void serve(int id, int64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void()>* job = job_;
      lock.unlock();
      (*job)();
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex calls_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;  // never joined: they wait for work until the process exits
  const std::function<void()>* job_ = nullptr;
  int64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
};

// The process's pool. A forked child has none of its parent's threads: it starts a pool of its own (the
// parent's object, whose threads do not exist there, is left alone).
inline Pool& pool() {
  static Pool* current = nullptr;
  static pid_t owner = 0;
  if (current == nullptr || owner != getpid()) {
    current = new Pool();
    owner = getpid();
  }
  return *current;
}

// fn(task) for task = 0 .. tasks - 1 on `threads` threads, each taking the next task from a shared counter (on a
// VM whose vCPUs get descheduled, a fixed share each makes the call wait for the slowest thread).
template <typename Fn>
void parallel_for(int threads, int64_t tasks, Fn fn) {
  std::atomic<int64_t> next{0};
  pool().run(threads, [&] {
    for (int64_t task = next++; task < tasks; task = next++) fn(task);
  });
}

}  // namespace lm_tying
