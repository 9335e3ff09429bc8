"""A first run: the kernels compile into the user cache directory (never into the installed package), in helper
processes that really run, and the first forward pass after compile_kernels compiles nothing more; with no
writable cache directory vitnp still classifies and says so once; `vitnp compile` fills the cache ahead of time.

Each test runs a fresh interpreter with its own empty VITNP_CACHE_DIR (a cold cache).  The first runs from a working
directory holding a decoy `vitnp/` package without kernels, as a source checkout is for a non-editable install:
a helper process that imports vitnp from the working directory instead of the way its parent did fails there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitnp.kernels

PACKAGE_DIR = Path(vitnp.kernels.__file__).resolve().parent

# Compiles cold (with helpers), then loads the model with seeded "auto" decisions that mix the backends across
# batch sizes (BLAS for batch 1, Numba for batch 3: a layer lands in BLAS's (K, N) layout, then runs Numba), and
# reports every kernel dispatcher's compiled signatures before and after two forward passes.
FIRST_RUN = r"""
import gc, json, resource, sys
import numpy as np
from numba.core.registry import CPUDispatcher
import vitnp
from vitnp.classifier import compile_kernels
from vitnp.options import EngineOptions
from vitnp.config import load_config
from vitnp.kernels import autotune, autotune_store

model = sys.argv[1]
options = EngineOptions()
compiled = compile_kernels(options, progress=False)
helper_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])

def signatures():
    return {f"{d.py_func.__module__}.{d.py_func.__qualname__}": sorted(map(str, d.overloads))
            for d in gc.get_objects() if isinstance(d, CPUDispatcher) and d.py_func.__module__.startswith("vitnp.")}

cfg = load_config(f"{model}/config.json")
T, P, npre = cfg.seq_len, cfg.num_patches, cfg.num_prefix_tokens
D, I = cfg.hidden_size, cfg.intermediate_size
shapes = {(D, 3 * D), (D, D), (D, I), (I, D), (3 * cfg.patch_size ** 2, D), (D, cfg.num_labels)}
machine = autotune.machine_key()
for batch, backend in ((1, "blas"), (3, "numba")):
    for rows in (batch * T, batch * P, batch * npre, batch):
        for k, n in shapes:
            autotune_store.save(machine, (rows, k, n), backend, {"numba": 1.0, "blas": 1.0})

before = signatures()
clf = vitnp.load(model, options=options, progress=False)
clf.classify(np.zeros((40, 40, 3), np.uint8))
clf.classify([np.zeros((40, 40, 3), np.uint8)] * 3)
after = signatures()
new = {name: sorted(set(sigs) - set(before.get(name, ()))) for name, sigs in after.items()}
layouts = sorted({layer.weight_layout for block in clf.weights.layers for layer in (block.qkv, block.fc1)})
print(json.dumps({"compiled": sorted(compiled), "helper_cpu": helper_cpu, "layouts": layouts,
                  "new": {name: sigs for name, sigs in new.items() if sigs}}))
"""


def kernel_cache_files() -> set[Path]:
    return {p for p in PACKAGE_DIR.rglob("*") if p.suffix in (".nbi", ".nbc")}


@pytest.fixture
def decoy_checkout(tmp_path):
    """A working directory with a `vitnp` package that is not vitnp."""
    (tmp_path / "checkout" / "vitnp").mkdir(parents=True)
    (tmp_path / "checkout" / "vitnp" / "__init__.py").write_text("")
    return tmp_path / "checkout"


def run_script(tmp_path, source, args, env, cwd):
    script = tmp_path / "script" / "run.py"  # a file, so the script's directory (not cwd) leads sys.path
    script.parent.mkdir(exist_ok=True)
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_first_forward_pass_compiles_nothing_after_compile_kernels(tiny_vit, tmp_path, decoy_checkout):
    cache = tmp_path / "cache"
    env = {**os.environ, "VITNP_CACHE_DIR": str(cache)}
    before = kernel_cache_files()
    done = run_script(tmp_path, FIRST_RUN, [tiny_vit], env, decoy_checkout)
    assert done.returncode == 0, done.stderr
    assert "helper process failed" not in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["compiled"]) == {"gemm", "attention", "layernorm", "blas_epilogues"}
    assert result["helper_cpu"] > 0.5, "no helper process compiled anything"
    assert "k_by_n" in result["layouts"], "the seeded decisions did not put a layer in BLAS's layout"
    assert result["new"] == {}, "the forward pass compiled kernels that compile_kernels did not"
    # Everything compiled went to the cache directory, nothing into the installed package.
    assert kernel_cache_files() == before
    assert list((cache / "numba").rglob("*.nbi")) and list((cache / "numba").rglob("*.nbc"))


def test_no_writable_cache_directory_still_classifies_and_warns_once(tmp_path, examples_dir, decoy_checkout):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**os.environ, "VITNP_CACHE_DIR": str(blocker / "cache")}  # below a regular file: never creatable
    before = kernel_cache_files()
    done = subprocess.run([sys.executable, "-m", "vitnp", "classify", "--model", "bundled:digits",
                           str(examples_dir / "digits" / "digit-3-idx0705.png")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[-1] == "3"  # the top label of a "3"
    assert done.stderr.count("no writable kernel cache") == 1, done.stderr
    assert "helper process failed" not in done.stderr
    assert kernel_cache_files() == before
    assert not (blocker.parent / "cache").exists()


def test_compile_command_fills_the_cache_then_finds_it_full(tmp_path):
    env = {**os.environ, "VITNP_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "vitnp", "compile", "--backend", "numba"]
    first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert str(tmp_path / "cache" / "numba") in lines[-1]
    compiled = {line.split()[0] for line in lines if "compiled in" in line}
    assert compiled == {"gemm", "attention", "layernorm"}
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "compiled in" not in again.stdout and "nothing to compile" in again.stdout


def test_compile_command_rejects_an_isa_this_cpu_cannot_run(tmp_path):
    from vitnp.kernels import isa

    wider = [name for name in isa.ISAS if isa.ISAS.index(name) < isa.ISAS.index(isa.host_isa())]
    if not wider:
        pytest.skip("this CPU runs the widest ISA")
    done = subprocess.run([sys.executable, "-m", "vitnp", "compile", "--isa", wider[-1]], cwd=tmp_path,
                          env={**os.environ, "VITNP_CACHE_DIR": str(tmp_path / "cache")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "cannot execute" in done.stderr and "Traceback" not in done.stderr
