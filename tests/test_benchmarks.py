"""Smoke runs of the end-to-end, start-up, Ray and server benchmarks on a tiny checkpoint, and checks of their
references.

The benchmarks run as the user runs them (a subprocess on the script) but with --no-reexec, so the test leaves the
machine's OpenBLAS variables alone.  Nothing here asserts on timings; it checks that every system produced
positive numbers, that they agree with transformers, that the naive NumPy reference and the FLOP count are
what they claim to be (against transformers and torch's own FLOP counter), that the server benchmark's readings
of the server's /metrics cover exactly its measured requests, that the noise warning fires on the spreads it is
for, and that the benchmark modules import each other without cycles.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
from naive_numpy import NaiveViT  # noqa: E402

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / name), "--no-reexec", *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def transformers_logits(checkpoint: Path, pixel_values: np.ndarray, attn_implementation: str | None = None):
    import torch
    import transformers

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = transformers.AutoModelForImageClassification.from_pretrained(checkpoint, **kwargs).eval()
    with torch.no_grad():
        return model(torch.from_numpy(pixel_values)).logits.numpy()


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_deit", "tiny_deit_distilled"])
def test_naive_numpy_matches_transformers(fixture, request):
    checkpoint = request.getfixturevalue(fixture)
    pixel_values = np.random.default_rng(3).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    expected = transformers_logits(checkpoint, pixel_values)
    logits = NaiveViT(checkpoint).logits(pixel_values)
    assert logits.dtype == np.float32
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_deit", "tiny_deit_distilled"])
def test_flop_count_matches_torch_flop_counter(fixture, request):
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    checkpoint = request.getfixturevalue(fixture)
    # Eager attention: its matmuls are visible to the counter (the fused CPU SDPA kernel is not counted).
    model = transformers.AutoModelForImageClassification.from_pretrained(
        checkpoint, attn_implementation="eager").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
    assert common.vit_forward_flops(common.read_config(checkpoint), batch=2) == counter.get_total_flops()


def test_flop_count_of_vit_base_is_the_published_figure():
    # ViT-B/16 at 224 px: 17.56 GMACs (the figure fvcore / timm publish) = 35.1 GFLOP.
    config = {"hidden_size": 768, "intermediate_size": 3072, "patch_size": 16, "image_size": 224,
              "num_channels": 3, "num_hidden_layers": 12, "model_type": "vit",
              "architectures": ["ViTForImageClassification"], "id2label": {str(i): str(i) for i in range(1000)}}
    assert common.vit_forward_flops(config) / 1e9 == pytest.approx(35.1, abs=0.1)


def test_clean_env_drops_only_the_openblas_overrides():
    # A copy is checked; the real environment is not modified by the code under test.
    before = dict(os.environ)
    env = common.clean_env({"EXTRA": "1"})
    assert not set(common.BLAS_OVERRIDES) & set(env)
    assert env["EXTRA"] == "1"
    assert {k: v for k, v in before.items() if k not in common.BLAS_OVERRIDES}.items() <= env.items()
    assert dict(os.environ) == before


E2E_SYSTEMS = ["vitnp-numba", "vitnp-blas", "vitnp-auto", "torch", "naive-numpy"]


def test_bench_e2e_smoke(tiny_vit, tmp_path):
    proc = run_script("bench_e2e.py", "--checkpoint", str(tiny_vit), "--quick", "--reps", "2",
                      "--batch-sizes", "1,2", "--systems", ",".join(E2E_SYSTEMS), "--cold-jit", "blas",
                      "--settle-ms", "0", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "e2e-quick.json").read_text())
    assert data["missing"] == {}
    assert sorted((r["system"], r["batch"]) for r in data["results"]) == sorted(
        (s, b) for s in E2E_SYSTEMS for b in (1, 2))
    for row in data["results"]:
        assert row["reps"] == 2 and len(row["times_ms"]) == 2
        for key in ("median_ms", "ms_per_img", "gflops", "img_per_s", "first_call_ms", "speedup_vs_torch"):
            assert row[key] > 0, (row["system"], key)
        assert row["latency_vs_ort"] is None  # ORT was not asked for
        # Every system computed the same logits as transformers, so the timings are of real forward passes.
        assert row["max_abs_diff_vs_torch"] < 1e-4, row["system"]
    jit = data["jit"]["blas"]
    assert jit["cold_cache"]["first_call_s"] > 0 and jit["warm_cache"]["warm_call_s"] > 0
    # Targets are reported for every vitnp backend and batch against torch (ORT absent).
    assert sorted((t["system"], t["batch"]) for t in data["targets"]) == sorted(
        (s, b) for s in E2E_SYSTEMS if s.startswith("vitnp") for b in (1, 2))
    assert all(isinstance(t["pass"], bool) for t in data["targets"])
    assert data["machine"]["threadpools"], "threadpoolctl saw no BLAS"
    assert "speed-up over PyTorch eager" in proc.stdout
    assert (tmp_path / "e2e-quick.png").is_file() == HAVE_MATPLOTLIB


def test_bench_startup_smoke(tiny_vit, tmp_path):
    proc = run_script("bench_startup.py", "--checkpoint", str(tiny_vit), "--runs", "2", "--backend", "blas",
                      "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "startup.json").read_text())
    assert data["missing"] == {}
    assert set(data["summary"]) == {"vitnp (cold JIT)", "vitnp (warm JIT)", "transformers pipeline"}
    for name, s in data["summary"].items():
        assert s["first_result_s"] > 0 and s["exit_s"] >= s["first_result_s"], name
        assert s["peak_rss_mb"] > 50, name  # a Python process with numpy loaded is never smaller
    for name in ("vitnp (warm JIT)", "transformers pipeline"):
        assert data["summary"][name]["load_s"] >= 0 and data["summary"][name]["import_s"] > 0
    # Both printed a real prediction for the image: a label of the tiny model.
    labels = set(common.read_config(tiny_vit)["id2label"].values())
    assert all(r["top1"] in labels for r in data["runs"]["vitnp"])
    assert all(r["phases"]["top1"] in labels for r in data["runs"]["transformers"])
    assert [t["metric"] for t in data["targets"]] == ["cold_first_result_s", "first_result_s", "peak_rss_mb"]
    # The cold round (empty caches) said on stderr that it was compiling; the warm ones did not compile.
    cold, *warm = data["runs"]["vitnp"]
    assert cold["stderr_first_line"].startswith("vitnp: compiling kernels for this CPU (")
    assert not any("compiling" in r["stderr_first_line"] for r in warm)
    assert "peak RSS" in proc.stdout
    assert (tmp_path / "startup.png").is_file() == HAVE_MATPLOTLIB


def test_bench_ray_smoke(tiny_vit, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    run_script("bench_ray.py", "--model", str(tiny_vit), "--images", "16", "--rounds", "1", "--workers", "1",
               "--actors", "1,2", "--private-actors", "1", "--no-warm", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "ray.json").read_text())
    assert set(data["summary"]) == {"plain_cli", "ray_1"}
    for s in data["summary"].values():
        # A tiny model's rate is start-up noise; the timings themselves must be there.
        assert s["end_to_end_s"] > 0 and s["one_batch_end_to_end_s"] > 0
    memory = data["memory"]
    # (That the weights really are shared is tested in test_ray.py; here: one PSS reading per actor process.)
    for kind, n in (("shared", "1"), ("shared", "2"), ("private", "1")):
        m = memory[kind][n]
        assert len(set(m["pids"])) == int(n) and all(p["pss_kib"] > 10_000 for p in m["per_actor"])
    assert memory["weights_mib"] > 0 and data["targets"]["pss_4_vs_1_actors"]["ratio"] is None
    assert data["machine"]["versions"]["ray"]


def test_bench_server_smoke(tiny_vit, tmp_path):
    proc = run_script("bench_server.py", "--model", str(tiny_vit), "--quick", "--backend", "blas",
                      "--middleware-reps", "5", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "server-quick.json").read_text())
    assert set(data["server"]) == {"1", "8"}
    for n, runs in data["runs"].items():
        assert len(runs) == 1
        for r in runs:
            assert r["failures"] == 0 and r["requests"] == int(n) * 2
            # The two /metrics readings bracket exactly the measured requests: one image each, no warm-up.
            assert r["images_forwarded"] == r["requests"]
            assert -(-r["requests"] // 8) <= r["forward_passes"] <= r["requests"]
            assert 0 < r["busy_s"] <= r["wall_s"] and 0 < r["busy_fraction"] <= 1
            assert r["forward_ms_per_image"] == pytest.approx(r["busy_s"] / r["images_forwarded"] * 1e3)
            assert r["delivered_over_forward"] == pytest.approx(r["busy_fraction"])
    for n, s in data["server"].items():
        assert 0 < s["min_busy_fraction"] <= s["busy_fraction"] <= s["max_busy_fraction"] <= 1
        assert s["images_forwarded"] == s["requests"] and s["forward_ms_per_image"] > 0
    eight = data["server"]["8"]
    assert data["diagnostic"] == {"clients": 8, "busy_fraction": eight["busy_fraction"],
                                  "delivered_over_forward": eight["delivered_over_forward"]}
    assert isinstance(data["target"]["met"], bool)
    assert "target: 8 clients >= 0.95x engine batch-8 images/s" in proc.stdout
    assert "diagnostic, not the target: at 8 clients the server's engine ran forward passes" in proc.stdout


# -- ONNX Runtime limited to AVX2 (benchmarks/ort_isa.py) ------------------------------------------------------

_ORT_MATMUL = r"""
import sys, numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
rng = np.random.default_rng(0)
w = rng.standard_normal((768, 3072)).astype(np.float32)
x = rng.standard_normal((197, 768)).astype(np.float32)
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [197, 768])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [197, 3072])], [numpy_helper.from_array(w, "w")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
np.save(sys.argv[1], session.run(None, {"x": x})[0])
print(ort.__file__)
"""


def _ort_matmul(path_entry, out: Path) -> tuple[np.ndarray, str]:
    env = dict(os.environ)
    if path_entry is not None:
        env["PYTHONPATH"] = str(path_entry)
    proc = subprocess.run([sys.executable, "-c", _ORT_MATMUL, str(out)], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return np.load(out), proc.stdout.strip()


def test_ort_avx2_copy_runs_avx2_kernels_with_the_same_results(tmp_path):
    import ort_isa
    from vitnp.kernels import isa

    copy = ort_isa.avx2_copy(tmp_path)
    assert ort_isa.avx2_copy(tmp_path) == copy  # built once, then reused
    lanes, package = ort_isa.mlas_vector_width(copy)
    assert Path(package).resolve() == (copy / "onnxruntime").resolve()
    assert lanes == 8
    # The installed library, untouched, still picks the host's widest kernels.
    host_lanes, host_package = ort_isa.mlas_vector_width()
    assert Path(host_package).resolve() == ort_isa.installed_package().resolve()
    assert host_lanes == (16 if isa.host_isa() == "avx512" else 8)
    capped, capped_from = _ort_matmul(copy, tmp_path / "capped.npy")
    native, native_from = _ort_matmul(None, tmp_path / "native.npy")
    assert capped_from != native_from
    np.testing.assert_allclose(capped, native, rtol=1e-4, atol=1e-3)  # sums of 768 products, other order


def test_ort_patch_changes_exactly_the_two_jumps():
    import ort_isa

    avx512 = b"\x41\xf7\xc2\x00\x00\x01\x00\x74\x0e\x4c\x89\xc0\x48\xf7\xd0\xa8\xe0\x0f\x84\x54\x01\x00\x00"
    vnni = b"\xb8\x07\x00\x00\x00\xb9\x01\x00\x00\x00\x0f\xa2\xa8\x10\x74\x38"
    data = bytearray(b"\x90" * 64 + vnni + b"\x90" * 64 + avx512 + b"\x90" * 64)
    before = bytes(data)
    jumps = ort_isa.patch_branches(data)
    assert jumps == {"AVX-VNNI": 64 + 14, "AVX512F": 64 + 16 + 64 + 7}
    assert data[78] == data[151] == 0xEB
    assert [i for i in range(len(data)) if data[i] != before[i]] == [78, 151]  # nothing else changed
    near = bytearray(vnni + avx512.replace(b"\x74\x0e", b"\x0f\x84\x10\x00\x00\x00"))
    assert ort_isa.patch_branches(near)["AVX512F"] == 16 + 7
    assert near[23:29] == b"\x90\xe9\x10\x00\x00\x00"  # nop; jmp rel32 ending where je did
    for broken, message in ((b"\x90" * 100 + avx512, "AVX-VNNI check 0 times"),
                            (vnni + avx512 + b"\x90" * 8 + avx512, "AVX512F check 2 times")):
        data = bytearray(broken)
        with pytest.raises(ort_isa.OrtPatchError, match=message):
            ort_isa.patch_branches(data)
        assert data == broken  # refused before changing anything


# -- the benchmark modules' import graph ------------------------------------------------------------------------

def benchmark_imports() -> dict[str, list[tuple[str, str | None, int]]]:
    """module -> (benchmark module it imports, private name taken from it or None, line) for every import,
    including those inside functions."""
    modules = {path.stem: path for path in sorted(BENCH.glob("*.py"))}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        local = {}  # local name -> benchmark module
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        found.append((alias.name, None, node.lineno))
                        local[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    found.append((node.module, alias.name if alias.name.startswith("_") else None, node.lineno))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in local
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append((local[node.value.id], node.attr, node.lineno))
        graph[name] = found
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [])):
            return cycle[cycle.index(cycle[-1]):]
    return None


def test_find_cycle_finds_a_cycle():
    # The checker itself can fail: a two-module cycle and a longer one are reported, a chain is not.
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_benchmark_modules_have_no_import_cycle_and_no_private_imports():
    graph = benchmark_imports()
    assert "common" in graph and ("common", None) in {(m, p) for m, p, _ in graph["ort_isa"]}, graph["ort_isa"]
    edges = {name: {m for m, _, _ in found if m != name} for name, found in graph.items()}
    assert find_cycle(edges) is None, f"import cycle among benchmarks/ modules: {find_cycle(edges)}"
    private = [(name, m, p, line) for name, found in graph.items() for m, p, line in found if p and m != name]
    assert not private, f"benchmark modules use another module's private names: {private}"


# -- noisy rows --------------------------------------------------------------------------------------------------

def test_noise_warning_fires_above_the_max_over_min_limit_only(capsys):
    limit = common.NOISY_MAX_OVER_MIN
    assert common.noise_record("steady", [100.0, 104.0, 100.0 * limit], "ms") is None  # at the limit: no warning
    spread_out = [100.0, 120.0, 110.0, 100.0 * limit + 1.0]
    record = common.noise_record("busy", spread_out, "ms")
    assert record["max_over_min"] == pytest.approx((100.0 * limit + 1.0) / 100.0)
    assert (record["min"], record["median"], record["max"], record["reps"]) == (100.0, 115.0, 100.0 * limit + 1, 4)
    printed = common.print_noise_warnings([None, record])
    assert printed == [record]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("WARNING: busy: max/min 1.51 > 1.5 over 4 reps (min 100, median 115")


# -- OpenVINO as a system of bench_e2e -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One benchmark cache (the ONNX export) for the OpenVINO tests."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.parametrize("hint", ["f32", None])
def test_openvino_system_agrees_with_transformers(hint, tiny_vit, bench_cache, monkeypatch):
    pytest.importorskip("openvino", reason="openvino is not installed (the bench extra)")
    import bench_e2e

    monkeypatch.setenv("VITNP_BENCH_CACHE", str(bench_cache))
    system = bench_e2e.OpenVino(hint)
    details = system.setup(tiny_vit, threads=2)
    assert details["inference_num_threads"] == 2 and details["num_streams"] == 1
    pixel_values = np.random.default_rng(5).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    logits = system(pixel_values)
    expected = transformers_logits(tiny_vit, pixel_values)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    # What OpenVINO says it picked is what its GEMM nodes ran in.
    graph = system.details()
    picked = details["inference_precision"]
    assert set(graph["gemm_runtime_precisions"]) == {picked}, graph
    if hint == "f32":
        assert (system.name, system.precision, picked) == ("openvino-fp32", "fp32", "f32")
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    else:
        assert system.name == "openvino-default" and system.precision == bench_e2e.OpenVino.PRECISIONS[picked]
        tolerance = bench_e2e.LOGIT_TOLERANCE[system.precision] * np.abs(expected).max()
        assert np.abs(logits - expected).max() <= tolerance
        assert np.abs(logits - expected).max() > 0 or picked == "f32"  # bf16 really rounded something


def test_bench_e2e_openvino_under_emulated_avx2(tiny_vit, bench_cache, tmp_path):
    """The --isa avx2 child as common.reexec_without_blas_overrides starts it: OpenVINO still compiles (with
    ONEDNN_MAX_CPU_ISA=AVX2 set it would not) and its rows say they ran the host ISA; naive NumPy's do not."""
    pytest.importorskip("openvino", reason="openvino is not installed (the bench extra)")
    env = {**os.environ, **common.ISA_EMULATION["avx2"], common.ISA_MARKER: "avx2", common.REEXEC_MARKER: "",
           "VITNP_BENCH_CACHE": str(bench_cache)}
    systems = ["naive-numpy", "openvino-fp32", "openvino-default"]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--no-reexec", "--checkpoint", str(tiny_vit),
                           "--quick", "--reps", "2", "--batch-sizes", "1,2", "--systems", ",".join(systems),
                           "--cold-jit", "none", "--settle-ms", "0", "--out-dir", str(tmp_path), "--no-plot",
                           "--isa", "avx2"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads((tmp_path / "e2e-avx2-quick.json").read_text())
    assert data["missing"] == {}
    assert data["machine"]["not_emulated"] == ["openvino"]
    rows = {(r["system"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(s, b) for s in systems for b in (1, 2)}
    for (system, _), row in rows.items():
        assert row["host_isa"] == system.startswith("openvino")
        assert row["logits_ok"] is True, row  # checked against transformers' logits, run untimed as reference
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["max_over_min"] == pytest.approx(row["max_ms"] / row["min_ms"])
    assert "openvino-fp32 [host ISA]" in proc.stdout
    assert data["setup"]["openvino-fp32"]["inference_precision"] == "f32"
    assert set(data["openvino_graphs"]) == {"openvino-fp32", "openvino-default"}
    # Warnings are recorded for exactly the rows whose spread exceeds the limit.
    noisy = {w["what"] for w in data["noise_warnings"]}
    assert noisy == {f"{s} batch {b}" for (s, b), r in rows.items() if r["max_over_min"] > common.NOISY_MAX_OVER_MIN}
