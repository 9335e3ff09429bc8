"""Per-kernel benchmark: Numba GEMM vs BLAS on the ViT-B Linear shapes, plus attention, LayerNorm, GELU.

Run:
    python benchmarks/bench_kernels.py              # the host's ISA
    python benchmarks/bench_kernels.py --isa avx2   # as an AVX2-only CPU runs it (vitnp and OpenBLAS)
The script re-runs itself without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (they pin OpenBLAS to a slower kernel).
Writes benchmarks/results/kernels.json.  The machine is shared, so every number is the median of
several timed repetitions, the minimum is printed and recorded beside it, and a measurement whose max/min
exceeds common.NOISY_MAX_OVER_MIN gets a WARNING line (and a record under "noise_warnings").
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEQ = 197       # ViT-B/16 at 224x224: 196 patches + [CLS]
WIDTH = 768
HEADS = 12
GEMM_SHAPES = [("qkv", 768, 2304), ("attn_out", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]


CLOCK = time.perf_counter  # switched to time.thread_time for --threads 1 (robust to preemption)
NOISE_WARNINGS = []  # common.noise_record records of this run, written to the JSON


def timed(fn, reps, what):
    """Median, min and max time of fn() over `reps` runs (after one warm-up call); warns when they spread."""
    fn()
    times = []
    for _ in range(reps):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    NOISE_WARNINGS.extend(common.print_noise_warnings([common.noise_record(what, [t * 1e3 for t in times], "ms")]))
    return statistics.median(times), min(times), max(times), len(times)


def timed_blocks(fns, reps, settle=0.25):
    """timed() for several functions, one block each, with a pause before every block.

    Not interleaved: OpenBLAS worker threads keep spinning for tens of milliseconds after each call
    (OPENBLAS_THREAD_TIMEOUT, 2**28 cycles by default), and a Numba call made in that window shares its
    cores with them and runs at about half speed.  The pause lets either pool go idle first.
    """
    result = {}
    for name, fn in fns.items():
        time.sleep(settle)
        result[name] = timed(fn, reps, name)
    return result


def blas_info():
    from threadpoolctl import threadpool_info
    return [{k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version", "filepath")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def bench_gemm(batches, reps, kernels):
    rng = np.random.default_rng(0)
    rows_out = []
    for batch in batches:
        m = SEQ * batch
        for name, k, n in GEMM_SHAPES:
            weight = rng.standard_normal((n, k), dtype=np.float32) * 0.02
            x = rng.standard_normal((m, k), dtype=np.float32)
            out = np.empty((m, n), np.float32)
            flops = 2.0 * m * k * n
            row = {"batch": batch, "name": name, "M": m, "K": k, "N": n}
            # Pure GEMM (no bias / epilogue): the kernels themselves, not the epilogue passes.
            layers = {backend: kernels.Linear(weight, None, backend=backend) for backend in ("numba", "blas")}
            stats = timed_blocks({f"{name} B={batch} {b}": (lambda lin=lin: lin(x, out)) for b, lin in layers.items()},
                                 reps)
            for backend, (med, lo, hi, count) in zip(layers, stats.values()):
                row[backend] = {"median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3, "reps": count,
                                "gflops_median": flops / med / 1e9, "gflops_best": flops / lo / 1e9}
            row["ratio_numba_over_blas"] = row["numba"]["gflops_median"] / row["blas"]["gflops_median"]
            row["ratio_best"] = row["numba"]["gflops_best"] / row["blas"]["gflops_best"]
            rows_out.append(row)
            print(f"  B={batch:<2d} {name:9s} M={m:<5d} K={k:<5d} N={n:<5d} "
                  f"numba {row['numba']['gflops_median']:7.1f} GF/s (best {row['numba']['gflops_best']:6.1f})  "
                  f"blas {row['blas']['gflops_median']:7.1f} GF/s (best {row['blas']['gflops_best']:6.1f})  "
                  f"ratio {row['ratio_numba_over_blas']:.2f} (best/best {row['ratio_best']:.2f})", flush=True)
    return rows_out


def bench_epilogues(reps, kernels):
    """Cost of the fused epilogues on fc1 at batch 1 (numba) vs BLAS + separate pass."""
    rng = np.random.default_rng(1)
    m, k, n = SEQ, 768, 3072
    weight = rng.standard_normal((n, k), dtype=np.float32) * 0.02
    bias = rng.standard_normal(n, dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    out = np.zeros((m, n), np.float32)
    result = {}
    for backend in ("numba", "blas"):
        lin = kernels.Linear(weight, bias, backend=backend)
        for epilogue in ("none", "gelu", "add"):
            time.sleep(0.25)
            med, lo, hi, count = timed(lambda: lin(x, out, epilogue), reps, f"fc1 B=1 {backend} {epilogue}")
            result[f"{backend}_{epilogue}_ms"] = med * 1e3
            result[f"{backend}_{epilogue}_min_ms"] = lo * 1e3
    print("  fc1 B=1 epilogues (median / min ms): " + ", ".join(
        f"{k[:-3]} {v:.3f} / {result[k[:-3] + '_min_ms']:.3f}" for k, v in result.items() if not k.endswith("_min_ms")))
    return result


def bench_attention(batches, reps, kernels):
    rng = np.random.default_rng(2)
    result = []
    for batch in batches:
        qkv = rng.standard_normal((batch, SEQ, 3 * WIDTH), dtype=np.float32)
        out = np.empty((batch, SEQ, WIDTH), np.float32)
        time.sleep(0.25)
        med, lo, hi, count = timed(lambda: kernels.attention(qkv, out, HEADS), reps, f"attention B={batch}")
        # Reference: the same computation with NumPy batched matmuls (materialises the score tensor).
        q, k, v = (qkv[..., i * WIDTH:(i + 1) * WIDTH].reshape(batch, SEQ, HEADS, -1).transpose(0, 2, 1, 3)
                   for i in range(3))
        kt = np.ascontiguousarray(k.transpose(0, 1, 3, 2))
        qc, vc = np.ascontiguousarray(q), np.ascontiguousarray(v)

        def numpy_attention():
            s = np.matmul(qc, kt) * np.float32(1 / 8)
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            return np.matmul(s, vc)

        time.sleep(0.25)
        nmed, nlo, nhi, _ = timed(numpy_attention, reps, f"numpy attention B={batch}")
        flops = 4.0 * batch * SEQ * SEQ * WIDTH
        row = {"batch": batch, "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
               "gflops_median": flops / med / 1e9, "numpy_median_ms": nmed * 1e3, "numpy_min_ms": nlo * 1e3}
        result.append(row)
        print(f"  attention B={batch:<2d} {med * 1e3:8.3f} ms, min {lo * 1e3:8.3f} ({row['gflops_median']:.1f} GF/s)   "
              f"numpy-matmul reference {nmed * 1e3:8.3f} ms, min {nlo * 1e3:8.3f}")
    return result


def bench_elementwise(batches, reps, kernels):
    rng = np.random.default_rng(3)
    result = []
    for batch in batches:
        m = SEQ * batch
        x = rng.standard_normal((m, WIDTH), dtype=np.float32)
        gamma = rng.standard_normal(WIDTH, dtype=np.float32)
        beta = rng.standard_normal(WIDTH, dtype=np.float32)
        out = np.empty_like(x)
        time.sleep(0.25)
        ln_med, ln_min, *_ = timed(lambda: kernels.layernorm(x, gamma, beta, 1e-6, out), reps, f"layernorm B={batch}")
        hidden = rng.standard_normal((m, 4 * WIDTH), dtype=np.float32)
        work = hidden.copy()

        def gelu():
            work[:] = hidden  # keep inputs in range; the copy is timed separately and subtracted
            kernels.gelu_erf(work)

        g_med, g_min, *_ = timed(gelu, reps, f"gelu (with copy) B={batch}")
        c_med, c_min, *_ = timed(lambda: work.__setitem__(slice(None), hidden), reps, f"copy B={batch}")
        scores = rng.standard_normal((m, SEQ), dtype=np.float32)
        sm_out = np.empty_like(scores)
        s_med, s_min, *_ = timed(lambda: kernels.softmax_rows(scores, sm_out), reps, f"softmax B={batch}")
        row = {"batch": batch, "layernorm_ms": ln_med * 1e3, "gelu_ms": max(g_med - c_med, 0.0) * 1e3,
               "gelu_elements": hidden.size, "softmax_rows_ms": s_med * 1e3, "layernorm_min_ms": ln_min * 1e3,
               "gelu_min_ms": max(g_min - c_min, 0.0) * 1e3, "softmax_rows_min_ms": s_min * 1e3}
        row["gelu_ns_per_element"] = row["gelu_ms"] * 1e6 / hidden.size
        result.append(row)
        print(f"  B={batch:<2d} layernorm ({m}x{WIDTH}) {row['layernorm_ms']:.3f} ms "
              f"(min {row['layernorm_min_ms']:.3f})   "
              f"gelu ({m}x{4 * WIDTH}) {row['gelu_ms']:.3f} ms (min {row['gelu_min_ms']:.3f}; "
              f"{row['gelu_ns_per_element']:.2f} ns/elem)   "
              f"softmax ({m}x{SEQ}) {row['softmax_rows_ms']:.3f} ms (min {row['softmax_rows_min_ms']:.3f})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per measurement (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["gemm", "attention", "elementwise", "epilogues"], nargs="+")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "kernels.json")
    common.add_isa_argument(parser)
    parser.add_argument("--no-reexec", action="store_true",
                        help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE if set (by default the script re-runs "
                             "itself without them)")
    args = parser.parse_args(argv)
    common.reexec_without_blas_overrides(args.no_reexec, args.isa)

    emulated = common.ISA_EMULATION.get(os.environ.get(common.ISA_MARKER, ""), {})
    pessimistic = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                   if v in os.environ and emulated.get(v) != os.environ[v]]
    if pessimistic:
        print(f"WARNING: {', '.join(pessimistic)} set in the environment; OpenBLAS runs a slower kernel "
              f"and the BLAS numbers are pessimistic. Run with "
              f"`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ...`.", file=sys.stderr)

    from vitnp import kernels
    import numba

    threads = kernels.set_num_threads(args.threads or numba.config.NUMBA_NUM_THREADS)
    global CLOCK
    if threads == 1:
        CLOCK = time.thread_time
    parts = set(args.only or ["gemm", "epilogues", "attention", "elementwise"])
    blas = blas_info()
    kernels.layernorm(np.zeros((2, 4), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32), 1e-5,
                      np.zeros((2, 4), np.float32))  # starts Numba's thread pool so the layer is known
    layer = numba.threading_layer()
    print(f"threads={threads} numba {numba.__version__} threading layer={layer} numpy {np.__version__} "
          f"clock={'thread CPU time' if threads == 1 else 'wall'}")
    for b in blas:
        print(f"BLAS: {b['internal_api']} {b['version']} architecture={b['architecture']} "
              f"num_threads={b['num_threads']}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"load average at start: {load}")
    if load is not None and load[0] > os.cpu_count():
        print(f"WARNING: load average {load[0]:.1f} exceeds the {os.cpu_count()} CPUs: other processes are "
              f"competing for the cores and multi-threaded timings will be noisy (--threads 1 measures "
              f"per-thread CPU time, which is robust to that).", file=sys.stderr)

    machine = common.machine_info()
    common.print_machine(machine)
    results = {"command": " ".join([sys.executable] + sys.argv), "machine": machine, "threads": threads,
               "blas": blas,
               "threading_layer": layer, "clock": "thread_time" if threads == 1 else "perf_counter",
               "openblas_env_overrides": pessimistic, "loadavg_start": load,
               "cpu": machine["cpu"], "isa": machine["vitnp_kernels"]["isa"], "numba": numba.__version__}
    if "gemm" in parts:
        print("GEMM without bias (GFLOP/s, median of reps; best in parentheses):")
        results["gemm"] = bench_gemm(args.batches, args.reps, kernels)
    if "epilogues" in parts:
        results["epilogues"] = bench_epilogues(args.reps, kernels)
    if "attention" in parts:
        print("Attention:")
        results["attention"] = bench_attention(args.batches, args.reps, kernels)
    if "elementwise" in parts:
        print("LayerNorm / GELU / softmax:")
        results["elementwise"] = bench_elementwise(args.batches, args.reps, kernels)
    results["erf_max_error"] = kernels.erf_max_error()
    results["gelu_max_error"] = kernels.gelu_max_error()
    print(f"erf max abs error vs math.erf: {results['erf_max_error']:.3g}; GELU max error vs math.erfc "
          f"(scaled by max(1, |x|)): {results['gelu_max_error']:.3g}")
    results["noise_warnings"] = NOISE_WARNINGS
    results["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
