"""Ray benchmark: Ray Data job throughput (1 and 2 workers) vs the plain CLI, and memory (PSS) of 1/2/4 actors.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_ray.py        # ~8 min
    python benchmarks/bench_ray.py --quick      # 1 round, 32 images, writes ray-quick.json

Model: --model DIR, default the random-initialised google/vit-base-patch16-224-shaped checkpoint that
common.benchmark_checkpoint writes once with tests/checkpoints.py (ViT-B/16, 224 px, 1000 labels).
Backend: numba everywhere (the layout that can be shared; "auto" picks it on these shapes anyway).

1. Throughput, --rounds rounds, systems interleaved so they see the same background load:
   - plain CLI: `python -m vitnp classify DIR --json --batch-size 8 --backend numba` as a real process, its
     stdout lines timestamped as they arrive;
   - Ray Data, W workers (W in --workers, default 1,2): the job `vitnp classify --ray --workers W --output
     x.parquet` runs (vitnp.ray.run_job: path blocks -> map_batches(vitnp.ray.ImageClassifier,
     ActorPoolStrategy(size=W), batch_size=8, num_cpus=cores/W, threads=cores/W) -> Parquet), called in this
     process on a local Ray cluster with all cores that stays up across runs, over the same files.
   Each system runs the full job (--images files) and a one-batch job (8 of the files) every round; its
   images/s is (N - 8) / (T_N - T_8), T being the end-to-end wall time of the job: what is fixed per job
   (process or actor start, model load or rebuild from the shared weights, JIT cache load) cancels out
   the same way for both. End-to-end seconds are reported too.
2. Memory: N = 1, 2, 4 actors (threads=1 each) built from the one shared model (vitnp.ray.share: the
   weights in Ray's object store), each having classified one batch of 8; then each actor's
   /proc/<pid>/smaps_rollup Pss is summed, and the part of it that lies in the object store's shared-memory
   mapping (from /proc/<pid>/smaps) is reported apart. For contrast: 1 and 4 actors that each load the model
   privately (model given by path).

Targets: Ray with 1 worker >= 0.85x the plain CLI's images/s; 4 shared actors' summed PSS <= 1.5x one actor's.
Writes benchmarks/results/ray.json (or ray-quick.json) with every run, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_RATIO = 0.85
TARGET_PSS_RATIO = 1.5
BATCH = 8
BACKEND = "numba"


def make_images(directory: Path, count: int) -> list[str]:
    sources = [common.REPO_DIR / "examples" / "cats.jpg", common.REPO_DIR / "examples" / "coffee.jpg"]
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = directory / f"img-{i:05d}{src.suffix}"
        shutil.copy(src, dst)
        paths.append(str(dst))
    return paths


def differential(full: dict, small: dict, count: int) -> dict:
    """(N - 8) / (T_N - T_8); NaN when start-up noise exceeds the extra work (tiny models, few images)."""
    extra = full["end_to_end_s"] - small["end_to_end_s"]
    return {"one_batch_end_to_end_s": small["end_to_end_s"],
            "images_per_s": (count - BATCH) / extra if extra > 0 else float("nan")}


def run_plain_cli(model: Path, image_dir: Path, count: int) -> dict:
    cmd = [sys.executable, "-m", "vitnp", "classify", str(image_dir), "--model", str(model), "--json",
           "--batch-size", str(BATCH), "--backend", BACKEND]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = proc.stdout.count("\n")
    if proc.returncode != 0 or lines != count:
        raise RuntimeError(f"plain CLI failed ({proc.returncode}, {lines} of {count} lines):\n{proc.stderr}")
    return {"images": count, "end_to_end_s": seconds}


def run_ray_job(shared, paths: list[str], workers: int, cpus: int, out_dir: Path) -> dict:
    """The job `vitnp classify --ray` runs (vitnp.ray.run_job), on the running cluster, writing Parquet."""
    import vitnp.ray

    threads = max(1, cpus // workers)
    output = out_dir / f"ray-{workers}-{len(paths)}.parquet"
    t0 = time.perf_counter()
    rows, errors = vitnp.ray.run_job(paths, shared, output, workers=workers, threads=threads, batch_size=BATCH)
    seconds = time.perf_counter() - t0
    if rows != len(paths) or errors:
        raise RuntimeError(f"Ray job: {rows} rows for {len(paths)} images, {errors} errors")
    return {"images": rows, "end_to_end_s": seconds, "workers": workers, "threads_per_worker": threads}


def shared_weights_mib(model) -> float:
    """Size of the packed weights (the one copy in the object store)."""
    import numpy as np

    import vitnp

    clf = vitnp.load(model, backend=BACKEND, progress=False)
    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, np.ndarray):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.nbytes
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)
        elif hasattr(obj, "__dict__"):
            for o in vars(obj).values():
                visit(o)

    visit(clf.weights)
    return total / 2**20


# -- memory --------------------------------------------------------------------------------------------------

def pss_kib(pid: int) -> dict:
    """Total Pss of a process, and the Pss of its mappings of Ray's object store (plasma shared memory)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            total = int(line.split()[1])
    store, in_store = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            in_store = "plasma" in line
        elif in_store and line.startswith("Pss:"):
            store += int(fields[1])
    return {"pss_kib": total, "object_store_pss_kib": store}


def measure_actors(model, count: int, images: list[bytes]) -> dict:
    import ray

    import vitnp.ray

    @ray.remote(num_cpus=0.25)
    class Holder:
        def __init__(self, model):
            self.udf = vitnp.ray.ImageClassifier(model, threads=1)

        def run(self, images):
            import numpy as np

            table = self.udf({"bytes": np.array(images, dtype=object)})
            assert table.column("error").null_count == table.num_rows
            return os.getpid()

    actors = [Holder.remote(model) for _ in range(count)]
    try:
        pids = ray.get([a.run.remote(images) for a in actors], timeout=900)
        time.sleep(1.0)
        per = [pss_kib(pid) for pid in pids]
    finally:
        for a in actors:
            ray.kill(a)
    total = sum(p["pss_kib"] for p in per)
    store = sum(p["object_store_pss_kib"] for p in per)
    return {"actors": count, "pids": pids, "per_actor": per, "sum_pss_mib": total / 1024,
            "sum_object_store_pss_mib": store / 1024, "sum_other_pss_mib": (total - store) / 1024}


def run(args) -> dict:
    import ray

    import vitnp.ray

    model = Path(args.model) if args.model else common.benchmark_checkpoint()
    cpus = len(os.sched_getaffinity(0))
    results = {"plain_cli": [], **{f"ray_{w}": [] for w in args.workers}}
    with tempfile.TemporaryDirectory(prefix="vitnp-bench-ray-") as tmp:
        image_dir = Path(tmp) / "images"
        image_dir.mkdir()
        paths = make_images(image_dir, args.images)
        small_dir = Path(tmp) / "one-batch"
        small_dir.mkdir()
        for p in paths[:BATCH]:
            shutil.copy(p, small_dir / Path(p).name)
        # Warm the JIT cache (and the checkpoint's page cache) before anything is timed.
        run_plain_cli(model, image_dir, args.images) if args.warm else None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            shared = vitnp.ray.share(model, backend=BACKEND)
            for round_ in range(args.rounds):
                small = run_plain_cli(model, small_dir, BATCH)
                r = run_plain_cli(model, image_dir, args.images)
                r.update(differential(r, small, args.images))
                results["plain_cli"].append(r)
                print(f"round {round_ + 1}: plain CLI: {r['images_per_s']:.2f} img/s "
                      f"(end to end {r['end_to_end_s']:.1f} s, one batch {small['end_to_end_s']:.1f} s)", flush=True)
                for w in args.workers:
                    small = run_ray_job(shared, paths[:BATCH], w, cpus, Path(tmp))
                    r = run_ray_job(shared, paths, w, cpus, Path(tmp))
                    r.update(differential(r, small, args.images))
                    results[f"ray_{w}"].append(r)
                    print(f"round {round_ + 1}: Ray Data, {w} worker(s) x {r['threads_per_worker']} threads: "
                          f"{r['images_per_s']:.2f} img/s (end to end {r['end_to_end_s']:.1f} s, "
                          f"one batch {small['end_to_end_s']:.1f} s)", flush=True)
            images = [Path(p).read_bytes() for p in paths[:BATCH]]
            memory = {"shared": {}, "private": {}}
            for n in args.actors:
                memory["shared"][str(n)] = m = measure_actors(shared, n, images)
                print(f"memory: {n} actor(s), shared weights: summed PSS {m['sum_pss_mib']:.0f} MiB "
                      f"(object store part {m['sum_object_store_pss_mib']:.0f} MiB)", flush=True)
            for n in args.private_actors:
                memory["private"][str(n)] = m = measure_actors(str(model), n, images)
                print(f"memory: {n} actor(s), private weights: summed PSS {m['sum_pss_mib']:.0f} MiB", flush=True)
        finally:
            ray.shutdown()
    summary = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in runs),
                      "best_images_per_s": max(r["images_per_s"] for r in runs),
                      "min_end_to_end_s": min(r["end_to_end_s"] for r in runs),
                      "end_to_end_s": statistics.median(r["end_to_end_s"] for r in runs),
                      "one_batch_end_to_end_s": statistics.median(r["one_batch_end_to_end_s"] for r in runs)}
               for name, runs in results.items()}
    plain = summary["plain_cli"]["images_per_s"]
    for s in summary.values():
        s["ratio_to_plain_cli"] = s["images_per_s"] / plain
    memory["weights_mib"] = shared_weights_mib(model)
    one, four = memory["shared"].get("1"), memory["shared"].get("4")
    pss_ratio = four["sum_pss_mib"] / one["sum_pss_mib"] if one and four else None
    # The same comparison with the one weights copy counted whole on both sides (the actors' PSS leaves the
    # driver's share of it out): the node's memory for 4 actors vs for 1.
    w = memory["weights_mib"]
    memory["node_total_ratio_4_vs_1"] = ((four["sum_other_pss_mib"] + w) / (one["sum_other_pss_mib"] + w)
                                         if one and four else None)
    ratio1 = summary.get("ray_1", {}).get("ratio_to_plain_cli")
    noise = [common.noise_record(f"{name} end to end", [r["end_to_end_s"] for r in runs])
             for name, runs in results.items()]
    return {
        "machine": args.machine, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(model), "images": args.images, "batch_size": BATCH, "backend": BACKEND, "cpus": cpus,
        "ray_version": ray.__version__, "rounds": args.rounds, "runs": results, "summary": summary,
        "memory": memory, "load_average_at_end": os.getloadavg(), "noise_warnings": [r for r in noise if r],
        "targets": {
            "ray_1_worker_vs_plain_cli": {"min": TARGET_RATIO, "ratio": ratio1,
                                          "met": ratio1 is not None and ratio1 >= TARGET_RATIO},
            "pss_4_vs_1_actors": {"max": TARGET_PSS_RATIO, "ratio": pss_ratio,
                                  "met": pss_ratio is not None and pss_ratio <= TARGET_PSS_RATIO},
        },
    }


def print_report(data: dict) -> None:
    rows = []
    for name, s in data["summary"].items():
        label = "plain CLI (vitnp classify --json)" if name == "plain_cli" else \
            f"Ray Data, {name.split('_')[1]} worker(s)"
        rows.append([label, f"{s['images_per_s']:.2f}", f"{s['best_images_per_s']:.2f}",
                     f"{s['ratio_to_plain_cli']:.2f}", f"{s['end_to_end_s']:.1f}", f"{s['min_end_to_end_s']:.1f}",
                     f"{s['one_batch_end_to_end_s']:.1f}"])
    print()
    print("medians over rounds; best images/s and min end-to-end: the fastest round")
    print(common.format_table(["", "images/s", "best images/s", "x plain CLI", f"end-to-end s ({data['images']} img)",
                               "min", f"end-to-end s ({BATCH} img)"], rows))
    common.print_noise_warnings(data["noise_warnings"])
    rows = []
    for kind in ("shared", "private"):
        base = data["memory"]["shared"].get("1", {}).get("sum_pss_mib")
        for n, m in data["memory"][kind].items():
            rows.append([f"{n} actor(s), {kind} weights", f"{m['sum_pss_mib']:.0f}",
                         f"{m['sum_object_store_pss_mib']:.0f}", f"{m['sum_other_pss_mib']:.0f}",
                         f"{m['sum_pss_mib'] / base:.2f}" if base else ""])
    print()
    print(common.format_table(["", "summed PSS MiB", "object store part", "rest", "x 1 shared actor"], rows))
    print(f"packed weights (one copy in the object store): {data['memory']['weights_mib']:.0f} MiB")
    if data["memory"].get("node_total_ratio_4_vs_1"):
        print(f"4 vs 1 actors with the weights copy counted whole on both sides: "
              f"{data['memory']['node_total_ratio_4_vs_1']:.2f}x")
    t = data["targets"]
    a, b = t["ray_1_worker_vs_plain_cli"], t["pss_4_vs_1_actors"]
    print(f"\ntarget: Ray 1 worker >= {a['min']}x plain CLI: "
          f"{a['ratio']:.2f}x -> {'PASS' if a['met'] else 'FAIL'}" if a["ratio"] is not None else "")
    print(f"target: 4 actors' summed PSS <= {b['max']}x one actor's: "
          f"{b['ratio']:.2f}x -> {'PASS' if b['met'] else 'FAIL'}" if b["ratio"] is not None else "")
    print(f"load average at the end: {data['load_average_at_end']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", "--checkpoint", dest="model",
                   help="checkpoint directory (default: the cached vit-base-shaped one)")
    p.add_argument("--images", type=int, help="images per job (default 192; --quick 32)")
    p.add_argument("--rounds", type=int, help="rounds of plain CLI + Ray jobs (default 3; --quick 1)")
    p.add_argument("--workers", type=common.positive_int_list, default=[1, 2], help="Ray worker counts (1,2)")
    p.add_argument("--actors", type=common.positive_int_list, default=[1, 2, 4],
                   help="actor counts for the memory measurement (1,2,4)")
    p.add_argument("--private-actors", type=common.positive_int_list, default=[1, 4],
                   help="actor counts with private weights, for contrast (1,4)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the untimed plain-CLI run that warms the JIT and page caches")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--no-reexec", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (default: re-run without them)")
    args = p.parse_args(argv)
    if args.images is None:
        # 192: the 8-image job's start-up varies by +-0.5 s between runs, which is +-7% of the difference
        # the rate is computed from at 96 images and half that at 192.
        args.images = 32 if args.quick else 192
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.images < 2 * BATCH or args.rounds < 1:
        p.error(f"--images must be >= {2 * BATCH} and --rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.reexec_without_blas_overrides(args.no_reexec)
    args.machine = common.machine_info()
    args.machine["versions"]["ray"] = common.package_version("ray")
    common.print_machine(args.machine)
    data = run(args)
    print_report(data)
    common.write_json(args.out_dir / ("ray-quick.json" if args.quick else "ray.json"), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
