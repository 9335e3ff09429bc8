"""kernels/parallel.py: the launcher every heavy parallel kernel goes through."""
import numpy as np
import pytest
from numba import njit, set_num_threads, get_num_threads

from vitnp.kernels import parallel


@njit
def _record(worker, workers, seen, scale, rows):
    for row in range(worker, rows.shape[0], workers):
        rows[row, :] = scale * (row + 1)
        seen[row] = worker


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_every_worker_runs_its_share_once(workers):
    rows = np.zeros((11, 4), np.float32)
    seen = np.full(11, -1, np.int64)
    parallel.run(_record, workers, seen, np.float32(0.5), rows)
    assert seen.tolist() == [r % workers for r in range(11)]
    np.testing.assert_array_equal(rows, 0.5 * np.arange(1, 12, dtype=np.float32)[:, None] * np.ones(4, np.float32))


def test_each_argument_type_gets_its_own_compiled_task():
    """The same task with float32 and float64 rows, writable and read-only inputs: each call runs code compiled
    for its own types (a task compiled for float32 rows would write float64 rows as garbage)."""
    for dtype in (np.float32, np.float64):
        rows = np.zeros((5, 3), dtype)
        seen = np.zeros(5, np.int64)
        parallel.run(_record, 2, seen, dtype(2.0), rows)
        np.testing.assert_array_equal(rows[:, 0], 2.0 * np.arange(1, 6))
    addresses = {parallel.task_address(_record, (np.zeros(5, np.int64), dtype(1), np.zeros((5, 3), dtype)))
                 for dtype in (np.float32, np.float64)}
    assert len(addresses) == 2


def test_more_workers_than_threads_still_run_every_share():
    previous = get_num_threads()
    set_num_threads(1)
    try:
        seen = np.full(6, -1, np.int64)
        parallel.run(_record, 3, seen, np.float32(1.0), np.zeros((6, 1), np.float32))
        assert seen.tolist() == [0, 1, 2, 0, 1, 2]
    finally:
        set_num_threads(previous)


def test_arrays_of_other_layouts_get_their_own_compiled_task():
    """A C-ordered, a Fortran-ordered and a strided view of the same rows: code compiled for one layout reads
    the others' elements from the wrong places, so each must run its own."""
    base = np.zeros((9, 8), np.float32)
    for rows in (np.zeros((9, 4), np.float32), np.zeros((9, 4), np.float32, order="F"), base[:, ::2]):
        seen = np.full(9, -1, np.int64)
        parallel.run(_record, 2, seen, np.float32(3.0), rows)
        np.testing.assert_array_equal(rows, 3.0 * np.arange(1, 10, dtype=np.float32)[:, None] * np.ones(4))
    np.testing.assert_array_equal(base[:, 1::2], 0.0)  # the strided view wrote only its own columns
