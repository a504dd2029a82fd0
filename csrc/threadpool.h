// threadpool.h — one persistent compute pool for the whole process, shared by every model.
// parallel_for(n, fn) runs fn(i) for i in [0, n) on the calling thread plus the workers and
// returns when all are done. Not re-entrant: one parallel region at a time (a mutex serialises
// callers from different Python threads).
#pragma once
#include <functional>

namespace ts {

class ThreadPool;
ThreadPool& compute_pool();
void set_num_threads(int n);  // 0 = number of cores; takes effect for the next region
int get_num_threads();

// Run fn(task, thread_index) for task in [0, n_tasks). Each thread takes a contiguous share of the
// tasks in order and then steals from the back of the others' (threadpool.cpp).
void parallel_for(int n_tasks, const std::function<void(int task, int thread)>& fn);

}  // namespace ts
