"""The first-run compile (vitnp.kernels.warmup) covers what the forward passes run.

Every warm-up group is compiled into an empty kernel cache by `python -m vitnp.kernels.warmup`, as the helper
processes of a first run do. A new process must then find no group cold (else every later run would say it
is compiling for the first time and start helper processes again), and classifying with every backend and
precision must find each vitnp kernel in the cache: no cache miss, nothing left to compile on a user's first
request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = r"""
import gc, json, sys
import numpy as np
import vitnp
from vitnp.kernels import warmup
from numba.core.registry import CPUDispatcher

cold = warmup.cold_groups()
for backend, precision in [("numba", "fp32"), ("auto", "fp32"), ("blas", "fp32"), ("auto", "int8"),
                           ("numba", "bf16")]:
    clf = vitnp.load(sys.argv[1], backend=backend, precision=precision, progress=False)
    clf.classify(np.zeros((40, 40, 3), np.uint8))
    clf.classify([np.zeros((40, 40, 3), np.uint8)] * 3)
misses = {f"{d.py_func.__module__}.{d.py_func.__qualname__}": sum(d.stats.cache_misses.values())
          for d in gc.get_objects() if isinstance(d, CPUDispatcher) and d.py_func.__module__.startswith("vitnp.")}
print(json.dumps({"cold": cold, "misses": {k: v for k, v in misses.items() if v}}))
"""


def test_warmup_groups_cover_every_kernel_a_forward_pass_runs(tiny_vit, tmp_path):
    from vitnp.kernels import warmup

    env = {**os.environ, "VITNP_CACHE_DIR": str(tmp_path / "vitnp")}
    compiled = subprocess.run([sys.executable, "-m", "vitnp.kernels.warmup", "--threads", "2", *warmup.GROUPS],
                              env=env, capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout.count("compiled ") == len(warmup.GROUPS)
    checked = subprocess.run([sys.executable, "-c", CHECK, str(tiny_vit)], env=env, capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    assert result["cold"] == [], "a group stays cold after its warm-up: every run would compile 'for the first time'"
    assert result["misses"] == {}, "kernels the warm-up groups do not compile"


def test_kernel_groups_cover_the_layers_a_model_is_built_with(tiny_deit_distilled):
    """The groups compile_kernels warms come from the same rule that builds the layers: every layer of a loaded
    model runs a GEMM in one of them, for every backend and precision."""
    import vitnp
    from vitnp.kernels import Linear, warmup
    from vitnp.layers import kernel_groups
    from vitnp.options import EngineOptions

    for backend, precision in [("numba", "fp32"), ("auto", "fp32"), ("blas", "fp32"), ("blas", "bf16"),
                               ("auto", "int8"), ("numba", "int8")]:
        options = EngineOptions(backend=backend, precision=precision)
        groups = kernel_groups(options)
        assert set(groups) <= set(warmup.GROUPS) and {"attention", "layernorm"} <= set(groups)
        w = vitnp.load(tiny_deit_distilled, options=options, progress=False).weights
        layers = [w.patch_embed, *w.heads, *(getattr(block, name) for block in w.layers
                                             for name in ("qkv", "attn_out", "fc1", "fc2"))]
        needed = set()
        for layer in layers:
            needed.update(warmup.LINEAR_GROUPS[layer.backend] if isinstance(layer, Linear)
                          else warmup.QLINEAR_GROUPS[layer.precision])
            if not isinstance(layer, Linear) and layer.backend == "auto":  # it times the float32 GEMM too
                needed.update(warmup.LINEAR_GROUPS["auto"])
        assert needed == set(groups) - {"attention", "layernorm"}, (backend, precision)
