"""End-to-end logits latency: vitnp (each GEMM backend) vs PyTorch eager, ONNX Runtime, OpenVINO and naive NumPy.

    python benchmarks/bench_e2e.py                        # full run: batch 1 and 8, all systems
    python benchmarks/bench_e2e.py --quick                # a short run while developing
    python benchmarks/bench_e2e.py --systems vitnp-auto,ort --batch-sizes 1 --reps 20

Model: a random-initialised google/vit-base-patch16-224-shaped checkpoint (ViT-B/16, 224 px, 1000 labels)
written locally by transformers (tests/checkpoints.py) and cached under ~/.cache/vitnp-bench (or
$VITNP_BENCH_CACHE); --checkpoint DIR uses another one.  Latency does not depend on the weight values.

Systems, all in this one process and all given the same number of threads (--threads, default 2):
  vitnp-numba / vitnp-blas / vitnp-auto   vitnp.load(dir, backend=...)
  torch        transformers' ViTForImageClassification in eager mode (no torch.compile; its default attention),
               torch.set_num_threads(threads), under torch.inference_mode()
  ort          ONNX Runtime on the same checkpoint exported with torch.onnx (dynamo exporter, dynamic batch; the
               TorchScript exporter if that fails, e.g. without onnxscript; cached under the checkpoint cache),
               graph optimisations ORT_ENABLE_ALL, `threads` intra-op threads
  naive-numpy  benchmarks/naive_numpy.py, a picoGPT-style pure-NumPy forward (np.matmul, np.exp softmax, erf formula)
  vitnp-int8 / vitnp-bf16   vitnp.load(dir, precision="int8" / "bf16") (numba GEMM; docs/precision.md): the
               reduced-precision kernels on every layer
  vitnp-int8-auto / vitnp-bf16-auto   the same with the default backend="auto": each layer runs the faster of
               its reduced kernel and the float32 GEMM (what a user gets; "never slower than fp32")
  ort-int8     ONNX Runtime on the same export quantised by quantize_dynamic(per_channel=True, QInt8 weights)
               (benchmarks/ort_quant.py; cached next to the fp32 export)
  openvino-fp32 / openvino-default   OpenVINO's CPU plugin on the same export: PERFORMANCE_HINT=LATENCY,
               INFERENCE_NUM_THREADS=threads; fp32 sets INFERENCE_PRECISION_HINT=f32, default leaves the precision
               to OpenVINO (bf16 on CPUs with AMX or AVX512_BF16) and records what it picked.  OpenVINO has no ISA
               switch: under --isa it runs the host's ISA and its rows say so.

Method: for each batch size every system is called once (the first-call time is recorded: for vitnp it includes
loading the Numba cache, or compiling when the cache is cold) and warmed up, then the timed repetitions run
round-robin (rep r calls every system once, in an order rotated by r), with a 500 ms pause before each call and then
a wait (at most 1 s) until no other thread of the process is running, so one system's spinning thread pool (OpenBLAS
workers spin ~100 ms after a call on a 2.6 GHz TSC) does not eat into the next one's time.  The pause is long because
the cores stay slower for a while after a long run: a Numba forward pass 100 ms after a 230 ms BLAS one takes
4-7 ms (3-5%) longer than after another Numba one, and 0.5 s later it does not.  Reported: median and minimum ms
per call, max/min, ms per image, GFLOP/s (ViT-B/16 forward = 35.1 GFLOP/img, see common.vit_forward_flops),
latency relative to ONNX Runtime, ONNX Runtime int8 and OpenVINO default, speed-up over PyTorch eager, the
largest logit difference from PyTorch (run untimed as the reference when torch
is not among the systems) checked against LOGIT_TOLERANCE, a WARNING line for every row whose max/min exceeds
common.NOISY_MAX_OVER_MIN, and PASS/FAIL lines for the targets (TARGET_* below).  JIT compile time is
measured in child processes with a fresh NUMBA_CACHE_DIR (cold) and again with that cache filled (warm).

OpenBLAS overrides: when OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set (they make numpy's OpenBLAS ~2x slower),
the script re-executes itself in a child process with both removed from the environment and exits with the
child's status; --no-reexec keeps them.  Results: benchmarks/results/e2e.json and e2e.png (e2e-quick.* with --quick,
e2e-avx2.* with --isa avx2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ort_isa  # noqa: E402

VITNP_SYSTEMS = ("vitnp-numba", "vitnp-blas", "vitnp-auto")
PRECISION_SYSTEMS = ("vitnp-int8", "vitnp-bf16")
GUARDED_SYSTEMS = ("vitnp-int8-auto", "vitnp-bf16-auto")
INT8_SYSTEMS = ("vitnp-int8", "vitnp-int8-auto")
BF16_SYSTEMS = ("vitnp-bf16", "vitnp-bf16-auto")
OPENVINO_SYSTEMS = ("openvino-fp32", "openvino-default")
ALL_SYSTEMS = (*VITNP_SYSTEMS, "torch", "ort", "naive-numpy", *PRECISION_SYSTEMS, *GUARDED_SYSTEMS, "ort-int8",
               *OPENVINO_SYSTEMS)
TARGET_BF16_VS_FP32 = 1.0      # vitnp bf16 latency / vitnp fp32 latency with the same backend, at most
# a bf16 system -> the float32 system it is measured against: the same GEMM backend (with auto, the float32 layers
# of a bf16 model choose Numba or BLAS as a float32 model's do)
FP32_COUNTERPART = {"vitnp-bf16": "vitnp-numba", "vitnp-bf16-auto": "vitnp-auto"}
TARGET_BF16_VS_OPENVINO_AMX = 0.8  # vitnp bf16 latency / OpenVINO default latency, at most, on CPUs with AMX
TARGET_INT8_VS_ORT_INT8 = 0.9  # vitnp int8 latency / ORT int8 latency, at most
TARGET_INT8_VS_ORT = 0.5       # vitnp int8 latency / ORT fp32 latency, at most
TARGET_ORT_RATIO = 0.9       # vitnp latency / ONNX Runtime latency, at most (on every ISA)
TARGET_TORCH_SPEEDUP = 2.3   # PyTorch eager latency / vitnp latency, at least
SETTLE_LIMIT_S = 1.0         # after the pause, wait at most this long for the process's other threads to idle
# Largest |logit - PyTorch's logit| a system may show, as a fraction of PyTorch's largest |logit|, by the
# precision it computes in: float32 systems sum in another order; bf16 keeps 8 significant bits, int8 256 levels.
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2, "int8": 1e-1}


# -- systems ---------------------------------------------------------------------------------------------------

class System:
    name = ""
    label = ""
    precision = "fp32"  # what it computes in, for LOGIT_TOLERANCE
    library = ""        # the library whose kernels run, as common.not_emulated names it

    def setup(self, checkpoint: Path, threads: int) -> dict:
        """Load the model; returns details to record."""
        raise NotImplementedError

    def __call__(self, pixel_values):
        raise NotImplementedError


class Vitnp(System):
    library = "vitnp"

    def __init__(self, backend: str, precision: str = "fp32"):
        self.backend = backend
        self.precision = precision
        if precision == "fp32":
            self.name, self.label = f"vitnp-{backend}", f"vitnp ({backend} GEMM)"
        elif backend == "auto":
            self.name, self.label = f"vitnp-{precision}-auto", f"vitnp ({precision}, auto)"
        else:
            self.name, self.label = f"vitnp-{precision}", f"vitnp ({precision})"

    def setup(self, checkpoint, threads):
        import vitnp

        t0 = time.perf_counter()
        self.clf = vitnp.load(checkpoint, backend=self.backend, threads=threads, progress=False,
                              precision=self.precision)
        return {"load_s": time.perf_counter() - t0}

    def __call__(self, pixel_values):
        return self.clf.logits(pixel_values)

    def details(self) -> dict:
        return self.clf.backend_report()


class TorchEager(System):
    name = "torch"
    label = "PyTorch eager (transformers)"
    library = "torch"

    def setup(self, checkpoint, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = transformers.AutoModelForImageClassification.from_pretrained(checkpoint).eval()
        self.torch = torch
        return {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                "attn_implementation": self.model.config._attn_implementation}

    def __call__(self, pixel_values):
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(pixel_values)).logits.numpy()


class OnnxRuntime(System):
    name = "ort"
    label = "ONNX Runtime"
    library = "onnxruntime"

    def setup(self, checkpoint, threads):
        import onnxruntime as ort

        details = export_onnx(checkpoint)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(details["path"]), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        details.update(load_s=time.perf_counter() - t0, providers=self.session.get_providers(),
                       graph_optimization_level="ORT_ENABLE_ALL", intra_op_threads=threads)
        return details

    def __call__(self, pixel_values):
        return self.session.run(["logits"], {self.input_name: pixel_values})[0]


class NaiveNumpy(System):
    name = "naive-numpy"
    label = "naive NumPy"
    library = "numpy"

    def setup(self, checkpoint, threads):
        from threadpoolctl import threadpool_limits

        from naive_numpy import NaiveViT

        # numpy's BLAS gets the same thread count as everyone else (vitnp may have capped it already).
        self._limit = threadpool_limits(limits=threads, user_api="blas")
        t0 = time.perf_counter()
        self.model = NaiveViT(checkpoint)
        return {"load_s": time.perf_counter() - t0}

    def __call__(self, pixel_values):
        return self.model.logits(pixel_values)


class OnnxRuntimeInt8(OnnxRuntime):
    name = "ort-int8"
    label = "ONNX Runtime int8 (quantize_dynamic)"
    precision = "int8"

    def setup(self, checkpoint, threads):
        import ort_quant

        details = export_onnx(checkpoint)
        details.update(ort_quant.export_int8(details["path"]))
        t0 = time.perf_counter()
        self.session = ort_quant.session(details["path"], threads)
        self.input_name = self.session.get_inputs()[0].name
        details.update(load_s=time.perf_counter() - t0, providers=self.session.get_providers(),
                       graph_optimization_level="ORT_ENABLE_ALL", intra_op_threads=threads)
        return details


class OpenVino(System):
    """OpenVINO's CPU plugin on the ONNX export the ort systems use; precision_hint None: OpenVINO's own choice."""

    library = "openvino"
    GEMM_LAYERS = ("FullyConnected", "MatMul", "Convolution")
    PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's type names -> ours

    def __init__(self, precision_hint: str | None):
        self.precision_hint = precision_hint
        self.name = "openvino-fp32" if precision_hint == "f32" else "openvino-default"
        self.label = "OpenVINO fp32" if precision_hint == "f32" else "OpenVINO (its default precision)"

    def setup(self, checkpoint, threads):
        import openvino as ov

        details = export_onnx(checkpoint)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if self.precision_hint:
            config["INFERENCE_PRECISION_HINT"] = self.precision_hint
        # OpenVINO's oneDNN reads ONEDNN_MAX_CPU_ISA once, at its first compile, but the plugin's own nodes do not,
        # and with it set to AVX2 the ViT fails to compile (no Softmax implementation); so OpenVINO always
        # compiles for the host ISA, and the variable is back in place for PyTorch's oneDNN afterwards.
        isa_cap = os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
        t0 = time.perf_counter()
        try:
            self.compiled = ov.Core().compile_model(details["path"], "CPU", config)
        finally:
            if isa_cap is not None:
                os.environ["ONEDNN_MAX_CPU_ISA"] = isa_cap
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output("logits")
        picked = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = self.PRECISIONS.get(picked, picked)
        details.update(load_s=time.perf_counter() - t0, openvino=ov.__version__, config=config,
                       inference_precision=picked, gemm_runtime_precisions=self.gemm_nodes("runtimePrecision"),
                       num_streams=int(self.compiled.get_property("NUM_STREAMS")),
                       inference_num_threads=int(self.compiled.get_property("INFERENCE_NUM_THREADS")))
        return details

    def __call__(self, pixel_values):
        return self.request.infer({0: pixel_values})[self.output]

    def gemm_nodes(self, key: str) -> dict:
        """How many of the executed graph's GEMM-type nodes have each value of a runtime-info key."""
        counts = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in self.GEMM_LAYERS:
                value = info[key].astype(str)
                counts[value] = counts.get(value, 0) + 1
        return counts

    def details(self) -> dict:
        """The kernels OpenVINO ran (known once every shape has run), e.g. brgemm_avx512_bf16."""
        return {"gemm_primitives": self.gemm_nodes("primitiveType"),
                "gemm_runtime_precisions": self.gemm_nodes("runtimePrecision")}


def make_system(name: str) -> System:
    if name in VITNP_SYSTEMS:
        return Vitnp(name.split("-", 1)[1])
    if name in PRECISION_SYSTEMS:
        from vitnp.options import EngineOptions

        # float32 layers (bf16's heads) on the Numba GEMM; int8 has none, and takes no backend
        precision = name.split("-", 1)[1]
        return Vitnp(EngineOptions(precision=precision).with_fixed_layout().backend, precision=precision)
    if name in GUARDED_SYSTEMS:
        return Vitnp("auto", precision=name.split("-")[1])
    if name in OPENVINO_SYSTEMS:
        return OpenVino("f32" if name == "openvino-fp32" else None)
    return {"torch": TorchEager, "ort": OnnxRuntime, "naive-numpy": NaiveNumpy, "ort-int8": OnnxRuntimeInt8}[name]()


def onnx_cache_path(checkpoint: Path) -> Path:
    """One exported model per checkpoint file version, under the benchmark cache."""
    import hashlib

    weights = Path(checkpoint) / "model.safetensors"
    stat = weights.stat()
    key = hashlib.sha1(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return common.default_cache_dir() / "onnx" / key / "model.onnx"


def export_onnx(checkpoint: Path) -> dict:
    """Export the transformers model with torch.onnx (dynamo exporter, dynamic batch); reused when cached."""
    path = onnx_cache_path(checkpoint)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return {**json.loads(info_path.read_text()), "path": str(path), "cached": True}
    import torch
    import transformers

    model = transformers.AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    cfg = model.config
    example = torch.zeros(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench] exporting {checkpoint} to ONNX (once) -> {path}", flush=True)
    names = {"input_names": ["pixel_values"], "output_names": ["logits"]}
    t0 = time.perf_counter()
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}}, **names)
        info = {"exporter": "torch.onnx.export(dynamo=True)"}
    except Exception as e:  # e.g. onnxscript not installed: the TorchScript exporter needs nothing extra
        print(f"[bench] dynamo ONNX export failed ({type(e).__name__}: {e}); using the TorchScript exporter",
              flush=True)
        t0 = time.perf_counter()
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, **names)
        info = {"exporter": "torch.onnx.export(dynamo=False)", "dynamo_error": f"{type(e).__name__}: {e}"}
    info.update(export_s=time.perf_counter() - t0, torch=torch.__version__,
                attn_implementation=cfg._attn_implementation)
    info_path.write_text(json.dumps(info, indent=2))
    return {**info, "path": str(path), "cached": False}


# -- cold / warm JIT in child processes ------------------------------------------------------------------------

JIT_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import vitnp
t1 = time.perf_counter()
clf = vitnp.load(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]), progress=False)
t2 = time.perf_counter()
c = clf.config
x = np.zeros((1, c.num_channels, c.image_size, c.image_size), np.float32)
clf.logits(x)
t3 = time.perf_counter()
warm = []
for _ in range(3):
    s = time.perf_counter(); clf.logits(x); warm.append(time.perf_counter() - s)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2, "warm_call_s": min(warm)}))
"""


def measure_jit(checkpoint: Path, backends: list[str], threads: int) -> dict:
    """First call with an empty Numba cache (compiles everything) vs with that cache filled, per backend."""
    import shutil

    results = {}
    for backend in backends:
        cache = common.fresh_numba_cache()
        try:
            runs = {}
            for state in ("cold_cache", "warm_cache"):
                proc = subprocess.run([sys.executable, "-c", JIT_PROBE, str(checkpoint), backend, str(threads)],
                                      capture_output=True, text=True, env=_child_env({"NUMBA_CACHE_DIR": cache}))
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
                runs[state] = json.loads(proc.stdout.strip().splitlines()[-1])
            cold, warm = runs["cold_cache"], runs["warm_cache"]
            results[backend] = {
                **runs,
                "compile_s": cold["first_call_s"] - warm["first_call_s"],
            }
            print(f"  JIT vitnp-{backend}: first call {cold['first_call_s']:.2f} s with an empty Numba cache, "
                  f"{warm['first_call_s']:.2f} s with it filled, warm call {warm['warm_call_s'] * 1e3:.0f} ms "
                  f"-> compile ~{results[backend]['compile_s']:.1f} s", flush=True)
        except Exception as e:  # recorded, not fatal: the latency numbers stand on their own
            results[backend] = {"error": str(e)}
            print(f"  JIT vitnp-{backend}: failed: {e}", flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return results


def _child_env(extra: dict) -> dict:
    """Children inherit exactly this process's environment (already free of the overrides unless --no-reexec)."""
    env = dict(os.environ)
    env.update(extra)
    return env


# -- measurement -----------------------------------------------------------------------------------------------

def timed_call(system: System, x) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = system(x)
    return time.perf_counter() - t0, out


def run(args) -> dict:
    import numpy as np

    info = common.machine_info()
    if any(name in ("ort", "ort-int8") for name in args.systems):
        info["onnxruntime_mlas"] = ort_isa.mlas_summary()
    common.print_machine(info)
    checkpoint = Path(args.checkpoint) if args.checkpoint else common.benchmark_checkpoint()
    config = common.read_config(checkpoint)
    print(f"checkpoint: {checkpoint} ({config['architectures'][0]}, {config['num_hidden_layers']} x "
          f"{config['hidden_size']}, {config['image_size']} px, {len(config['id2label'])} labels)")
    print(f"threads: {args.threads}; reps: {args.reps}; batch sizes: {args.batch_sizes}; warm-up calls: {args.warmup}")

    systems, setup, missing = [], {}, {}
    for name in args.systems:
        system = make_system(name)
        try:
            setup[name] = system.setup(checkpoint, args.threads)
            systems.append(system)
            exporter = f" (model from {setup[name]['exporter']})" if "exporter" in setup[name] else ""
            print(f"  set up {name}: load {setup[name]['load_s']:.2f} s{exporter}", flush=True)
        except Exception as e:
            missing[name] = f"{type(e).__name__}: {e}"
            print(f"  {name} unavailable: {missing[name]}", flush=True)
    # Every system's logits are compared with PyTorch's; without torch among the systems it runs untimed.
    reference_model = next((s for s in systems if s.name == "torch"), None)
    if reference_model is None:
        try:
            reference_model = TorchEager()
            reference_model.setup(checkpoint, args.threads)
        except Exception as e:
            reference_model = None
            print(f"  no reference logits (PyTorch unavailable: {type(e).__name__}: {e})", flush=True)
    # BLAS pools as they are once everything is loaded (torch / ORT may bring their own).
    info["threadpools_after_setup"] = common.blas_libraries()

    rng = np.random.default_rng(0)
    shape = (config.get("num_channels", 3), config["image_size"], config["image_size"])
    results, noise_warnings = [], []
    # Under --isa, the libraries that still run the host's widest kernels (their rows say "[host ISA]").
    host_isa_libraries = common.not_emulated(os.environ.get(common.ISA_MARKER, ""))
    for batch in args.batch_sizes:
        x = rng.uniform(-1.0, 1.0, (batch, *shape)).astype(np.float32)
        first, outputs = {}, {}
        for system in list(systems):
            try:
                first[system.name], outputs[system.name] = timed_call(system, x)
                for _ in range(args.warmup - 1):
                    system(x)
            except Exception as e:  # one broken system should not cost the others' numbers
                missing[system.name] = f"batch {batch}: {type(e).__name__}: {e}"
                print(f"  {system.name} failed: {missing[system.name]}", flush=True)
                systems.remove(system)
        reference = outputs.get("torch")
        if reference is None and reference_model is not None:
            reference = reference_model(x)
        from vitnp.kernels.autotune import settle  # here, not at the top: vitnp's pool settings stay as set up

        times = {s.name: [] for s in systems}
        for rep in range(args.reps):
            shift = rep % max(1, len(systems))
            for system in systems[shift:] + systems[:shift]:
                time.sleep(args.settle_ms / 1e3)
                # OpenBLAS's workers spin 2^28 TSC ticks after a call (~100 ms on a 2.6 GHz TSC) unless vitnp set
                # OPENBLAS_THREAD_TIMEOUT before numpy loaded; whatever ran last, start on idle cores.
                settle(limit=SETTLE_LIMIT_S)
                elapsed, _ = timed_call(system, x)
                times[system.name].append(elapsed)
        flops = common.vit_forward_flops(config, batch)
        rows = {}
        for system in systems:
            t = times[system.name]
            median = statistics.median(t)
            diff = float(np.abs(outputs[system.name] - reference).max()) if reference is not None else None
            scale = float(np.abs(reference).max()) if reference is not None else None
            row = {
                "batch": batch, "system": system.name, "label": system.label, "reps": len(t),
                "precision": system.precision, "host_isa": system.library in host_isa_libraries,
                "median_ms": median * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                "max_over_min": common.spread(t)["max_over_min"],
                "ms_per_img": median * 1e3 / batch, "img_per_s": batch / median,
                "gflops": flops / median / 1e9, "gflops_best": flops / min(t) / 1e9,
                "first_call_ms": first[system.name] * 1e3,
                "times_ms": [round(v * 1e3, 3) for v in t],
                "max_abs_diff_vs_torch": diff,
                "logit_tolerance": (LOGIT_TOLERANCE[system.precision] * scale if reference is not None else None),
            }
            row["logits_ok"] = diff <= row["logit_tolerance"] if reference is not None else None
            rows[system.name] = row
        for row in rows.values():
            torch_row = rows.get("torch")
            row["speedup_vs_torch"] = torch_row["median_ms"] / row["median_ms"] if torch_row else None
            for key, other in (("latency_vs_ort", "ort"), ("latency_vs_ort_int8", "ort-int8"),
                               ("latency_vs_openvino_default", "openvino-default"),
                               ("latency_vs_fp32", FP32_COUNTERPART.get(row["system"]))):
                row[key] = row["median_ms"] / rows[other]["median_ms"] if other in rows else None
                row[min_ratio_key(key)] = row["min_ms"] / rows[other]["min_ms"] if other in rows else None
            results.append(row)
        print_batch_table(batch, flops / batch, list(rows.values()))
        noise_warnings += common.print_noise_warnings([
            common.noise_record(f"{name} batch {batch}", [v * 1e3 for v in t], unit="ms") for name, t in times.items()])
        for row in rows.values():
            if row["logits_ok"] is False:
                print(f"LOGITS OFF  {row['system']} batch {batch}: max|diff| vs torch "
                      f"{row['max_abs_diff_vs_torch']:.2e} > {row['logit_tolerance']:.2e} ({row['precision']} "
                      f"tolerance)", flush=True)

    jit = {}
    jit_backends = [b for b in args.cold_jit if f"vitnp-{b}" in [s.name for s in systems]]
    if jit_backends:
        print("JIT compile time (child processes, batch 1):", flush=True)
        jit = measure_jit(checkpoint, jit_backends, args.threads)

    targets = evaluate_targets(results, amx=any(f.startswith("amx") for f in info["cpu_flags"]))
    return {
        "benchmark": "e2e",
        "machine": info,
        "settings": {"checkpoint": str(checkpoint), "architecture": config["architectures"][0],
                     "gflop_per_img": common.vit_forward_flops(config, 1) / 1e9, "threads": args.threads,
                     "reps": args.reps, "warmup": args.warmup, "batch_sizes": args.batch_sizes,
                     "systems": args.systems, "settle_ms": args.settle_ms, "quick": args.quick,
                     "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "setup": setup,
        "missing": missing,
        "results": results,
        "noise_warnings": noise_warnings,
        "jit": jit,
        "vitnp_backends": {s.name: s.details() for s in systems if isinstance(s, Vitnp)},
        "openvino_graphs": {s.name: s.details() for s in systems if isinstance(s, OpenVino)},
        "targets": targets,
    }


def print_batch_table(batch: int, gflop_per_img: float, rows: list[dict]) -> None:
    headers = ["system", "precision", "median ms", "min ms", "max/min", "ms/img", "img/s", "GFLOP/s", "vs ORT",
               "vs ORT int8", "vs OV default", "vs torch", "first call ms", "max|diff| vs torch"]

    def ratio(value, suffix="x"):
        return f"{value:.2f}{suffix}" if value else "-"

    table = []
    for r in rows:
        diff = r["max_abs_diff_vs_torch"]
        table.append([
            r["system"] + (" [host ISA]" if r["host_isa"] else ""), r["precision"],
            f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_over_min']:.2f}", f"{r['ms_per_img']:.1f}",
            f"{r['img_per_s']:.2f}", f"{r['gflops']:.1f}", ratio(r["latency_vs_ort"]),
            ratio(r["latency_vs_ort_int8"]), ratio(r["latency_vs_openvino_default"]),
            ratio(r["speedup_vs_torch"], "x faster"), f"{r['first_call_ms']:.0f}",
            "-" if diff is None else f"{diff:.1e}" + ("" if r["logits_ok"] else " OFF"),
        ])
    print(f"\nbatch {batch} ({gflop_per_img / 1e9:.2f} GFLOP/img; ratios of medians: 'vs X' = latency / X's latency, "
          f"'vs torch' = torch latency / latency)")
    print(common.format_table(headers, table), flush=True)


def min_ratio_key(key: str):
    """The row key of the ratio of minima beside the latency ratio `key` (latency_vs_X -> min_vs_X); None for a key
    that is no latency ratio (a speed-up)."""
    return "min_" + key[len("latency_"):] if key.startswith("latency_") else None


def evaluate_targets(results: list[dict], amx: bool) -> list[dict]:
    """PASS/FAIL per vitnp row and target whose comparison system ran (bf16 vs OpenVINO only on AMX CPUs)."""
    checks = [  # (metric, row key, which vitnp systems, bound, at most?)
        ("latency_vs_ort", "latency_vs_ort", None, TARGET_ORT_RATIO, True),
        ("latency_vs_ort_int8", "latency_vs_ort_int8", INT8_SYSTEMS, TARGET_INT8_VS_ORT_INT8, True),
        ("int8_latency_vs_ort", "latency_vs_ort", INT8_SYSTEMS, TARGET_INT8_VS_ORT, True),
        ("bf16_latency_vs_fp32", "latency_vs_fp32", BF16_SYSTEMS, TARGET_BF16_VS_FP32, True),
        ("speedup_vs_torch", "speedup_vs_torch", None, TARGET_TORCH_SPEEDUP, False),
    ]
    if amx:
        checks.insert(4, ("bf16_latency_vs_openvino_default", "latency_vs_openvino_default", BF16_SYSTEMS,
                          TARGET_BF16_VS_OPENVINO_AMX, True))
    targets = []
    for row in results:
        if not row["system"].startswith("vitnp-"):
            continue
        for metric, key, only, bound, at_most in checks:
            value = row.get(key)
            if value is None or (only and row["system"] not in only):
                continue
            targets.append({"system": row["system"], "batch": row["batch"], "metric": metric, "value": value,
                            "min_value": row.get(min_ratio_key(key)),
                            "target": f"{'<=' if at_most else '>='} {bound}",
                            "pass": value <= bound if at_most else value >= bound})
    return targets


TARGET_WORDS = {"latency_vs_ort": "latency / ONNX Runtime latency",
                "int8_latency_vs_ort": "latency / ONNX Runtime (fp32) latency",
                "latency_vs_ort_int8": "latency / ONNX Runtime int8 latency",
                "bf16_latency_vs_fp32": "latency / vitnp fp32 latency (same backend)",
                "bf16_latency_vs_openvino_default": "latency / OpenVINO default latency",
                "speedup_vs_torch": "speed-up over PyTorch eager"}


def print_targets(targets: list[dict]) -> None:
    if not targets:
        print("targets: not evaluated (needs ort and/or torch in --systems)")
        return
    print("\ntargets:")
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['system']:<12s} batch {t['batch']:<2d} "
              f"{TARGET_WORDS[t['metric']]}: {t['value']:.2f}x (target {t['target']}x)"
              + (f"; ratio of minima {t['min_value']:.2f}x" if t.get("min_value") is not None else ""))


def plot(data: dict, path: Path) -> None:
    results = data["results"]
    batches = data["settings"]["batch_sizes"]
    systems = [s for s in data["settings"]["systems"] if any(r["system"] == s for r in results)]

    def series(key):
        return {s: [next((r[key] for r in results if r["system"] == s and r["batch"] == b), None)
                    for b in batches] for s in systems}

    m, st = data["machine"], data["settings"]
    note = (f"{m['cpu']}, {m['usable_cpus']} CPUs (load average at start {_load(m)}), {st['threads']} threads "
            f"per system; median of {st['reps']} interleaved reps; {Path(st['checkpoint']).name}")
    groups = [f"batch {b}" for b in batches]
    common.bar_chart(path, f"{st['architecture']} end-to-end logits, {st['gflop_per_img']:.3g} GFLOP/img", [
        {"groups": groups, "series": series("ms_per_img"), "ylabel": "ms per image (lower is better)"},
        {"groups": groups, "series": series("gflops"), "ylabel": "GFLOP/s (higher is better)"},
    ], note=note)


def _load(machine: dict) -> str:
    load = machine.get("load_average_at_start")
    return f"{load[0]:.1f}" if load else "?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--reps", type=int, help="timed calls per system and batch size (default 15; 3 with --quick)")
    p.add_argument("--batch-sizes", type=common.positive_int_list, default=[1, 8], help="comma-separated (default 1,8)")
    p.add_argument("--systems", type=_system_list, default=list(ALL_SYSTEMS),
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="few reps, one warm-up call, writes e2e-quick.*")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--warmup", type=int, help="untimed calls per system and batch size (default 2; 1 with --quick)")
    p.add_argument("--settle-ms", type=float, default=500.0,
                   help="pause before each timed call (default 500; then up to 1 s until the other threads idle)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the cached vit-base-shaped one)")
    p.add_argument("--cold-jit", type=_backend_list, default=None,
                   help="vitnp backends whose cold/warm JIT time is measured in child processes "
                        "(comma-separated, 'none' to skip; default: every vitnp backend in --systems)")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR, help="where e2e.json / e2e.png go")
    p.add_argument("--no-plot", action="store_true")
    common.add_isa_argument(p)
    p.add_argument("--no-reexec", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (default: re-run without them)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.reps < 1 or args.warmup < 1 or args.threads < 1:
        p.error("--reps, --warmup and --threads must be >= 1")
    if args.cold_jit is None:
        args.cold_jit = [s.split("-", 1)[1] for s in args.systems if s in VITNP_SYSTEMS]
    return args


def _system_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALL_SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; choose from {','.join(ALL_SYSTEMS)}")
    return names


def _backend_list(text: str) -> list[str]:
    if text.strip() == "none":
        return []
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if f"vitnp-{n}" not in VITNP_SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; choose from numba,blas,auto or none")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    common.reexec_without_blas_overrides(args.no_reexec, args.isa, path_entries=ort_isa.path_entries)
    data = run(args)
    print_targets(data["targets"])
    if data["missing"]:
        print("\nmissing systems:")
        for name, err in data["missing"].items():
            print(f"  {name}: {err}")
    stem = "e2e" + ("" if args.isa == "native" else f"-{args.isa}") + ("-quick" if args.quick else "")
    common.write_json(args.out_dir / f"{stem}.json", data)
    if not args.no_plot:
        plot(data, args.out_dir / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
