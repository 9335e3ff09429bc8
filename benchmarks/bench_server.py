"""Server load test: throughput and latency of `vitnp serve` under N concurrent clients, against the engine.

Run (unset the OpenBLAS overrides only for this command; they make OpenBLAS use its Haswell kernels):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /work/venv/bin/python benchmarks/bench_server.py
Options: --model DIR (default: a random checkpoint of google/vit-base-patch16-224's shape, written with
tests/checkpoints.py into a temporary directory), --clients 1,8, --requests-per-client 8, --rounds 3,
--engine-reps 2, --image FILE, --backend auto|numba|blas, --server-arg ARG (passed to `vitnp serve`).

What it does, all bounded (fixed request counts; it stops by itself):
1. loads the model in this process (the engine) and starts `python -m vitnp serve --model DIR` on a free
   127.0.0.1 port (batch size 8, max wait 5 ms); engine calls run on one dedicated thread, as in the
   server,
2. for each round: times the engine's `clf.logits` on a ready batch of 8 preprocessed images
   (--engine-reps calls), then for each client count runs that many client threads, each on its own HTTP
   connection, each sending 1 unmeasured warm-up request then --requests-per-client raw-byte requests
   (x-use-cache: false, so every request runs through the engine). The machine is shared with other
   work, so engine and server measurements alternate and see the same background load,
3. prints a table (medians over rounds; p50/p99 latency over all requests) and writes
   benchmarks/results/server.json, including how many requests each forward-pass batch size served.
Target: with 8 concurrent clients the server reaches >= 0.9x the engine's batch-8 images/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "server.json"
TARGET_RATIO = 0.9
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300


def make_default_checkpoint(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import make_checkpoint

    return make_checkpoint(tmp / "vit-base-random", "vit", "base", num_labels=1000)


class Engine:
    """The model loaded in this process, timed on ready-made pixel batches (no HTTP, no decoding).

    Every engine call runs on one dedicated thread, as in the server's engine worker: with Numba's OpenMP
    threading layer, parallel loops launched from the main thread were measured 2-3x slower (spin-waiting)
    on this 2-core machine, which would flatter the server.
    """

    def __init__(self, model: Path, image: bytes, backend: str):
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._thread.submit(self._load, model, image, backend).result()
        self.times: dict[int, list[float]] = {1: [], 8: []}

    def _load(self, model: Path, image: bytes, backend: str) -> None:
        import vitnp

        self.clf = vitnp.load(model, backend=backend, progress=False)
        self.batches = {b: self.clf.preprocess([image] * b) for b in (1, 8)}
        for x in self.batches.values():
            self.clf.logits(x)  # compile + first touch

    def time(self, batch: int, reps: int) -> None:
        self._thread.submit(self._time, batch, reps).result()

    def _time(self, batch: int, reps: int) -> None:
        for _ in range(reps):
            t0 = time.perf_counter()
            self.clf.logits(self.batches[batch])
            self.times[batch].append(time.perf_counter() - t0)

    def summary(self, batch: int) -> dict:
        t = self.times[batch]
        med = statistics.median(t)
        return {"median_s": med, "min_s": min(t), "max_s": max(t), "reps": len(t),
                "images_per_s": batch / med, "best_images_per_s": batch / min(t)}

    def close(self) -> None:
        self._thread.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, backend: str, log_path: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vitnp", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--backend", backend, "--max-batch-size", "8", "--max-wait-ms", "5",
           *extra]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s: see {log_path}")


def load_run(url: str, image: bytes, clients: int, per_client: int) -> dict:
    """`clients` threads, each sending 1 warm-up + `per_client` measured requests on its own connection."""
    headers = {"Content-Type": "image/jpeg", "x-use-cache": "false"}
    start_barrier = threading.Barrier(clients + 1)
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> int:
        failures = 0
        with requests.Session() as session:
            session.post(url, data=image, headers=headers, timeout=REQUEST_TIMEOUT_S).raise_for_status()
            start_barrier.wait()
            mine = []
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = session.post(url, data=image, headers=headers, timeout=REQUEST_TIMEOUT_S)
                mine.append(time.perf_counter() - t0)
                failures += r.status_code != 200
        with lock:
            latencies.extend(mine)
        return failures

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        start_barrier.wait()
        t0 = time.perf_counter()
        failures = sum(f.result() for f in futures)
        wall = time.perf_counter() - t0
    total = clients * per_client
    lat = np.array(latencies)
    return {"clients": clients, "requests": total, "failures": failures, "wall_s": wall,
            "images_per_s": total / wall, "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)), "latency_max_s": float(lat.max()),
            "latencies_s": lat}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: random ViT-B/16 in a temp dir)")
    p.add_argument("--image", type=Path, default=ROOT / "examples" / "cats.jpg")
    p.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--engine-reps", type=int, default=2, help="engine batch-8 calls per round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of engine + server measurements (default 3)")
    p.add_argument("--backend", default="auto", choices=["auto", "numba", "blas"])
    p.add_argument("--server-arg", action="append", default=[], help="extra `vitnp serve` argument (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    image = args.image.read_bytes()

    with tempfile.TemporaryDirectory(prefix="vitnp-bench-server-") as tmp:
        tmp = Path(tmp)
        model = args.model or make_default_checkpoint(tmp)
        print(f"model: {model}", flush=True)
        engine = Engine(model, image, args.backend)
        engine.time(1, 2)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        proc = start_server(model, port, args.backend, tmp / "server.log", args.server_arg)
        runs: dict[int, list[dict]] = {n: [] for n in clients}
        try:
            # The machine is shared: engine and server measurements alternate so that both see the same
            # background load, and the figures are medians over the rounds.
            for round_ in range(args.rounds):
                engine.time(8, args.engine_reps)
                print(f"round {round_ + 1}: engine batch 8 "
                      f"{8 / statistics.median(engine.times[8][-args.engine_reps:]):.2f} img/s", flush=True)
                for n in clients:
                    run = load_run(url, image, n, args.requests_per_client)
                    runs[n].append(run)
                    print(f"round {round_ + 1}: server, {n} clients {run['images_per_s']:.2f} img/s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log = (tmp / "server.log").read_text(errors="replace")
        engine_summary = {f"batch{b}": engine.summary(b) for b in (1, 8)}
        engine.close()

    engine8 = engine_summary["batch8"]["images_per_s"]
    engine8_best = engine_summary["batch8"]["best_images_per_s"]
    summary = {n: _summarize_runs(n, rs, engine8, engine8_best) for n, rs in runs.items()}
    print()
    print(f"{'what':<24}{'images/s':>10}{'x engine b8':>13}{'p50 s':>9}{'p99 s':>9}{'failures':>10}")
    for b in (1, 8):
        e = engine_summary[f"batch{b}"]
        print(f"{'engine, batch ' + str(b):<24}{e['images_per_s']:>10.2f}{e['images_per_s'] / engine8:>13.2f}"
              f"{e['median_s']:>9.3f}{'':>9}{'':>10}")
    for n, row in summary.items():
        print(f"{'server, ' + str(n) + ' clients':<24}{row['images_per_s']:>10.2f}"
              f"{row['ratio_to_engine_batch8']:>13.2f}{row['latency_p50_s']:>9.3f}{row['latency_p99_s']:>9.3f}"
              f"{row['failures']:>10}")
    eight = summary.get(8)
    met = None if eight is None else eight["ratio_to_engine_batch8"] >= TARGET_RATIO
    if eight is not None:
        print(f"\ntarget: 8 clients >= {TARGET_RATIO}x engine batch-8 images/s: "
              f"{eight['ratio_to_engine_batch8']:.2f}x (best run vs best engine call: "
              f"{eight['best_ratio_to_engine_batch8']:.2f}x) -> {'met' if met else 'NOT met'}")

    result = {
        "command": "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE " + " ".join([sys.executable, *sys.argv]),
        "model": "random ViT-B/16 (google/vit-base-patch16-224 shape)" if args.model is None else str(args.model),
        "image": str(args.image.relative_to(ROOT) if args.image.is_relative_to(ROOT) else args.image),
        "backend": args.backend,
        "server_args": {"max_batch_size": 8, "max_wait_ms": 5, "extra_args": args.server_arg},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                    "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE")},
        "rounds": args.rounds,
        "engine": engine_summary,
        "server": summary,
        "runs": {str(n): rs for n, rs in runs.items()},
        "target": {"clients": 8, "min_ratio_to_engine_batch8": TARGET_RATIO, "met": met},
        "server_batches": _batch_histogram(server_log),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _summarize_runs(clients: int, runs: list[dict], engine8: float, engine8_best: float) -> dict:
    rates = [r["images_per_s"] for r in runs]
    latencies = np.concatenate([r.pop("latencies_s") for r in runs])
    return {
        "clients": clients, "rounds": len(runs), "requests": sum(r["requests"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
        "images_per_s": statistics.median(rates), "best_images_per_s": max(rates),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "ratio_to_engine_batch8": statistics.median(rates) / engine8,
        "best_ratio_to_engine_batch8": max(rates) / engine8_best,
    }


def _batch_histogram(log: str) -> dict:
    """How many requests were answered by forward passes of each batch size (from the access log)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if "vitnp.access" in line and " batch=" in line:
            size = line.split(" batch=")[1].split()[0]
            counts[size] = counts.get(size, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
