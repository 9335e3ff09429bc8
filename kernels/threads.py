"""Thread-count control shared by Numba and the BLAS library numpy uses."""
import numba

_blas_limiter = None


def set_num_threads(n):
    """Use n threads for Numba parallel loops and cap BLAS at n too.

    Numba (OpenMP/workqueue) and OpenBLAS each keep their own pool; calls alternate layer by layer, so
    if BLAS were allowed more threads than cores its spinning workers would steal cores from Numba's.
    """
    global _blas_limiter
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    from threadpoolctl import threadpool_limits

    _blas_limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def get_num_threads():
    return numba.get_num_threads()
