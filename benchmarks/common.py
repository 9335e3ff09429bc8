"""Shared plumbing for the end-to-end and start-up benchmarks.

- `reexec_without_blas_overrides()`: run the calling script again in a child process whose environment lacks
  OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (they pin OpenBLAS to a generic kernel and a small L2 size, which makes
  numpy's sgemm about 2x slower than the kernel OpenBLAS would pick for this CPU).  The parent's own
  environment is left as it is.
- `benchmark_checkpoint()`: a full-size, random-initialised google/vit-base-patch16-224-shaped checkpoint
  written by transformers (tests/checkpoints.py), cached on disk so reruns skip the ~10 s it takes to build.
- `machine_info()`: CPU, cores, library versions and the BLAS library threadpoolctl sees.
- `vit_forward_flops()`: the multiply-add count of one ViT forward pass (x2), for GFLOP/s.
- `bar_chart()`: a PNG with matplotlib, skipped with a note when matplotlib is absent (it is the `bench` extra).
- `spread()`, `noise_record()`, `print_noise_warnings()`: median, minimum and max/min of repeated timings, and the
  WARNING line (and JSON record) a row gets when its max/min exceeds NOISY_MAX_OVER_MIN.

This module imports no other benchmark module; the ones that need it import it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
TESTS_DIR = REPO_DIR / "tests"
EXAMPLE_IMAGE = REPO_DIR / "examples" / "cats.jpg"

BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Set in the re-executed child so it records what its parent removed (and never re-executes again).
REEXEC_MARKER = "VITNP_BENCH_REEXECUTED"
CHECKPOINT_READY = ".vitnp-bench-complete"


# -- environment -----------------------------------------------------------------------------------------------

def clean_env(extra: dict | None = None) -> dict:
    """This process's environment without the OpenBLAS overrides (for child processes)."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
    env.update(extra or {})
    return env


# Running as a CPU of a narrower ISA would run it: vitnp's kernels generated for that CPU class (VITNP_ISA),
# OpenBLAS on its kernel for such a CPU, PyTorch's ATen, MKL and oneDNN kernels capped at that ISA.
ISA_EMULATION = {
    "avx2": {"VITNP_ISA": "avx2", "OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "generic": {"VITNP_ISA": "generic", "OPENBLAS_CORETYPE": "Core2", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
ISA_MARKER = "VITNP_BENCH_EMULATED_ISA"
# What an emulated ISA leaves at the host's widest kernels.  ONNX Runtime picks its kernels from CPUID and has no
# switch: for avx2 ort_isa.py patches a copy of it, for generic nothing does.  OpenVINO has no CPU property for
# the ISA either, and under ONEDNN_MAX_CPU_ISA its CPU plugin fails to compile a ViT (no Softmax
# implementation), so it always compiles with that variable removed (bench_e2e.OpenVino) and runs the host ISA.
NOT_EMULATED = {"avx2": ["openvino"], "generic": ["onnxruntime", "openvino"]}


def not_emulated(isa: str) -> list[str]:
    return NOT_EMULATED.get(isa, [])


def add_isa_argument(parser) -> None:
    parser.add_argument("--isa", choices=("native", *ISA_EMULATION), default="native",
                        help="run as a CPU of this ISA would: vitnp's kernels for it (VITNP_ISA), OpenBLAS and "
                             "PyTorch limited to it, ONNX Runtime too for avx2 (a patched copy, ort_isa.py); "
                             "OpenVINO keeps the host ISA (default: native)")


def reexec_without_blas_overrides(no_reexec: bool, isa: str = "native", path_entries=None) -> None:
    """Re-run this script in a child without the OpenBLAS overrides (and, with isa, set up to run as a CPU of
    that ISA would), then exit with the child's status.

    path_entries(isa) -> list of directories to put first on the child's PYTHONPATH (ort_isa.path_entries gives
    the AVX2 copy of ONNX Runtime).  Does nothing inside the child itself, or when neither is needed;
    --no-reexec keeps the overrides.
    """
    if os.environ.get(REEXEC_MARKER) is not None:
        return
    emulation = ISA_EMULATION.get(isa, {})
    present = [v for v in BLAS_OVERRIDES if v in os.environ] if not no_reexec else []
    if not present and not emulation:
        return
    if present:
        print(f"[bench] re-executing without {', '.join(present)} (use --no-reexec to keep them)", flush=True)
    extra = {REEXEC_MARKER: ",".join(f"{v}={os.environ[v]}" for v in present)}
    if emulation:
        skipped = not_emulated(isa)
        print(f"[bench] running as an {isa} CPU would: {' '.join(f'{k}={v}' for k, v in emulation.items())}"
              + (f" (not possible for: {', '.join(skipped)})" if skipped else ""), flush=True)
        extra.update(emulation)
        extra[ISA_MARKER] = isa
        entries = [str(p) for p in (path_entries(isa) if path_entries else [])]
        if entries:
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [*entries, os.environ.get("PYTHONPATH")]))
    env = clean_env(extra) if present else {**os.environ, **extra}
    status = subprocess.call([sys.executable, *sys.argv], env=env)
    sys.exit(status)


def blas_override_note() -> str:
    removed = os.environ.get(REEXEC_MARKER)
    emulated = ISA_EMULATION.get(os.environ.get(ISA_MARKER, ""), {})
    present = [f"{v}={os.environ[v]}" for v in BLAS_OVERRIDES
               if v in os.environ and emulated.get(v) != os.environ[v]]
    if present:
        return f"WARNING: {', '.join(present)} in effect: numpy's OpenBLAS runs a slower kernel"
    notes = [f"removed for this run: {removed}"] if removed else []
    if emulated:
        notes.append(f"OPENBLAS_CORETYPE={emulated['OPENBLAS_CORETYPE']} to run as an "
                     f"{os.environ[ISA_MARKER]} CPU would")
    return "; ".join(notes) or "not set"


def isa_info() -> dict:
    """The vector ISA vitnp's kernels run (and the host's), the CPU features that matter, and what an --isa
    emulation could not limit."""
    from vitnp.kernels import isa

    features = isa.host_features()
    info = {"vitnp_kernels": isa.describe(),
            "cpu_flags": sorted(f for f in features if f.startswith(("avx", "fma", "amx"))),
            "emulated_isa": os.environ.get(ISA_MARKER)}
    if info["emulated_isa"]:
        info["emulation_env"] = ISA_EMULATION[info["emulated_isa"]]
        info["not_emulated"] = not_emulated(info["emulated_isa"])
    return info


# -- machine ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process, as threadpoolctl reports them (call after importing numpy)."""
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "architecture", "num_threads", "version", "prefix", "filepath")
    return [{k: d.get(k) for k in keep} for d in threadpool_info()]


def vitnp_source() -> dict:
    """Where the vitnp being measured comes from, and the git commit (plus local edits) of that tree."""
    import importlib.util

    spec = importlib.util.find_spec("vitnp")
    package = Path(spec.origin).parent if spec and spec.origin else None
    info = {"package": str(package) if package else None}
    if package is None:
        return info
    tree = package.parent
    try:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "--",
                                    "vitnp", "kernels"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            info["commit"] = commit.stdout.strip()
            info["uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info() -> dict:
    import numpy as np  # noqa: F401  (loads the BLAS threadpoolctl should see)

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        **isa_info(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in
                     ("numpy", "numba", "vitnp", "torch", "transformers", "onnxruntime", "openvino", "onnx",
                      "onnxscript", "safetensors", "threadpoolctl")},
        "vitnp_source": vitnp_source(),
        "openblas_overrides": blas_override_note(),
        "threadpools": blas_libraries(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def print_machine(info: dict) -> None:
    v = {k: val for k, val in info["versions"].items() if val}
    print(f"machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, load average {info['load_average_at_start']}")
    k = info["vitnp_kernels"]
    print(f"ISA: vitnp kernels {k['isa']} (GEMM tile {k['gemm_tile']}, code for {k['codegen_cpu']}); host "
          f"{k['host_cpu']} widest {k['host_isa']}; flags {' '.join(info['cpu_flags'])}")
    if info["emulated_isa"]:
        print(f"running as an {info['emulated_isa']} CPU would"
              + (f", except: {', '.join(info['not_emulated'])}" if info["not_emulated"] else ""))
    ort = info.get("onnxruntime_mlas")
    if ort:
        print(f"ONNX Runtime: {ort.get('package')}, MLAS kernels {ort.get('isa')} ({ort.get('float_lanes')} float "
              f"lanes)" if "error" not in ort else f"ONNX Runtime: kernel width unknown ({ort['error']})")
    print("versions: python " + info["python"] + ", " + ", ".join(f"{k} {val}" for k, val in v.items()))
    src = info["vitnp_source"]
    if "commit" in src:
        print(f"vitnp: {src['package']} at commit {src['commit']}"
              f"{' + uncommitted changes in vitnp/ or kernels/' if src['uncommitted_changes'] else ''}")
    else:
        print(f"vitnp: {src['package']}")
    print(f"OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE: {info['openblas_overrides']}")
    for pool in info["threadpools"]:
        print(f"threadpool: {pool['user_api']}/{pool['internal_api']} {pool.get('version') or ''} "
              f"arch={pool.get('architecture')} threads={pool['num_threads']} ({Path(pool['filepath']).name})")


# -- checkpoints -----------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    root = os.environ.get("VITNP_BENCH_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitnp-bench"


def benchmark_checkpoint(cache_dir: Path | None = None) -> Path:
    """A ViT-B/16 (224 px, 1000 labels) checkpoint in Hub format, built once and reused."""
    out = (cache_dir or default_cache_dir()) / "vit-base-patch16-224-random"
    if (out / CHECKPOINT_READY).is_file():
        return out
    print(f"[bench] writing a vit-base-patch16-224-shaped checkpoint to {out} (once) ...", flush=True)
    sys.path.insert(0, str(TESTS_DIR))
    from checkpoints import make_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    make_checkpoint(out, "vit", "base", num_labels=1000, seed=0)
    (out / CHECKPOINT_READY).write_text("made by benchmarks/common.py\n")
    return out


def read_config(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


# -- FLOPs -----------------------------------------------------------------------------------------------------

def vit_forward_flops(config: dict, batch: int = 1) -> float:
    """2 x multiply-adds of one forward pass: patch projection, 12 x (QKV, QK^T, AV, out-proj, MLP), head(s).

    Element-wise work (LayerNorm, softmax, GELU, residual adds) is left out, as is customary; it is <1 %.
    For ViT-B/16 at 224 px this is 35.1 GFLOP per image.
    """
    d = config["hidden_size"]
    inner = config["intermediate_size"]
    patch = config["patch_size"]
    channels = config.get("num_channels", 3)
    patches = (config["image_size"] // patch) ** 2
    distilled = config.get("architectures", [""])[0].endswith("WithTeacher")
    # DeiT always carries a distillation token in the sequence, even when only [CLS] feeds a head.
    prefix = 2 if config.get("model_type") == "deit" else 1
    tokens = patches + prefix
    labels = len(config.get("id2label") or {}) or 2
    heads = 2 if distilled else 1

    embed = patches * (channels * patch * patch) * d
    per_layer = (tokens * d * 3 * d            # QKV projection
                 + 2 * tokens * tokens * d      # QK^T and AV, summed over heads
                 + tokens * d * d               # attention output projection
                 + 2 * tokens * d * inner)      # MLP fc1 + fc2
    head = heads * d * labels
    return 2.0 * batch * (embed + config["num_hidden_layers"] * per_layer + head)


# -- output ----------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


# A row whose slowest repetition took more than this times its fastest was measured on a disturbed machine: its
# median is suspect, its minimum (the run least disturbed) is the better figure to compare.
NOISY_MAX_OVER_MIN = 1.5


def spread(times: list[float]) -> dict:
    """Median, minimum, maximum and max/min of repeated timings (in their own unit)."""
    lo, hi = min(times), max(times)
    return {"median": statistics.median(times), "min": lo, "max": hi, "reps": len(times),
            "max_over_min": hi / lo if lo > 0 else float("inf")}


def noise_record(what: str, times: list[float], unit: str = "s") -> dict | None:
    """The spread of repeated timings when their max/min exceeds NOISY_MAX_OVER_MIN (for the JSON), else None."""
    s = spread(times)
    return {"what": what, "unit": unit, **s} if s["max_over_min"] > NOISY_MAX_OVER_MIN else None


def print_noise_warnings(records: list[dict | None]) -> list[dict]:
    """One WARNING line per record (Nones skipped); returns the records."""
    records = [r for r in records if r]
    for r in records:
        print(f"WARNING: {r['what']}: max/min {r['max_over_min']:.2f} > {NOISY_MAX_OVER_MIN} over {r['reps']} reps "
              f"(min {r['min']:.4g}, median {r['median']:.4g}, max {r['max']:.4g} {r['unit']}): the machine was "
              f"busy; compare minima", flush=True)
    return records


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def bar_chart(path: Path, title: str, panels: list[dict], note: str = "") -> bool:
    """Side-by-side panels of grouped bars; returns False (with a note) when matplotlib is absent.

    Each panel: {"groups": [...], "series": {name: [value or None per group]}, "ylabel": str,
    optional "hlines": [(y, label)], optional "log": bool}.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no chart {path.name}; pip install -e '.[bench]')")
        return False
    widths = [max(4.0, 1.0 + 0.5 * len(p["series"]) * len(p["groups"])) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.4), dpi=110,
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        groups, series = panel["groups"], panel["series"]
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width * 0.95, label=name,
                          color=f"C{i}")
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.annotate(f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        for y, label in panel.get("hlines", []):
            ax.axhline(y, color="crimson", linestyle="--", linewidth=1)
            ax.annotate(label, (0.01, y), xycoords=ax.get_yaxis_transform(), color="crimson", fontsize=7.5,
                        va="bottom", xytext=(0, 2), textcoords="offset points")
        if panel.get("log"):
            ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(panel["ylabel"])
        ax.margins(y=0.15)
    # Every panel shows the same systems in the same colours: one legend under the title.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10.5)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.945), ncol=min(6, len(labels)),
               fontsize=8, frameon=False)
    if note:
        fig.text(0.01, 0.01, note, fontsize=6.5, color="dimgray")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 0.89))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def fresh_numba_cache() -> str:
    return tempfile.mkdtemp(prefix="vitnp-numba-cache-")


def positive_int_list(text: str) -> list[int]:
    """argparse type for options like --batch-sizes 1,8."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
