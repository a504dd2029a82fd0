// threadpool.cpp — a persistent pool: workers spin briefly on a generation counter (yielding now and
// then), then sleep on a condition variable. A parallel region costs a couple of atomic operations
// when workers are hot.
#include "threadpool.h"

#include <sched.h>

#include <algorithm>
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

    // Each thread owns a contiguous share of the task indices and claims them from the front, in
    // order; a thread with none left steals from the back of another's share. A share's state is one
    // 64-bit word, (generation << 32) | (front << 16) | back, so a worker can only claim a task of
    // the generation it read: a late worker never runs a stale region. Consecutive tasks of one
    // thread are consecutive rows of a matrix, so each thread's weights stream from memory as one
    // run, while stealing still evens out a late or preempted thread (the caller waits for tasks
    // done, not for workers to show up: on a busy machine the caller simply does the work itself).
    // Above 65535 tasks a claimed unit runs several consecutive tasks.
    void run(int n_tasks, const std::function<void(int, int)>& fn) {
        if (n_tasks <= 0) return;
        std::lock_guard<std::mutex> region(region_mu_);
        if (n_threads_ == 1 || n_tasks == 1) {
            for (int t = 0; t < n_tasks; t++) fn(t, 0);
            return;
        }
        fn_ = &fn;
        n_tasks_ = n_tasks;
        per_unit_ = (n_tasks + kMaxUnits - 1) / kMaxUnits;
        const int units = (n_tasks + per_unit_ - 1) / per_unit_;
        done_.store(0, std::memory_order_relaxed);
        // 32 bits of generation: after 2^32 regions (a day or so of decoding) it wraps to 0, which
        // every word below can still hold (unmasked, gen << 32 would drop it and no claim match)
        const uint64_t gen = ((work_.load(std::memory_order_relaxed) >> 32) + 1) & 0xffffffffu;
        for (int i = 0; i < n_threads_; i++) {
            const uint64_t lo = (uint64_t)units * i / n_threads_, hi = (uint64_t)units * (i + 1) / n_threads_;
            shares_[i].w.store(gen << 32 | lo << 16 | hi, std::memory_order_relaxed);
        }
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
        shares_ = std::vector<Share>(n_threads_);
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
    // Claim a unit of generation `gen` from share i: its front (own share) or its back (a steal).
    // -1 when the share is empty or belongs to another generation.
    int claim(int i, uint64_t gen, bool front) {
        std::atomic<uint64_t>& a = shares_[i].w;
        uint64_t w = a.load(std::memory_order_acquire);
        for (;;) {
            if ((w >> 32) != gen) return -1;
            const uint64_t lo = (w >> 16) & 0xffff, hi = w & 0xffff;
            if (lo >= hi) return -1;
            const uint64_t next = front ? (gen << 32 | (lo + 1) << 16 | hi) : (gen << 32 | lo << 16 | (hi - 1));
            if (a.compare_exchange_weak(w, next, std::memory_order_acq_rel)) return (int)(front ? lo : hi - 1);
        }
    }
    void run_unit(int u, int tid) {
        const int t0 = u * per_unit_, t1 = std::min(n_tasks_, t0 + per_unit_);
        for (int t = t0; t < t1; t++) (*fn_)(t, tid);
        done_.fetch_add(t1 - t0, std::memory_order_release);
    }
    // Claim and run tasks of generation `gen` until none are left: own share first, then steals.
    void work(uint64_t gen, int tid) {
        for (int u; (u = claim(tid, gen, true)) >= 0;) run_unit(u, tid);
        for (int k = 1; k < n_threads_; k++) {
            const int victim = (tid + k) % n_threads_;
            for (int u; (u = claim(victim, gen, false)) >= 0;) run_unit(u, tid);
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
    struct alignas(64) Share {  // one thread's claimable units, on a cache line of its own
        std::atomic<uint64_t> w{0};
    };
    static constexpr int kMaxUnits = 0xffff;
    std::vector<Share> shares_;
    int n_tasks_ = 0, per_unit_ = 1;  // written before a region is published, read after
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
