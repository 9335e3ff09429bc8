"""Start-up: process start to first result, weight-load time and peak RSS, vitnp CLI vs transformers' pipeline.

    python benchmarks/bench_startup.py                 # 5 rounds
    python benchmarks/bench_startup.py --quick         # 2 rounds, writes startup-quick.*
    python benchmarks/bench_startup.py --matrix --runs 3   # demo and ViT-B, host ISA and AVX2: startup-matrix.json

Each measurement is a fresh child process classifying one image (examples/cats.jpg) with a local checkpoint
(the cached vit-base-patch16-224-shaped one from common.benchmark_checkpoint, or --checkpoint DIR):

  vitnp         `vitnp classify IMAGE --model DIR` (the installed console script).  Round 1 runs with a fresh, empty
                VITNP_CACHE_DIR (cold JIT: every kernel is compiled); later rounds reuse that directory (warm JIT).
  transformers  a child script: `pipeline("image-classification", model=DIR)` then one call on the image.

Per child: wall time from spawn to the first line it prints (the first result) and to exit, and its peak RSS
(ru_maxrss from os.wait4 on that child alone).  A second child per system and round reports the phases from inside
(import, weight load / pipeline build, first and second classification) so the weight-load time is known.
Rounds alternate the systems.  Targets: cold (round 1: empty kernel cache) first result <= 8 s; warm vitnp time to
first result <= 1.0 s and peak RSS <= 450 MB.  --matrix measures the offline demo (cold <= 6 s) and ViT-B, for the
host's ISA and the AVX2 build, and profiles each kernel group's cold compile in CPU seconds.

Bytecode: an installed package has its modules compiled to bytecode (pip does it at install; a checkout's
modules are compiled on their first import and kept), so the children run with PYTHONDONTWRITEBYTECODE removed: a
machine that sets it would otherwise make every run compile vitnp's modules from source.  (Not a
PYTHONPYCACHEPREFIX: Python then ignores every package's own bytecode, and a cold run would compile NumPy's and
Numba's too.)

OpenBLAS overrides: when OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set the script re-executes itself in a child
process with both removed from the environment (so every measured process runs without them); --no-reexec keeps
them.  Results: benchmarks/results/startup.json and startup.png.
"""

from __future__ import annotations

import argparse
import json
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

SYSTEMS = ("vitnp", "transformers")
TARGET_SECONDS = 1.0       # warm: process start to first result
TARGET_COLD_SECONDS = 8.0  # cold: empty kernel cache and no stored auto decisions (a fresh install)
TARGET_RSS_MB = 450.0
RSS_TARGETS_MB = {"fp32": TARGET_RSS_MB, "bf16": 350.0, "int8": 300.0}  # per --precision (docs/precision.md)

VITNP_PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import vitnp
t1 = time.perf_counter()
clf = vitnp.load(sys.argv[1], progress=False, **({"backend": sys.argv[3]} if len(sys.argv) > 3 and sys.argv[3] else {}),
                 **({"precision": sys.argv[4]} if len(sys.argv) > 4 else {}))
t2 = time.perf_counter()
first = clf.classify(sys.argv[2], top_k=5)
t3 = time.perf_counter()
clf.classify(sys.argv[2], top_k=5)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_classify_s": t3 - t2,
                  "second_classify_s": t4 - t3, "top1": first[0]["label"]}))
"""

TRANSFORMERS_PIPELINE = r"""
import json, sys, time
t0 = time.perf_counter()
from transformers import pipeline
t1 = time.perf_counter()
classifier = pipeline("image-classification", model=sys.argv[1])
t2 = time.perf_counter()
first = classifier(sys.argv[2], top_k=5)
t3 = time.perf_counter()
if len(sys.argv) > 3:
    classifier(sys.argv[2], top_k=5)
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_classify_s": t3 - t2,
                      "second_classify_s": t4 - t3, "top1": first[0]["label"]}))
else:
    for p in first:
        print(f"  {p['score']:8.4f}  {p['label']}", flush=True)
"""


def installed_python_env(env: dict) -> dict:
    """`env` as a Python installation that keeps its modules' bytecode (see the module docstring)."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def vitnp_command() -> list[str]:
    script = Path(sys.executable).with_name("vitnp")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vitnp"]


# Children run from here, not from the caller's working directory: `python -c` and `python -m` put that first on
# sys.path, and from the repository root its kernels/ directory (installed as vitnp.kernels) would shadow Hugging
# Face's `kernels` distribution, which transformers imports.  Paths given to children are made absolute first.
CHILD_DIR = Path(__file__).resolve().parent


def run_child(cmd: list[str], env: dict) -> dict:
    """Spawn, note the time of the first stdout line and of exit, and the child's own peak RSS."""
    with tempfile.TemporaryFile("w+") as err:  # a file, so a chatty stderr cannot block the child
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=CHILD_DIR)
        first_line = proc.stdout.readline()
        t_first = time.perf_counter()
        rest = proc.stdout.read()
        # wait4 reports the rusage of this child alone (RUSAGE_CHILDREN would be the maximum over all children).
        _, status, usage = os.wait4(proc.pid, 0)
        t_exit = time.perf_counter()
        err.seek(0)
        stderr = err.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not first_line:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}: {tail}")
    return {"first_result_s": t_first - t0, "exit_s": t_exit - t0, "peak_rss_mb": usage.ru_maxrss / 1024.0,
            # the child's CPU time and that of the processes it waited for (the kernel-compiling helpers)
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "stdout": first_line + rest, "stderr_first_line": (stderr.strip().splitlines() or [""])[0]}


def measure_round(system: str, args, checkpoint: Path, env: dict, phases: bool = True) -> dict:
    image = str(args.image)
    if system == "vitnp":
        cli = vitnp_command() + ["classify", image, "--model", str(checkpoint)]
        phases_cmd = [sys.executable, "-c", VITNP_PHASES, str(checkpoint), image]
        if args.backend:
            cli += ["--backend", args.backend]
            phases_cmd.append(args.backend)
        if args.precision:
            cli += ["--precision", args.precision]
            phases_cmd += ([] if args.backend else [""]) + [args.precision]
    else:
        cli = [sys.executable, "-c", TRANSFORMERS_PIPELINE, str(checkpoint), image]
        phases_cmd = cli + ["--phases"]
    run = run_child(cli, env)
    run["phases"] = None
    if phases:
        inside = run_child(phases_cmd, env)
        run["phases"] = json.loads(inside["stdout"].strip().splitlines()[-1])
        run["phases"]["peak_rss_mb"] = inside["peak_rss_mb"]
    run["top1"] = run["stdout"].splitlines()[1].split(None, 1)[1].strip() if system == "vitnp" else None
    del run["stdout"]
    return run


def summarise(runs: list[dict]) -> dict:
    def med(key, sub=None):
        values = [(r[sub] if sub else r)[key] for r in runs if not sub or r[sub]]
        return statistics.median(values) if values else None

    return {"runs": len(runs), "first_result_s": med("first_result_s"), "exit_s": med("exit_s"),
            "peak_rss_mb": med("peak_rss_mb"), "import_s": med("import_s", "phases"),
            "load_s": med("load_s", "phases"), "first_classify_s": med("first_classify_s", "phases"),
            "second_classify_s": med("second_classify_s", "phases"),
            "min_first_result_s": min(r["first_result_s"] for r in runs) if runs else None,
            "max_over_min_first_result": common.spread([r["first_result_s"] for r in runs])["max_over_min"]
            if runs else None}


def run(args) -> dict:
    info = common.machine_info()
    common.print_machine(info)
    checkpoint = Path(args.checkpoint) if args.checkpoint else common.benchmark_checkpoint()
    print(f"checkpoint: {checkpoint}; image: {args.image}; rounds: {args.runs}; vitnp CLI: {' '.join(vitnp_command())}")
    numba_cache = common.fresh_numba_cache()
    # Children inherit this environment (free of the OpenBLAS overrides unless --no-reexec), offline, and share
    # one Numba cache directory and one vitnp cache (the auto backend's stored decisions) that start empty, as
    # on a fresh install: round 1 compiles and times, later rounds load the kernels and the decisions.
    env = installed_python_env(dict(os.environ, VITNP_CACHE_DIR=numba_cache, HF_HUB_OFFLINE="1",
                                    TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1"))
    runs = {s: [] for s in args.systems}
    errors = {}
    try:
        for i in range(args.runs):
            order = args.systems if i % 2 == 0 else args.systems[::-1]
            for system in order:
                if system in errors:
                    continue
                # The cold-JIT round's phases would be measured with the cache it just filled: left out.
                cold = system == "vitnp" and i == 0
                try:
                    r = measure_round(system, args, checkpoint, env, phases=not cold)
                except Exception as e:
                    errors[system] = f"{type(e).__name__}: {e}"
                    print(f"  {system}: failed: {errors[system]}", flush=True)
                    continue
                r["round"] = i + 1
                r["jit_cache"] = ("cold" if i == 0 else "warm") if system == "vitnp" else None
                runs[system].append(r)
                ph = r["phases"]
                phase_text = (f"; phases: import {ph['import_s']:.2f} s, load {ph['load_s']:.2f} s, first classify "
                              f"{ph['first_classify_s']:.2f} s, second {ph['second_classify_s']:.3f} s" if ph
                              else f" (cold JIT cache; stderr: {r['stderr_first_line']!r})")
                print(f"  round {i + 1} {system:<12s} first result {r['first_result_s']:.2f} s, exit "
                      f"{r['exit_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB{phase_text}", flush=True)
    finally:
        shutil.rmtree(numba_cache, ignore_errors=True)

    groups = {}
    if "vitnp" in runs and runs["vitnp"]:
        groups["vitnp (cold JIT)"] = runs["vitnp"][:1]
        if len(runs["vitnp"]) > 1:
            groups["vitnp (warm JIT)"] = runs["vitnp"][1:]
    if runs.get("transformers"):
        groups["transformers pipeline"] = runs["transformers"]
    summary = {name: summarise(group) for name, group in groups.items()}
    print_table(summary)
    noise_warnings = common.print_noise_warnings([
        common.noise_record(f"{name} first result", [r["first_result_s"] for r in group])
        for name, group in groups.items()])
    targets = evaluate_targets(summary, RSS_TARGETS_MB[args.precision or "fp32"])
    return {
        "benchmark": "startup",
        "machine": info,
        "settings": {"checkpoint": str(checkpoint), "image": str(args.image), "rounds": args.runs,
                     "systems": args.systems, "vitnp_command": vitnp_command(), "backend": args.backend,
                     "quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "summary": summary,
        "runs": runs,
        "noise_warnings": noise_warnings,
        "missing": errors,
        "targets": targets,
    }


DEMO_ARGS = ["classify", "--model", "bundled:digits", str(common.EXAMPLE_IMAGE.parent / "digits")]
MATRIX_TARGETS = {"demo": (6.0, 1.0), "vit-base": (8.0, 1.0)}  # (cold, warm) first result, seconds
MATRIX_ISAS = ("native", "avx2")


def profile_groups(env: dict) -> dict:
    """{group: CPU seconds} of each kernel group the default options run, compiled alone in a fresh process with
    an empty cache (as a helper process compiles it); includes the process's start and imports."""
    from vitnp.layers import kernel_groups
    from vitnp.options import EngineOptions

    seconds = {}
    for group in kernel_groups(EngineOptions()):
        cache = common.fresh_numba_cache()
        try:
            child_env = dict(env, VITNP_CACHE_DIR=cache)
            proc = subprocess.Popen([sys.executable, "-m", "vitnp.kernels.warmup", group], env=child_env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=CHILD_DIR)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) == 0:
                seconds[group] = round(usage.ru_utime + usage.ru_stime, 2)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return seconds


def run_matrix(args) -> dict:
    """Cold (empty kernel cache) and warm first results of the offline demo and of `vitnp classify IMAGE` on a
    ViT-B checkpoint, for the host's ISA and the AVX2 build (VITNP_ISA=avx2), with peak RSS and CPU seconds;
    and each kernel group's cold-compile CPU seconds per ISA."""
    info = common.machine_info()
    common.print_machine(info)
    checkpoint = Path(args.checkpoint) if args.checkpoint else common.benchmark_checkpoint()
    commands = {"demo": vitnp_command() + DEMO_ARGS,
                "vit-base": vitnp_command() + ["classify", str(args.image), "--model", str(checkpoint)]}
    results = {}
    for isa in args.matrix_isas:
        env = common.clean_env({"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
        env.pop("VITNP_ISA", None)
        if isa != "native":
            # As a CPU of that ISA would run: vitnp's kernels and OpenBLAS's for it (the auto backend races them).
            env.update(common.ISA_EMULATION.get(isa, {"VITNP_ISA": isa}))
        results[isa] = {"groups_cpu_s": profile_groups(env)}
        print(f"[{isa}] cold compile CPU seconds per kernel group: {results[isa]['groups_cpu_s']}", flush=True)
        for case, cmd in commands.items():
            cache = common.fresh_numba_cache()
            try:
                case_env = installed_python_env(dict(env, VITNP_CACHE_DIR=cache))
                runs = []
                for i in range(args.runs):
                    r = run_child(cmd, case_env)
                    r["cache"] = "cold" if i == 0 else "warm"
                    del r["stdout"]
                    runs.append(r)
                    print(f"  [{isa}] {case:<9s} {r['cache']}: first result {r['first_result_s']:.2f} s, exit "
                          f"{r['exit_s']:.2f} s, CPU {r['cpu_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                          flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            warm = runs[1:]
            cold_target, warm_target = MATRIX_TARGETS[case]
            results[isa][case] = {
                "runs": runs, "cold_first_result_s": runs[0]["first_result_s"], "cold_cpu_s": runs[0]["cpu_s"],
                "cold_peak_rss_mb": runs[0]["peak_rss_mb"],
                "warm_first_result_s": statistics.median(r["first_result_s"] for r in warm) if warm else None,
                "warm_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in warm) if warm else None,
                "targets": {"cold_first_result_s": f"<= {cold_target}", "warm_first_result_s": f"<= {warm_target}",
                            **({"warm_peak_rss_mb": f"<= {TARGET_RSS_MB:.0f}"} if case == "vit-base" else {})}}
    print("\ncold = empty kernel cache (a fresh install); warm = median of the later rounds")
    rows = [[isa, case, f"{r['cold_first_result_s']:.2f}", f"{r['cold_cpu_s']:.1f}",
             "-" if r["warm_first_result_s"] is None else f"{r['warm_first_result_s']:.2f}",
             "-" if r["warm_peak_rss_mb"] is None else f"{r['warm_peak_rss_mb']:.0f}"]
            for isa, by_case in results.items() for case, r in by_case.items() if case != "groups_cpu_s"]
    print(common.format_table(["isa", "case", "cold first result s", "cold CPU s", "warm first result s",
                               "warm peak RSS MB"], rows), flush=True)
    return {"benchmark": "startup-matrix", "machine": info, "cpu": info["cpu"],
            "settings": {"checkpoint": str(checkpoint), "image": str(args.image), "rounds": args.runs,
                         "commands": commands, "isas": list(args.matrix_isas),
                         "command": " ".join([Path(sys.executable).name, *sys.argv])},
            "results": results}


def print_table(summary: dict) -> None:
    headers = ["system", "runs", "first result s", "min", "max/min", "exit s", "peak RSS MB", "import s",
               "weight load s", "first classify s", "second classify s"]
    rows = []
    def fmt(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, s in summary.items():
        rows.append([name, s["runs"], fmt(s["first_result_s"], 2), fmt(s["min_first_result_s"], 2),
                     fmt(s["max_over_min_first_result"], 2), fmt(s["exit_s"], 2), fmt(s["peak_rss_mb"], 0),
                     fmt(s["import_s"], 2), fmt(s["load_s"], 2), fmt(s["first_classify_s"], 2),
                     fmt(s["second_classify_s"], 3)])
    print("\nmedians, and the minimum and max/min of 'first result' (process spawn to first printed result); "
          "phases measured in a second child per round")
    print(common.format_table(headers, rows), flush=True)


def evaluate_targets(summary: dict, rss_target_mb: float = TARGET_RSS_MB) -> list[dict]:
    s = summary.get("vitnp (warm JIT)")
    if not s:
        return []
    cold = summary.get("vitnp (cold JIT)")
    return ([{"metric": "cold_first_result_s", "value": cold["first_result_s"],
              "target": f"<= {TARGET_COLD_SECONDS}", "pass": cold["first_result_s"] <= TARGET_COLD_SECONDS}]
            if cold else []) + [
        {"metric": "first_result_s", "value": s["first_result_s"], "target": f"<= {TARGET_SECONDS}",
         "pass": s["first_result_s"] <= TARGET_SECONDS},
        {"metric": "peak_rss_mb", "value": s["peak_rss_mb"], "target": f"<= {rss_target_mb:.0f}",
         "pass": s["peak_rss_mb"] <= rss_target_mb},
    ]


def print_targets(targets: list[dict], summary: dict) -> None:
    if not targets:
        print("targets: not evaluated (needs at least 2 vitnp rounds)")
        return
    ref = summary.get("transformers pipeline")
    print("\ntargets (vitnp CLI, warm JIT cache):")
    for t in targets:
        unit = "s" if t["metric"].endswith("_s") else "MB"
        what = {"first_result_s": "process start to first result", "peak_rss_mb": "peak RSS",
                "cold_first_result_s": "first run ever (empty caches): start to first result"}[t["metric"]]
        if t["metric"] == "cold_first_result_s":
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {what}: {t['value']:.2f} s (target {t['target']} s)")
            continue
        versus = f"; transformers pipeline {ref[t['metric']]:.{2 if unit == 's' else 0}f} {unit}" if ref else ""
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {what}: {t['value']:.{2 if unit == 's' else 0}f} {unit} "
              f"(target {t['target']} {unit}{versus})")


def plot(data: dict, path: Path) -> None:
    summary = data["summary"]
    names = list(summary)

    def series(key):
        return {n: [summary[n][key]] for n in names}

    m = data["machine"]
    load = m.get("load_average_at_start")
    note = (f"{m['cpu']}, {m['usable_cpus']} CPUs (load average at start {load[0]:.1f}); medians of "
            f"{data['settings']['rounds']} rounds; one image, local weights" if load else "")
    common.bar_chart(path, "Start-up: one image, from process start (lower is better)", [
        {"groups": ["process start to first result"], "series": series("first_result_s"), "ylabel": "seconds",
         "hlines": [(TARGET_SECONDS, f"target {TARGET_SECONDS} s")]},
        {"groups": ["weight load (in-process)"], "series": series("load_s"), "ylabel": "seconds"},
        {"groups": ["peak RSS"], "series": series("peak_rss_mb"), "ylabel": "MB",
         "hlines": [(TARGET_RSS_MB, f"target {TARGET_RSS_MB:.0f} MB")]},
    ], note=note)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--runs", type=int, help="rounds (default 5; 2 with --quick); round 1 of vitnp is the cold-JIT one")
    p.add_argument("--quick", action="store_true", help="2 rounds, writes startup-quick.*")
    p.add_argument("--systems", type=_system_list, default=list(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the cached vit-base-shaped one)")
    p.add_argument("--image", type=Path, default=common.EXAMPLE_IMAGE)
    p.add_argument("--backend", choices=["auto", "numba", "blas"],
                   help="passed to `vitnp classify --backend` (default: the CLI's default)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                   help="passed to `vitnp classify --precision`; the peak-RSS target follows it "
                        "(fp32 450, bf16 350, int8 300 MB)")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    common.add_isa_argument(p)
    p.add_argument("--matrix", action="store_true",
                   help="instead: cold and warm first results of the offline demo and of ViT-B (--checkpoint), for "
                        "each of --matrix-isas, with peak RSS, CPU seconds and per-kernel-group compile CPU "
                        "seconds; writes startup-matrix.json")
    p.add_argument("--matrix-isas", type=_isa_list, default=list(MATRIX_ISAS),
                   help=f"with --matrix: comma-separated ISAs (native = the host's; default {','.join(MATRIX_ISAS)})")
    p.add_argument("--no-reexec", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (default: re-run without them)")
    args = p.parse_args(argv)
    args.image = args.image.resolve()
    if args.checkpoint:
        args.checkpoint = str(Path(args.checkpoint).resolve())
    if args.runs is None:
        args.runs = 2 if args.quick else 5
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


def _isa_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in ("native", "avx512", "avx2", "generic") for n in names):
        raise argparse.ArgumentTypeError(f"choose from native,avx512,avx2,generic, got {text!r}")
    return names


def _system_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in SYSTEMS for n in names):
        raise argparse.ArgumentTypeError(f"choose from {','.join(SYSTEMS)}, got {text!r}")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    common.reexec_without_blas_overrides(args.no_reexec, args.isa)
    if args.matrix:
        data = run_matrix(args)
        common.write_json(args.out_dir / "startup-matrix.json", data)
        return 0
    data = run(args)
    print_targets(data["targets"], data["summary"])
    if data["missing"]:
        print("\nfailed systems:")
        for name, err in data["missing"].items():
            print(f"  {name}: {err}")
    stem = "startup-quick" if args.quick else "startup"
    common.write_json(args.out_dir / f"{stem}.json", data)
    if not args.no_plot:
        plot(data, args.out_dir / f"{stem}.png")
    return 1 if data["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
