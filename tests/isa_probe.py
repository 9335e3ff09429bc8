"""Run in a subprocess with VITNP_ISA set (tests/test_isa.py): exercise the kernels of one ISA variant.

Writes an .npz with what it computed; the test compares it with float64 NumPy and transformers in its own
process, so nothing here decides pass or fail except the ISA bookkeeping it reports.
"""
import json
import re
import sys

import numpy as np


def micro_kernel_loop_asm(gemm):
    """The assembly of the GEMM micro-kernel's k loop (the innermost loop full of FMAs)."""
    from numba import njit

    @njit
    def call(a, b, c, kc):
        gemm._micro(a, 0, 1, gemm.MR, b, 0, gemm.NR, c, 0, gemm.NR, kc, False, gemm.MR, gemm.NR, 0, 3)

    a = np.zeros(gemm.MR * 8, np.float32)
    b = np.zeros(gemm.NR * 8, np.float32)
    call(a, b, np.zeros(gemm.MR * gemm.NR, np.float32), 8)
    lines = next(iter(call.inspect_asm().values())).splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\.?\w+:", line.strip())}
    loops = []
    for i, line in enumerate(lines):
        jump = re.match(r"\s*j\w+\s+(\.?\w+)\s*$", line)
        if jump and jump.group(1) in labels and labels[jump.group(1)] < i:
            body = [x.split("#")[0].strip() for x in lines[labels[jump.group(1)]:i + 1]]
            loops.append([x for x in body if x])
    return max(loops, key=lambda body: sum("fmadd" in x or "mulps" in x for x in body))


def main(out_path, model_dirs_json):
    from vitnp import kernels
    from vitnp.kernels import gemm, isa

    import vitnp

    rng = np.random.default_rng(0)
    results = {"isa": np.array(isa.ISA), "describe": np.array(json.dumps(isa.describe())),
               "loop_asm": np.array("\n".join(micro_kernel_loop_asm(gemm)))}
    # GEMM with every epilogue, on ragged shapes and on a ViT-B shape (M = 197 tokens).
    for name, (m, k, n) in {"ragged": (29, 70, 45), "vitb": (197, 768, 768)}.items():
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        bias = rng.standard_normal(n, dtype=np.float32)
        residual = rng.standard_normal((m, n), dtype=np.float32)
        layer = kernels.Linear(w, bias, backend="numba")
        results[f"gemm_{name}_x"], results[f"gemm_{name}_w"], results[f"gemm_{name}_b"] = x, w, bias
        results[f"gemm_{name}_residual"] = residual
        for epilogue in ("none", "gelu", "add"):
            out = residual.copy() if epilogue == "add" else np.empty((m, n), np.float32)
            results[f"gemm_{name}_{epilogue}"] = layer(x, out, epilogue)
    qkv = rng.standard_normal((2, 197, 3 * 96), dtype=np.float32) * 2
    out = np.empty((2, 197, 96), np.float32)
    results["attention_qkv"], results["attention_out"] = qkv, kernels.attention(qkv, out, 6)
    for key, model_dir in json.loads(model_dirs_json).items():
        clf = vitnp.load(model_dir, progress=False)
        pixels = rng.standard_normal((2, 3, clf.config.image_size, clf.config.image_size), dtype=np.float32)
        results[f"model_{key}_pixels"], results[f"model_{key}_logits"] = pixels, clf.logits(pixels)
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
