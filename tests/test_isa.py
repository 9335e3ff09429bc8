"""Every ISA variant of the kernels that this CPU can execute, each in its own process (VITNP_ISA is read before
Numba compiles anything): GEMM, attention and the full forward pass against float64 NumPy and transformers, and
the GEMM micro-kernel's k loop free of spills in the register width the variant is written for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from references import attention_reference, gelu_reference
from vitnp.kernels import isa

RUNNABLE = isa.ISAS[isa.ISAS.index(isa.host_isa()):]
VECTOR_REGISTER = {"avx512": "zmm", "avx2": "ymm", "generic": "xmm"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=RUNNABLE)
def probe(request, tmp_path_factory, tiny_vit, tiny_deit_distilled, base_vit):
    out = tmp_path_factory.mktemp(f"isa-{request.param}") / "probe.npz"
    models = {"tiny_vit": str(tiny_vit), "tiny_deit_distilled": str(tiny_deit_distilled), "base_vit": str(base_vit)}
    env = {**os.environ, "VITNP_ISA": request.param}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "isa_probe.py"), str(out), json.dumps(models)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    return request.param, {key: data[key] for key in data.files}, models


def test_probe_ran_the_requested_variant(probe):
    name, data, _ = probe
    assert str(data["isa"]) == name
    described = json.loads(str(data["describe"]))
    assert described["isa"] == name and described["vector_lanes"] == isa.SPECS[name].lanes
    if name != isa.host_isa():
        # Forced below the host: Numba generated code for a CPU of that class, not for this one.
        assert described["codegen_cpu"] == isa.SPECS[name].cpu_name


def test_micro_kernel_k_loop_has_no_spills(probe):
    name, data, _ = probe
    loop = str(data["loop_asm"]).splitlines()
    register = VECTOR_REGISTER[name]
    fma = [line for line in loop if "fmadd" in line or "mulps" in line]
    spec = isa.SPECS[name]
    assert len(fma) >= spec.gemm_mr * spec.gemm_nr // spec.lanes, "\n".join(loop)
    assert all(f"%{register}" in line for line in fma), "\n".join(loop)
    if name != "generic":  # SSE2 has no FMA; the others must use it
        assert all("vfmadd" in line for line in fma), "\n".join(loop)
    # A spill or reload is a memory operand on the stack (%rsp / %rbp) inside the loop.
    stack = [line for line in loop if "(%rsp)" in line or "(%rbp)" in line]
    assert not stack, "\n".join(loop)
    wider = {"avx2": "%zmm", "generic": "%ymm"}.get(name)
    if wider:  # nothing wider than the variant's registers anywhere in the loop
        assert not any(wider in line for line in loop)


@pytest.mark.parametrize("shape", ["ragged", "vitb"])
def test_gemm_matches_float64(probe, shape):
    _, data, _ = probe
    x, w, b = (data[f"gemm_{shape}_{part}"].astype(np.float64) for part in "xwb")
    product = x @ w.T + b
    expected = {"none": product, "gelu": gelu_reference(product), "add": data[f"gemm_{shape}_residual"] + product}
    for epilogue, want in expected.items():
        np.testing.assert_allclose(data[f"gemm_{shape}_{epilogue}"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_attention_matches_float64(probe):
    _, data, _ = probe
    np.testing.assert_allclose(data["attention_out"], attention_reference(data["attention_qkv"], 6), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("key", ["tiny_vit", "tiny_deit_distilled", "base_vit"])
def test_forward_matches_transformers(probe, key):
    name, data, models = probe
    model = transformers.AutoModelForImageClassification.from_pretrained(models[key]).eval()
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(data[f"model_{key}_pixels"])).logits.numpy()
    ours = data[f"model_{key}_logits"]
    diff = float(np.abs(ours - theirs).max())
    print(f"{name} {key}: max|logit diff| {diff:.3g}")
    assert ours.dtype == np.float32 and diff <= TOLERANCE


def test_isa_choice_follows_the_cpu_and_the_environment(monkeypatch):
    import llvmlite.binding as llvm

    avx2_cpu = {"avx": True, "avx2": True, "fma": True, "avx512f": False, "sse2": True}
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: avx2_cpu)
    assert isa.host_isa() == "avx2"
    monkeypatch.setenv("VITNP_ISA", "generic")
    assert isa._choose() == ("generic", True)
    monkeypatch.setenv("VITNP_ISA", "avx2")
    assert isa._choose() == ("avx2", False)
    monkeypatch.setenv("VITNP_ISA", "avx512")
    with pytest.raises(isa.IsaError, match="cannot execute avx512"):
        isa._choose()
    monkeypatch.setenv("VITNP_ISA", "sse9")
    with pytest.raises(isa.IsaError, match="not one of"):
        isa._choose()
    assert isa.host_isa({"avx2"}) == "generic"  # AVX2 without FMA runs the portable kernels


def test_unknown_isa_is_one_clear_error(examples_dir):
    env = {**os.environ, "VITNP_ISA": "avx1024"}
    cli = subprocess.run([sys.executable, "-m", "vitnp", "classify", "--model", "bundled:digits",
                          str(examples_dir / "digits")], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr == "vitnp: VITNP_ISA='avx1024' is not one of avx512, avx2, generic (or auto)\n"
    library = subprocess.run([sys.executable, "-c", "import vitnp; vitnp.load('bundled:digits')"], env=env,
                             capture_output=True, text=True)
    assert library.returncode != 0
    assert library.stderr.strip().splitlines()[-1] == (
        "vitnp.kernels.isa.IsaError: VITNP_ISA='avx1024' is not one of avx512, avx2, generic (or auto)")
