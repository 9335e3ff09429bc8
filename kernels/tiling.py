"""The output grid both parallel GEMM drivers (gemm.py, qgemm/) cut into tasks, and ceiling division."""
from numba import njit


@njit(cache=True, inline="always")
def cdiv(a, b):
    """ceil(a / b) for non-negative integers."""
    return (a + b - 1) // b


@njit(cache=True, inline="always")
def task_count(rows, cols, row_split, col_split):
    """Tasks in the grid of row_split x col_split output blocks."""
    return cdiv(rows, row_split) * cdiv(cols, col_split)


@njit(cache=True, inline="always")
def task_bounds(task, rows, cols, row_split, col_split):
    """(r0, r1, c0, c1): the output block of grid task `task`, row-major over the grid."""
    col_tasks = cdiv(cols, col_split)
    rt = task // col_tasks
    r0 = rt * row_split
    c0 = (task - rt * col_tasks) * col_split
    return r0, min(r0 + row_split, rows), c0, min(c0 + col_split, cols)
