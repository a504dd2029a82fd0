"""The compute pool: every task of a region runs exactly once, whatever the task count (including
counts above the 65535 units a share can name) and the thread count, over many regions in a row
(stale workers, steals), and every thread takes part when there is work for all."""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve import _core


@pytest.fixture
def threads():
    before = _core.get_num_threads()
    yield _core.set_num_threads
    _core.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n_tasks", [0, 1, 2, 3, 7, 64, 65535, 65536, 200_003])
def test_every_task_runs_once(threads, n_threads, n_tasks):
    threads(n_threads)
    runs, per_thread = _core.kernels.pool_counts(n_tasks)
    assert runs.shape == (n_tasks,)
    np.testing.assert_array_equal(runs, np.ones(n_tasks, np.int32))
    assert per_thread.shape == (n_threads,) and int(per_thread.sum()) == n_tasks


@pytest.mark.parametrize("n_tasks", [2, 3, 5, 9, 17])
def test_many_short_regions_in_a_row(threads, n_tasks):
    """Regions back to back, as a decode step runs ~150 of them: a worker that wakes late must not
    claim a task of a region it did not see published, nor miss one."""
    threads(2)
    regions = 20_000
    runs, per_thread = _core.kernels.pool_counts(n_tasks, regions)
    np.testing.assert_array_equal(runs, np.full(n_tasks, regions, np.int32))
    assert int(per_thread.sum()) == n_tasks * regions


def test_workers_take_part(threads):
    """With long regions of many tasks the worker claims its share (the caller alone would mean the
    pool never hands out work)."""
    threads(2)
    _runs, per_thread = _core.kernels.pool_counts(4096, 200)
    assert per_thread.min() > 0
