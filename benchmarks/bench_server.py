"""Server load test: throughput and latency of `vitnp serve` under N concurrent clients, against the engine.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_server.py          # 3 rounds, ~5 min
    python benchmarks/bench_server.py --quick      # 1 round, 2 requests per client, writes server-quick.json

Model: --model DIR, default the random-initialised google/vit-base-patch16-224-shaped checkpoint that
common.benchmark_checkpoint writes once with tests/checkpoints.py (ViT-B/16, 224 px, 1000 labels).

All of it is bounded (fixed request counts) and stops by itself; the server listens on 127.0.0.1 only:
1. loads the model in this process (the engine) and starts `python -m vitnp serve --model DIR` on a free
   127.0.0.1 port (--max-batch-size 8, --max-wait-ms 5, the defaults). Engine calls run on one dedicated
   thread, as in the server's engine worker (with Numba's OpenMP layer, parallel loops launched from the main
   thread were measured 2-3x slower on this machine, which would flatter the server).
2. each round: times the engine's `clf.logits` on a ready batch of 8 preprocessed images (--engine-reps calls),
   then for each client count (--clients 1,8) runs that many client threads, each on its own HTTP connection,
   each sending 1 unmeasured warm-up request then --requests-per-client raw-byte requests (image/jpeg,
   x-use-cache: false, so every request is decoded and runs through the engine). The machine is shared, so
   engine and server measurements alternate and see the same background load.
3. prints a table (images/s: median over rounds; p50/p99 latency over every request), the target line, and
   writes benchmarks/results/server.json (every run, the engine timings, the machine, and how many requests
   each forward-pass batch size served, from the server's access log).

Target: with 8 concurrent clients the server reaches >= 0.9x the engine's batch-8 images/s.

OpenBLAS overrides: like the other benchmarks, when OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set the script
re-executes itself without them (the server inherits that environment); --no-reexec keeps them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_RATIO = 0.9
TARGET_CLIENTS = 8
MAX_BATCH_SIZE = 8
MAX_WAIT_MS = 5
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300


class Engine:
    """The model loaded in this process, timed on ready-made pixel batches (no HTTP, no decoding)."""

    def __init__(self, model: Path, image: bytes, backend: str):
        # One thread for every engine call, like the server's engine worker.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._thread.submit(self._load, model, image, backend).result()
        self.times: dict[int, list[float]] = {1: [], MAX_BATCH_SIZE: []}

    def _load(self, model: Path, image: bytes, backend: str) -> None:
        import vitnp

        self.clf = vitnp.load(model, backend=backend, progress=False)
        self.batches = {b: self.clf.preprocess([image] * b) for b in (1, MAX_BATCH_SIZE)}
        for x in self.batches.values():
            self.clf.logits(x)  # compile + first touch

    def time(self, batch: int, reps: int) -> list[float]:
        return self._thread.submit(self._time, batch, reps).result()

    def _time(self, batch: int, reps: int) -> list[float]:
        new = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.clf.logits(self.batches[batch])
            new.append(time.perf_counter() - t0)
        self.times[batch].extend(new)
        return new

    def summary(self, batch: int) -> dict:
        t = self.times[batch]
        med = statistics.median(t)
        return {"median_s": med, "min_s": min(t), "max_s": max(t), "reps": len(t), "times_s": t,
                "images_per_s": batch / med, "best_images_per_s": batch / min(t)}

    def close(self) -> None:
        self._thread.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, backend: str, log_path: Path, extra: list[str]) -> subprocess.Popen:
    import requests

    cmd = [sys.executable, "-m", "vitnp", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--backend", backend, "--max-batch-size", str(MAX_BATCH_SIZE),
           "--max-wait-ms", str(MAX_WAIT_MS), *extra]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def load_run(url: str, image: bytes, clients: int, per_client: int) -> dict:
    """`clients` threads, each sending 1 warm-up + `per_client` measured requests on its own connection."""
    import requests

    headers = {"Content-Type": "image/jpeg", "x-use-cache": "false"}
    start = threading.Barrier(clients + 1)
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> int:
        failures = 0
        mine = []
        with requests.Session() as session:
            session.post(url, data=image, headers=headers, timeout=REQUEST_TIMEOUT_S).raise_for_status()
            start.wait()
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
        start.wait()
        t0 = time.perf_counter()
        failures = sum(f.result() for f in futures)
        wall = time.perf_counter() - t0
    total = clients * per_client
    return {"clients": clients, "requests": total, "failures": failures, "wall_s": wall,
            "images_per_s": total / wall, "latencies_s": latencies}


def summarize_runs(clients: int, runs: list[dict], engine: dict) -> dict:
    rates = [r["images_per_s"] for r in runs]
    latencies = np.concatenate([r["latencies_s"] for r in runs])
    return {
        "clients": clients, "rounds": len(runs), "requests": sum(r["requests"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
        "images_per_s": statistics.median(rates), "best_images_per_s": max(rates),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "ratio_to_engine_batch8": statistics.median(rates) / engine["images_per_s"],
        "best_ratio_to_engine_batch8": max(rates) / engine["best_images_per_s"],
    }


def batch_histogram(log: str) -> dict:
    """Requests answered per forward-pass batch size, from the server's access log ("-": not a forward)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if "vitnp.access" in line and " batch=" in line:
            size = line.split(" batch=")[1].split()[0]
            counts[size] = counts.get(size, 0) + 1
    return dict(sorted(counts.items()))


def run(args) -> dict:
    model = Path(args.model) if args.model else common.benchmark_checkpoint()
    image = args.image.read_bytes()
    clients = args.clients
    print(f"model: {model}", flush=True)
    engine = Engine(model, image, args.backend)
    engine.time(1, args.engine_reps)
    runs: dict[int, list[dict]] = {n: [] for n in clients}
    with tempfile.TemporaryDirectory(prefix="vitnp-bench-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        port = free_port()
        proc = start_server(model, port, args.backend, log_path, args.server_arg)
        try:
            for round_ in range(args.rounds):
                t = engine.time(MAX_BATCH_SIZE, args.engine_reps)
                print(f"round {round_ + 1}: engine batch {MAX_BATCH_SIZE}: "
                      f"{MAX_BATCH_SIZE / statistics.median(t):.2f} img/s", flush=True)
                for n in clients:
                    r = load_run(f"http://127.0.0.1:{port}/", image, n, args.requests_per_client)
                    runs[n].append(r)
                    failed = f" ({r['failures']} failed)" if r["failures"] else ""
                    print(f"round {round_ + 1}: server, {n} clients: {r['images_per_s']:.2f} img/s{failed}",
                          flush=True)
        finally:
            stop_server(proc)
            server_log = log_path.read_text(errors="replace")
    engine_summary = {f"batch{b}": engine.summary(b) for b in (1, MAX_BATCH_SIZE)}
    # Rounds of the server as wall seconds of a round, so max/min reads the same way as the engine calls'.
    noise = [common.noise_record(f"engine, batch {b}", engine.times[b]) for b in (1, MAX_BATCH_SIZE)]
    noise += [common.noise_record(f"server, {n} clients, round wall time", [r["wall_s"] for r in rs])
              for n, rs in runs.items()]
    engine.close()
    engine8 = engine_summary[f"batch{MAX_BATCH_SIZE}"]
    summary = {str(n): summarize_runs(n, rs, engine8) for n, rs in runs.items()}
    target = summary.get(str(TARGET_CLIENTS))
    return {
        "machine": args.machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(model),
        "image": str(args.image),
        "backend": args.backend,
        "server_args": ["--max-batch-size", str(MAX_BATCH_SIZE), "--max-wait-ms", str(MAX_WAIT_MS),
                        *args.server_arg],
        "rounds": args.rounds,
        "requests_per_client": args.requests_per_client,
        "engine": engine_summary,
        "server": summary,
        "runs": {str(n): rs for n, rs in runs.items()},
        "server_batches": batch_histogram(server_log),
        "noise_warnings": [r for r in noise if r],
        "target": {"clients": TARGET_CLIENTS, "min_ratio_to_engine_batch8": TARGET_RATIO,
                   "ratio": target["ratio_to_engine_batch8"] if target else None,
                   "met": (target["ratio_to_engine_batch8"] >= TARGET_RATIO) if target else None},
    }


def print_report(data: dict) -> None:
    engine8 = data["engine"][f"batch{MAX_BATCH_SIZE}"]["images_per_s"]
    rows = []
    for b in (1, MAX_BATCH_SIZE):
        e = data["engine"][f"batch{b}"]
        rows.append([f"engine, batch {b}", f"{e['images_per_s']:.2f}", f"{e['best_images_per_s']:.2f}",
                     f"{e['images_per_s'] / engine8:.2f}", f"{e['median_s']:.3f}", "", ""])
    for n, s in data["server"].items():
        rows.append([f"server, {n} clients", f"{s['images_per_s']:.2f}", f"{s['best_images_per_s']:.2f}",
                     f"{s['ratio_to_engine_batch8']:.2f}", f"{s['latency_p50_s']:.3f}", f"{s['latency_p99_s']:.3f}",
                     str(s["failures"])])
    print()
    print("images/s: median over calls (engine) or rounds (server); best: the fastest one (its minimum time)")
    print(common.format_table(["", "images/s", "best images/s", "x engine b8", "p50 s", "p99 s", "failed"], rows))
    common.print_noise_warnings(data["noise_warnings"])
    print(f"requests per forward-pass batch size: {data['server_batches']}")
    t = data["target"]
    if t["ratio"] is not None:
        best = data["server"][str(TARGET_CLIENTS)]["best_ratio_to_engine_batch8"]
        print(f"\ntarget: {TARGET_CLIENTS} clients >= {TARGET_RATIO}x engine batch-{MAX_BATCH_SIZE} images/s: "
              f"{t['ratio']:.2f}x (best run vs fastest engine call: {best:.2f}x) -> "
              f"{'PASS' if t['met'] else 'FAIL'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", "--checkpoint", dest="model",
                   help="checkpoint directory (default: the cached vit-base-shaped one)")
    p.add_argument("--image", type=Path, default=common.EXAMPLE_IMAGE)
    p.add_argument("--clients", type=common.positive_int_list, default=[1, TARGET_CLIENTS],
                   help=f"comma-separated client counts (default 1,{TARGET_CLIENTS})")
    p.add_argument("--requests-per-client", type=int, help="measured requests per client and run (default 8)")
    p.add_argument("--rounds", type=int, help="rounds of engine + server measurements (default 3)")
    p.add_argument("--engine-reps", type=int, default=2, help="engine calls per round (default 2)")
    p.add_argument("--backend", choices=["auto", "numba", "blas"], default="auto")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `vitnp serve` argument, e.g. --server-arg=--threads=2 (repeatable)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 requests per client, writes server-quick.json")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    common.add_isa_argument(p)
    p.add_argument("--no-reexec", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (default: re-run without them)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.requests_per_client is None:
        args.requests_per_client = 2 if args.quick else 8
    if min(args.rounds, args.requests_per_client, args.engine_reps) < 1:
        p.error("--rounds, --requests-per-client and --engine-reps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.reexec_without_blas_overrides(args.no_reexec, args.isa)
    args.machine = common.machine_info()
    common.print_machine(args.machine)
    data = run(args)
    print_report(data)
    common.write_json(args.out_dir / ("server-quick.json" if args.quick else "server.json"), data)
    failed = sum(s["failures"] for s in data["server"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
