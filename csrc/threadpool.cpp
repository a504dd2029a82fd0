// threadpool.cpp — a persistent pool: workers spin briefly on a generation counter (yielding now and
// then), then sleep on a condition variable. A parallel region costs a couple of atomic operations
// when workers are hot.
#include "threadpool.h"

#include <sched.h>

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TS_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define TS_PAUSE() asm volatile("yield" ::: "memory")
#else
#define TS_PAUSE() ((void)0)
#endif

namespace ts {

namespace {

int default_threads() {
    if (const char* e = std::getenv("TINYSERVE_THREADS")) {
        int n = std::atoi(e);
        if (n > 0) return n;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    unsigned n = std::thread::hardware_concurrency();
    return n ? (int)n : 1;
}

constexpr int kSpinIters = 1 << 13;  // ~100-200 us of spinning before a worker sleeps
// A spinning worker yields its core every kYieldEvery spins (~5 us): a system call that returns at
// once when nothing else waits for the core. Under SCHED_FIFO (`chrt -f`), where a thread of the
// same priority is never preempted, this is what lets a woken thread (the server's event loop, a
// local client) run beside a forward instead of waiting for the worker to sleep.
constexpr int kYieldEvery = 1 << 8;

}  // namespace

class ThreadPool {
  public:
    explicit ThreadPool(int n) { start(n); }
    ~ThreadPool() { stop(); }

    int size() const { return n_threads_; }

    void resize(int n) {
        std::lock_guard<std::mutex> region(region_mu_);
        stop();
        start(n);
    }

    // Tasks are claimed from one 64-bit word: (generation << 32) | next task index. A worker can
    // only claim a task of the generation it read, so a late worker never runs a stale region,
    // and the caller waits for tasks done, not for workers to show up: on a busy machine the
    // caller simply does the work itself.
    void run(int n_tasks, const std::function<void(int, int)>& fn) {
        if (n_tasks <= 0) return;
        std::lock_guard<std::mutex> region(region_mu_);
        if (n_threads_ == 1 || n_tasks == 1) {
            for (int t = 0; t < n_tasks; t++) fn(t, 0);
            return;
        }
        fn_ = &fn;
        n_tasks_.store(n_tasks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const uint64_t gen = (work_.load(std::memory_order_relaxed) >> 32) + 1;
        work_.store(gen << 32, std::memory_order_release);
        if (sleepers_.load() > 0) {
            { std::lock_guard<std::mutex> l(mu_); }
            cv_.notify_all();
        }
        work(gen, 0);
        int spins = 0;
        while (done_.load(std::memory_order_acquire) < n_tasks) {
            TS_PAUSE();
            if (++spins > 4096) sched_yield();  // a preempted worker holds a task: let it run
        }
    }

  private:
    void start(int n) {
        n_threads_ = n < 1 ? 1 : n;
        quit_.store(false);
        for (int i = 1; i < n_threads_; i++) workers_.emplace_back([this, i] { loop(i); });
    }
    void stop() {
        {
            std::lock_guard<std::mutex> l(mu_);
            quit_.store(true);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }
    // Claim and run tasks of generation `gen` until none are left.
    void work(uint64_t gen, int tid) {
        uint64_t w = work_.load(std::memory_order_acquire);
        for (;;) {
            if ((w >> 32) != gen) return;
            const uint32_t idx = (uint32_t)w;
            if ((int)idx >= n_tasks_.load(std::memory_order_relaxed)) return;
            if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
            (*fn_)((int)idx, tid);
            done_.fetch_add(1, std::memory_order_release);
            w = work_.load(std::memory_order_acquire);
        }
    }
    void loop(int tid) {
        uint64_t seen = work_.load() >> 32;
        for (;;) {
            int spins = 0;
            auto fresh = [&] { return (work_.load(std::memory_order_acquire) >> 32) != seen; };
            while (!fresh() && !quit_.load(std::memory_order_relaxed) && spins < kSpinIters) {
                TS_PAUSE();
                if (++spins % kYieldEvery == 0) sched_yield();
            }
            if (!fresh() && !quit_.load()) {
                std::unique_lock<std::mutex> l(mu_);
                sleepers_.fetch_add(1);
                cv_.wait(l, [&] { return fresh() || quit_.load(); });
                sleepers_.fetch_sub(1);
            }
            if (quit_.load()) return;
            seen = work_.load(std::memory_order_acquire) >> 32;
            work(seen, tid);
        }
    }

    int n_threads_ = 1;
    std::vector<std::thread> workers_;
    std::mutex region_mu_;  // one parallel region at a time
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<uint64_t> work_{0};
    std::atomic<int> done_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> quit_{false};
    std::atomic<int> n_tasks_{0};
    const std::function<void(int, int)>* fn_ = nullptr;
};

ThreadPool& compute_pool() {
    static ThreadPool pool(default_threads());
    return pool;
}

void set_num_threads(int n) { compute_pool().resize(n <= 0 ? default_threads() : n); }
int get_num_threads() { return compute_pool().size(); }
void parallel_for(int n_tasks, const std::function<void(int, int)>& fn) { compute_pool().run(n_tasks, fn); }

}  // namespace ts
