"""Reduced precision (int8, bf16): kernel numerics against float64 NumPy references of the exact quantised
math, every kernel variant this machine can execute (other ISAs in subprocesses with VITNP_ISA), accuracy on
the bundled digits model and on full-size ViT-B / DeiT-B shapes against ONNX Runtime's own int8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import vitnp
from vitnp.kernels import isa, qgemm
from vitnp.kernels.qlinear import QLinear

ROOT = Path(__file__).resolve().parent.parent

# -- float64 references of the documented quantisation ----------------------------------------------------


def ref_quantize_rows(x: np.ndarray):
    """Asymmetric uint8 per row, as documented in kernels/qgemm/quantize.py (float32 arithmetic, round half to even)."""
    x = np.asarray(x, np.float32)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[~(scale > 0)] = 1
    inv = (np.float32(1) / scale).astype(np.float32)
    zp = np.clip(np.rint(-lo * inv), 0, 255).astype(np.int64)
    u = np.clip(np.rint(x * inv[:, None]).astype(np.int64) + zp[:, None], 0, 255)
    return u, scale, zp


def ref_quantize_weight(w: np.ndarray):
    """Symmetric int8 per output channel (row of the torch-layout weight)."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[~(scale > 0)] = 1
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int64)
    return q, scale


def ref_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) via torch, back to float64."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).to(torch.float64).numpy()


def ref_gelu(v: np.ndarray) -> np.ndarray:
    return torch.nn.functional.gelu(torch.from_numpy(v.astype(np.float64))).numpy()


def ref_linear(x, w, b, kind, epilogue, out0):
    """float64 result of the exact math kernel `kind` performs."""
    if kind in qgemm.INT8_KINDS:
        u, sa, zp = ref_quantize_rows(x)
        q, sw = ref_quantize_weight(w)
        acc = (u - zp[:, None]) @ q.T  # exact in int64
        value = acc.astype(np.float64) * (sa.astype(np.float64)[:, None] * sw.astype(np.float64)[None, :])
    elif kind == "dpbf16":
        value = ref_bf16(x) @ ref_bf16(w).T
    else:  # widen: bf16 weights, float32 activations
        value = x.astype(np.float64) @ ref_bf16(w).T
    if b is not None:
        value = value + b
    if epilogue == "gelu":
        value = ref_gelu(value)
    elif epilogue == "add":
        value = value + out0
    return value


SHAPES = [(1, 8, 5), (5, 48, 48), (13, 80, 144), (37, 770, 70), (197, 768, 96)]


def check_kind(kind, shapes=SHAPES, epilogues=("none", "gelu", "add"), seed=0):
    """Returns the worst error of `kind` over shapes and epilogues, relative to each result's magnitude."""
    rng = np.random.default_rng(seed)
    pack = qgemm.pack_int8 if kind in qgemm.INT8_KINDS else qgemm.pack_bf16
    worst = 0.0
    for m, k, n in shapes:
        x = rng.standard_normal((m, k)).astype(np.float32) * 2 + 0.3  # asymmetric rows: zero points != 128
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        for with_bias in (False, True):
            b = rng.standard_normal(n).astype(np.float32) if with_bias else None
            weight = pack(w, b, kind)
            for epilogue in epilogues:
                out0 = rng.standard_normal((m, n)).astype(np.float32)
                out = out0.copy()
                qgemm.qgemm(x, weight, out, epilogue)
                ref = ref_linear(x, w, b, kind, epilogue, out0)
                err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
                worst = max(worst, err)
                # bf16 x bf16 products are exact in float32, so every kind is exact up to float32 rounding
                assert err <= 2e-6, f"{kind} {m}x{k}x{n} bias={with_bias} {epilogue}: relative error {err:.3g}"
    return worst


# -- in-process: the kernels this process generates -----------------------------------------------------------


def test_activation_quantisation_matches_reference():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal((6, 77)).astype(np.float32) * 3 + 1,
                        np.zeros((1, 77), np.float32), np.full((1, 77), -2.5, np.float32),
                        np.abs(rng.standard_normal((1, 77))).astype(np.float32)])
    for kind in ("vnni", "madd"):
        a, scale, zp = qgemm.prepare_a(x, kind)
        u, ref_scale, ref_zp = ref_quantize_rows(x)
        rows = x.shape[0]
        np.testing.assert_array_equal(scale[:rows], ref_scale)
        np.testing.assert_array_equal(zp[:rows], ref_zp)
        stored = a[:rows, :77].astype(np.int64)
        np.testing.assert_array_equal(stored, u if kind == "vnni" else u - ref_zp[:, None])
        assert not a[rows:].any() and not a[:, 77:].any()  # padding rows / columns are zero
        # dequantised values lie within half a step of x
        deq = (u - ref_zp[:, None]) * ref_scale[:, None].astype(np.float64)
        assert np.all(np.abs(deq - x) <= 0.5001 * ref_scale[:, None])


def test_weight_quantisation_matches_reference():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((70, 90)) * 0.1).astype(np.float32)
    w[3] = 0  # an all-zero channel
    for kind in sorted(qgemm.supported_kinds() & set(qgemm.INT8_KINDS)):
        packed = qgemm.pack_int8(w, None, kind)
        q, scale = ref_quantize_weight(w)
        np.testing.assert_array_equal(packed.cscale[:70], scale)
        np.testing.assert_array_equal(packed.colsum[:70], q.sum(axis=1))
        np.testing.assert_array_equal(qgemm.unpack(packed), (q * scale[:, None]).astype(np.float32))
    bf = qgemm.pack_bf16(w, None)
    np.testing.assert_array_equal(qgemm.unpack(bf), ref_bf16(w).astype(np.float32))
    # memory: int8 (plus per-channel terms) about a quarter of float32 (half where the madd kind holds the
    # values as int16), bf16 about half
    big = (rng.standard_normal((256, 512)) * 0.1).astype(np.float32)
    int8_share = 0.27 if qgemm.INT8_KIND == "vnni" else 0.52
    assert QLinear(big, None, "int8").report()["weight_bytes"] <= int8_share * big.nbytes
    assert QLinear(big, None, "bf16").report()["weight_bytes"] <= 0.52 * big.nbytes


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_qlinear_column_range_matches_the_full_product_there(precision):
    # Columns are computed independently (same activation rows, same panels): a range is the full call's
    # columns (up to GELU's vector / scalar loop tails: 1 ulp), and nothing outside it is written.
    rng = np.random.default_rng(5)
    n = 4 * qgemm.NR + 5
    layer = QLinear((rng.standard_normal((n, 70)) * 0.1).astype(np.float32),
                    rng.standard_normal(n).astype(np.float32), precision)
    for rows in (1, 197):
        x = rng.standard_normal((rows, 70)).astype(np.float32)
        for epilogue in ("none", "gelu", "add"):
            initial = rng.standard_normal((rows, n)).astype(np.float32)
            full = layer(x, initial.copy(), epilogue)
            for start, stop in [(qgemm.NR, 3 * qgemm.NR), (2 * qgemm.NR, n), (0, qgemm.NR + 3), (0, 0)]:
                out = layer(x, initial.copy(), epilogue, columns=(start, stop))
                np.testing.assert_allclose(out[:, start:stop], full[:, start:stop], rtol=3e-7, atol=1e-7)
                out[:, start:stop] = initial[:, start:stop]
                np.testing.assert_array_equal(out, initial)
    with pytest.raises(ValueError, match="columns"):
        layer(x, initial.copy(), columns=(1, n))


@pytest.mark.parametrize("kind", ["vnni", "madd", "dpbf16", "widen"])
def test_kernel_matches_exact_quantised_math(kind):
    if kind not in qgemm.supported_kinds():
        pytest.skip(f"{kind} needs a CPU feature this machine lacks (ISA {isa.ISA})")
    check_kind(kind)


def kernel_loop_asm(kind):
    """Assembly of the micro-kernel's k loop for `kind`, compiled here without the on-disk cache."""
    from numba import njit

    kernel = qgemm.make_qkernel(qgemm.MR)

    @njit
    def call(a, b, c, rs, rzp, cs, colsum, bias):
        kernel(a, 0, 64, b, 0, c, 0, qgemm.NR, 16, qgemm.MR, qgemm.NR, False, rs, rzp, 0, cs, colsum, bias, 0)

    args = (np.zeros(qgemm.MR * 64 + 64, qgemm.A_DTYPE[kind]), np.zeros(16 * qgemm.NR * 4, qgemm.B_DTYPE[kind]),
            np.zeros(qgemm.MR * qgemm.NR, np.float32), np.zeros(qgemm.MR, np.float32), np.zeros(qgemm.MR, np.int32),
            np.zeros(qgemm.NR, np.float32), np.zeros(qgemm.NR, np.int32), np.zeros(qgemm.NR, np.float32))
    call(*args)
    asm = call.inspect_asm(call.signatures[0]).splitlines()
    marker = {"vnni": "vpdpbusd", "dpbf16": "vdpbf16ps", "widen": "vfmadd", "madd": "madd"}[kind]
    if kind == "madd" and not any("madd" in line for line in asm):
        marker = "vpdpwssd"  # LLVM fuses vpmaddwd + vpaddd into AVX-512 VNNI's word form where it may
    if kind == "widen" and isa.ISA == "generic":
        marker = "mulps"
    hits = [i for i, line in enumerate(asm) if marker in line]
    assert hits, f"no {marker} in the {kind} kernel"
    start = hits[0]
    while not asm[start].startswith(".LBB"):
        start -= 1
    end = hits[-1]
    while not asm[end].strip().startswith("j"):
        end += 1
    return "\n".join(asm[start:end + 1])


LOOP_REGISTERS = {"avx512": "zmm", "avx2": "ymm", "generic": "xmm"}


@pytest.mark.parametrize("kind", ["vnni", "madd", "dpbf16", "widen"])
def test_kernel_loop_assembly(kind):
    """The k loop uses the ISA's vector registers and the intended instruction, and spills nothing."""
    if kind not in qgemm.supported_kinds():
        pytest.skip(f"{kind} needs a CPU feature this machine lacks (ISA {isa.ISA})")
    check_loop(kernel_loop_asm(kind), kind)


def check_loop(loop, kind):
    reg = LOOP_REGISTERS[isa.ISA]
    assert "%rsp" not in loop, f"{kind}: the k loop spills to the stack:\n{loop}"
    assert reg in loop, f"{kind}: no {reg} registers in the k loop:\n{loop}"
    for wider in {"avx512": (), "avx2": ("zmm",), "generic": ("zmm", "ymm")}[isa.ISA]:
        assert wider not in loop, f"{kind}: {wider} registers in a {isa.ISA} build:\n{loop}"


def test_kernel_choice_from_the_environment():
    """VITNP_INT8_KERNEL / VITNP_BF16_KERNEL pick a kind; auto or unset picks the preferred one this CPU runs;
    anything else, or a kind the CPU lacks, is an IsaError naming the variable."""
    from vitnp.kernels.qgemm import kinds

    supported = qgemm.supported_kinds()
    for precision, (variable, preferred, fallback) in kinds.CHOICES.items():
        default = preferred if preferred in supported else fallback
        if kinds.AMX_KINDS[precision] in supported:  # AMX comes first where usable (tests/test_amx.py)
            default = kinds.AMX_KINDS[precision]
        assert kinds.choose(precision, {}) == default
        assert kinds.choose(precision, {variable: " Auto "}) == default
        assert kinds.choose(precision, {variable: fallback.upper()}) == fallback
        if preferred in supported:
            assert kinds.choose(precision, {variable: preferred}) == preferred
        else:
            with pytest.raises(isa.IsaError, match=f"{variable}={preferred}: not available"):
                kinds.choose(precision, {variable: preferred})
        with pytest.raises(isa.IsaError, match=f"{variable}='int4' is not one of {preferred}, {fallback}"):
            kinds.choose(precision, {variable: "int4"})
    assert (qgemm.KIND["int8"], qgemm.KIND["bf16"]) == (qgemm.INT8_KIND, qgemm.BF16_KIND)


def test_int8_kernels_agree_bit_for_bit():
    """vnni and madd compute the same integer sums and the same epilogue: identical float32 results."""
    if "vnni" not in qgemm.supported_kinds():
        pytest.skip("no AVX-512 VNNI here")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((29, 300)).astype(np.float32)
    w = (rng.standard_normal((75, 300)) * 0.05).astype(np.float32)
    outs = []
    for kind in ("vnni", "madd"):
        out = np.empty((29, 75), np.float32)
        qgemm.qgemm(x, qgemm.pack_int8(w, None, kind), out)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_kernels_for_is_what_a_reduced_precision_call_compiles(precision):
    """qgemm.kernels_for(precision), the dispatchers kernels/warmup.py checks for compiled code."""
    rows = qgemm.SERIAL_PREPARE_MAX // 24 + 16  # activations prepared in parallel
    layer = QLinear(np.ones((16, 24), np.float32), None, precision=precision)
    layer(np.ones((rows, 24), np.float32), np.empty((rows, 16), np.float32))
    assert all(dispatcher.signatures for dispatcher in qgemm.kernels_for(precision))
    with pytest.raises(ValueError, match="int8 or bf16"):
        qgemm.kernels_for("fp32")


def test_qlinear_checks_its_arguments():
    layer = QLinear(np.ones((4, 6), np.float32), np.zeros(4, np.float32), "int8")
    with pytest.raises(ValueError, match="x must be"):
        layer(np.ones((2, 5), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="epilogue"):
        layer(np.ones((2, 6), np.float32), np.empty((2, 4), np.float32), epilogue="relu")
    with pytest.raises(ValueError, match="precision"):
        QLinear(np.ones((4, 6), np.float32), None, "int4")


# -- other ISAs and kernel variants, each in its own process ----------------------------------------------------

VARIANT_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import vitnp
    from vitnp.kernels import isa, qgemm
    import test_precision as t
    report = {{"isa": isa.ISA, "int8": qgemm.INT8_KIND, "bf16": qgemm.BF16_KIND}}
    for kind in (qgemm.INT8_KIND, qgemm.BF16_KIND):
        report[kind] = t.check_kind(kind, shapes=t.SHAPES[:4])
        loop = t.kernel_loop_asm(kind)
        t.check_loop(loop, kind)
        report[kind + "_loop"] = loop
    clf = vitnp.load({model!r}, precision="int8", backend="numba")  # the int8 kernels, never float32
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    report["logits_int8"] = clf.logits(x).tolist()
    print("REPORT" + json.dumps(report))
""")


def _variants():
    host = isa.host_isa()
    out = []
    if host == "avx512":
        out.append(({"VITNP_INT8_KERNEL": "madd", "VITNP_BF16_KERNEL": "widen"}, "avx512", "madd", "widen"))
    if host in ("avx512", "avx2"):
        out.append(({"VITNP_ISA": "avx2"}, "avx2", "madd", "widen"))
    out.append(({"VITNP_ISA": "generic"}, "generic", "madd", "widen"))
    return out


@pytest.mark.parametrize("env,expect_isa,expect_int8,expect_bf16", _variants(),
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_kernel_variants_in_subprocess(env, expect_isa, expect_int8, expect_bf16, tiny_vit):
    """Every variant this CPU can execute: forced AVX2 / SSE2 code generation, and AVX-512 without VNNI/BF16."""
    script = VARIANT_SCRIPT.format(tests=str(ROOT / "tests"), model=str(tiny_vit))
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("VITNP_ISA", "VITNP_INT8", "VITNP_BF16",
                                                                         "NUMBA_CPU"))}
    child_env.update(env)
    proc = subprocess.run([sys.executable, "-c", script], env=child_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert (report["isa"], report["int8"], report["bf16"]) == (expect_isa, expect_int8, expect_bf16)
    if expect_isa != "avx512":  # forced AVX2 / SSE2 code: the plain vpmaddwd (no VNNI word form), no zmm
        assert "pmaddwd" in report["madd_loop"] and "zmm" not in report["madd_loop"]
        assert "zmm" not in report["widen_loop"]
    # the integer math is the same everywhere; only the float32 parts (LayerNorm, attention) differ by ISA
    here = vitnp.load(tiny_vit, precision="int8", backend="numba").logits(
        np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    theirs = np.array(report["logits_int8"], np.float32)
    assert np.abs(theirs - here).max() <= 1e-3 * max(1.0, np.abs(here).max())


# -- never slower than float32 (backend "auto") ---------------------------------------------------------------


def reference_weight(w, precision):
    """The weight a reduced-precision layer multiplies by, from the documented quantisation (float64)."""
    if precision == "bf16":
        return ref_bf16(w)
    q, scale = ref_quantize_weight(w)
    return q.astype(np.float64) * scale[:, None]


def scripted_paths(monkeypatch, winner):
    """Replace the timing of reduced kernel against float32 by rounds in which `winner` ("fp32" or "reduced") is
    twice as fast (short enough that a float32 win needs no confirming round): the rest of the chooser is real."""
    from vitnp.kernels import autotune

    def path_round(layer, key):
        fast, slow = [0.0002] * 3, [0.0004] * 3
        reduced, float32 = (slow, fast) if winner == "fp32" else (fast, slow)
        return lambda: {layer.precision: list(reduced), "fp32": list(float32)}
    monkeypatch.setattr(autotune, "path_round", path_round)


def no_timing(monkeypatch):
    from vitnp.kernels import autotune

    def path_round(layer, key):
        raise AssertionError(f"timed {key} although the store has its decision")
    monkeypatch.setattr(autotune, "path_round", path_round)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_reduced_kernel_slower_than_float32_is_replaced_and_reported(precision, tmp_path, monkeypatch):
    from vitnp.kernels import autotune

    monkeypatch.setenv("VITNP_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(5)
    rows, k, n = 29, 72, 3 * 64 + 16  # a shape no other test uses: nothing decided in this process yet
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    kernel_out = QLinear(w, b, precision, backend="numba")(x, np.empty((rows, n), np.float32))

    scripted_paths(monkeypatch, "fp32")
    layer = QLinear(w, b, precision, backend="auto")
    kind = layer.kind
    assert layer.path == precision, "nothing is decided before the first call"
    out = layer(x, np.empty((rows, n), np.float32))
    assert layer.path == "fp32" and layer.packed is None, "one weight held: the float32 one"
    # the float32 path multiplies by the same reduced weight, with float32 activations: no less accurate
    np.testing.assert_allclose(out, x.astype(np.float64) @ reference_weight(w, precision).T + b, rtol=1e-5,
                               atol=1e-5)
    assert np.abs(out - exact).max() <= np.abs(kernel_out - exact).max()
    report = layer.report()
    assert report["path"] == "fp32" and report["backend"] == "auto" and report["weight_bytes"] >= 4 * n * k
    assert report["path_choices"][rows] == {"path": "fp32", f"{precision}_ms": 0.4, "fp32_ms": 0.2}
    stored = json.loads((tmp_path / "gemm-auto.json").read_text())
    (machine, shapes), = stored.items()
    assert shapes[f"{kind}:{rows}x{k}x{n}"] == {"backend": "fp32", "seconds": {precision: 0.0004, "fp32": 0.0002}}

    # A later process takes the stored decision without timing; a column range still works after the move.
    monkeypatch.delitem(autotune._path_choice, (kind, rows, k, n))
    no_timing(monkeypatch)
    later = QLinear(w, b, precision, backend="auto")
    partial = np.zeros((rows, n), np.float32)
    later(x, partial, columns=(later.column_step, n))
    assert later.path == "fp32"
    # (the float32 backend may differ from the first layer's, and BLAS rounds a column slice its own way)
    np.testing.assert_allclose(partial[:, later.column_step:], out[:, later.column_step:], rtol=1e-5, atol=1e-5)
    assert not partial[:, :later.column_step].any()

    # An explicit backend gets exactly the reduced kernel it asked for.
    fixed = QLinear(w, b, precision, backend="numba")
    np.testing.assert_array_equal(fixed(x, np.empty((rows, n), np.float32)), kernel_out)
    assert fixed.path == precision and "path_choices" not in fixed.report()


def test_a_reduced_kernel_that_wins_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("VITNP_CACHE_DIR", str(tmp_path))
    scripted_paths(monkeypatch, "reduced")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((80, 40)).astype(np.float32)
    x = rng.standard_normal((31, 40)).astype(np.float32)
    layer = QLinear(w, None, "bf16", backend="auto")
    out = layer(x, np.empty((31, 80), np.float32))
    np.testing.assert_array_equal(out, QLinear(w, None, "bf16")(x, np.empty((31, 80), np.float32)))
    assert layer.path == "bf16" and layer.report()["path_choices"][31]["path"] == "bf16"
    stored = json.loads((tmp_path / "gemm-auto.json").read_text())
    assert next(iter(stored.values()))[f"{layer.kind}:31x40x80"]["backend"] == "bf16"


@pytest.mark.parametrize("reduced_ms,expected", [(0.80, "bf16"), (0.95, "fp32"), (1.0, "fp32"), (1.2, "fp32")])
def test_a_reduced_kernel_must_win_clearly(reduced_ms, expected, tmp_path, monkeypatch):
    """Races within REDUCED_MIN_GAIN go to float32 (a near tie in a race is no evidence the kernel pays), and a
    decision stored under an older rule is judged again by its stored times."""
    from vitnp.kernels import autotune, autotune_store

    monkeypatch.setenv("VITNP_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(8)
    rows, k, n = 23, 56, 64 + 16 * int(reduced_ms * 20)  # a shape of its own per case: nothing decided yet
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)

    def path_round(layer, key):
        return lambda: {"bf16": [reduced_ms * 1e-4] * 3, "fp32": [1e-4] * 3}
    monkeypatch.setattr(autotune, "path_round", path_round)
    layer = QLinear(w, None, "bf16", backend="auto")
    layer(x, np.empty((rows, n), np.float32))
    assert layer.path == expected
    machine = autotune.machine_key()
    assert autotune_store.load(machine, (layer.kind, rows, k, n), ("bf16", "fp32"))[0] == expected

    # stored as a bf16 win (the rule before the bar): a later process follows the stored times, not the label
    autotune_store.save(machine, (layer.kind, rows, k, n), "bf16", {"bf16": reduced_ms * 1e-4, "fp32": 1e-4})
    monkeypatch.delitem(autotune._path_choice, (layer.kind, rows, k, n))
    no_timing(monkeypatch)
    later = QLinear(w, None, "bf16", backend="auto")
    later(x, np.empty((rows, n), np.float32))
    assert later.path == expected


def test_the_measured_faster_path_is_chosen(tmp_path, monkeypatch):
    """Real timing (no script): the stored choice is the faster of the two measured, and the layer follows it."""
    from vitnp.kernels import autotune

    monkeypatch.setenv("VITNP_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(7)
    rows, k, n = 97, 384, 512
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    store = tmp_path / "gemm-auto.json"
    for _ in range(5):
        layer = QLinear(w, None, "bf16", backend="auto")
        out = layer(x, np.empty((rows, n), np.float32))
        if store.exists() and any(":" in shape for shape in next(iter(json.loads(store.read_text()).values()))):
            break
        monkeypatch.delitem(autotune._path_choice, (layer.kind, rows, k, n))  # the rounds disagreed: time again
    shapes = next(iter(json.loads(store.read_text()).values()))
    timed = shapes[f"{layer.kind}:{rows}x{k}x{n}"]
    assert set(timed["seconds"]) == {"bf16", "fp32"}
    bf16_clearly_faster = timed["seconds"]["bf16"] < (1 - autotune.REDUCED_MIN_GAIN) * timed["seconds"]["fp32"]
    assert timed["backend"] == ("bf16" if bf16_clearly_faster else "fp32") == layer.path
    np.testing.assert_allclose(out, x @ ref_bf16(w).T, rtol=2e-2, atol=2e-2)


def test_a_model_reports_the_paths_its_layers_took(tiny_deit_distilled, tmp_path, monkeypatch):
    monkeypatch.setenv("VITNP_CACHE_DIR", str(tmp_path))
    from vitnp.kernels import autotune

    monkeypatch.setattr(autotune, "_path_choice", {})  # forget what earlier tests decided for these shapes
    monkeypatch.setattr(autotune, "_path_timings", {})
    scripted_paths(monkeypatch, "fp32")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    guarded = vitnp.load(tiny_deit_distilled, precision="bf16")
    fixed = vitnp.load(tiny_deit_distilled, precision="bf16", backend="numba")
    reference = vitnp.load(tiny_deit_distilled).logits(x)
    assert guarded.backend_report()["paths"]["fc1"] == {"bf16": 2}, "nothing decided before the first call"
    logits = guarded.logits(x)
    report = guarded.backend_report()
    blocks = guarded.config.num_hidden_layers
    assert report["paths"] == {"patch_embed": {"fp32": 1}, "head": {"fp32": 2},
                               **{role: {"fp32": blocks} for role in ("qkv", "attn_out", "fc1", "fc2")}}
    assert report["layers"]["fc1"]["path"] == "fp32" and report["layers"]["fc1"]["path_choices"]
    fixed_logits = fixed.logits(x)
    assert fixed.backend_report()["paths"]["fc1"] == {"bf16": blocks}
    assert np.abs(logits - reference).max() <= np.abs(fixed_logits - reference).max()


# -- the public API -------------------------------------------------------------------------------------------


def test_load_rejects_unknown_precision():
    with pytest.raises(vitnp.ParameterError, match="precision must be one of fp32, bf16, int8"):
        vitnp.load("bundled:digits", precision="int4")


def test_cli_rejects_unknown_precision():
    proc = subprocess.run([sys.executable, "-m", "vitnp", "classify", str(ROOT / "examples" / "cats.jpg"),
                           "--model", "bundled:digits", "--precision", "int4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--precision" in proc.stderr and "int8" in proc.stderr


def test_cli_classifies_in_int8(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitnp", "classify", str(ROOT / "examples" / "digits"),
                           "--model", "bundled:digits", "--precision", "int8", "--top-k", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 10
    for r in records:
        assert r["predictions"][0]["label"] == Path(r["path"]).name.split("-")[1]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_backend_report_says_what_runs(precision, tiny_deit_distilled):
    clf = vitnp.load(tiny_deit_distilled, precision=precision)
    report = clf.backend_report()
    assert report["precision"] == precision
    kind = qgemm.INT8_KIND if precision == "int8" else qgemm.BF16_KIND
    for name in ("patch_embed", "qkv", "attn_out", "fc1", "fc2"):
        assert report["layers"][name]["precision"] == precision
        assert report["layers"][name]["kernel"] == kind
    if precision == "int8":  # int8 quantises the heads too (like ORT's quantize_dynamic), bf16 keeps them float32
        assert report["layers"]["head"]["precision"] == "int8"
        assert all(isinstance(h, QLinear) for h in clf.weights.heads)
    else:
        assert "precision" not in report["layers"]["head"]
    assert precision in repr(clf)
    assert vitnp.load(tiny_deit_distilled).backend_report()["precision"] == "fp32"


# -- accuracy -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_digits():
    from test_digits import _training_script

    script = _training_script()
    images, labels, _ = script.heldout_split()
    return [script.render_digit(image) for image in images], np.asarray(labels)


def test_digits_accuracy_int8_and_bf16(heldout_digits):
    images, labels = heldout_digits
    assert len(images) == 360
    pixels = vitnp.load("bundled:digits").preprocess(images)
    results = {}
    for precision in ("fp32", "int8", "bf16"):
        clf = vitnp.load("bundled:digits", precision=precision)
        results[precision] = np.argmax(clf.logits(pixels), axis=1)
    acc = {p: float((pred == labels).mean()) for p, pred in results.items()}
    for precision in ("int8", "bf16"):
        agreement = float((results[precision] == results["fp32"]).mean())
        print(f"digits {precision}: accuracy {acc[precision]:.4f} (fp32 {acc['fp32']:.4f}), "
              f"top-1 agreement with fp32 {agreement:.4f}")
        assert abs(acc[precision] - acc["fp32"]) <= 0.005
        assert agreement >= 0.99


def photo_pixels(clf, examples_dir):
    """The two real photos and their mirror images (more inputs for the same photos)."""
    from PIL import Image, ImageOps

    photos = [Image.open(examples_dir / name).convert("RGB") for name in ("cats.jpg", "coffee.jpg")]
    return clf.preprocess(photos + [ImageOps.mirror(p) for p in photos])


def error_figures(logits, reference):
    """(top-1 agreement, max |logit diff| / logit range) against the fp32 reference."""
    agreement = float((np.argmax(logits, 1) == np.argmax(reference, 1)).mean())
    spread = float((reference.max(axis=1) - reference.min(axis=1)).max())
    return agreement, float(np.abs(logits - reference).max()) / spread


def ort_int8_logits(model_dir: Path, pixels: np.ndarray, workdir: Path) -> np.ndarray:
    """ONNX Runtime quantize_dynamic(per_channel=True, QInt8 weights) of the same model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ort_quant
    import transformers

    model = transformers.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    path = workdir / "model.onnx"
    example = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["pixel_values"],
                      output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    del model
    session = ort_quant.session(ort_quant.export_int8(path)["path"], threads=2)
    return np.concatenate([session.run(["logits"], {"pixel_values": pixels[i:i + 1]})[0]
                           for i in range(len(pixels))])


@pytest.mark.parametrize("fixture", ["base_vit", "base_deit_distilled"])
def test_base_models_int8_error_no_larger_than_onnxruntime_int8(request, fixture, examples_dir, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    fp32 = vitnp.load(model_dir)
    pixels = photo_pixels(fp32, examples_dir)
    reference = fp32.logits(pixels)
    del fp32
    figures = {}
    for precision in ("int8", "bf16"):
        figures[f"vitnp-{precision}"] = error_figures(vitnp.load(model_dir, precision=precision).logits(pixels),
                                                      reference)
    figures["ort-int8"] = error_figures(ort_int8_logits(model_dir, pixels, tmp_path), reference)
    for name, (agreement, rel) in figures.items():
        print(f"{fixture} {name}: top-1 agreement {agreement:.2f}, max|logit diff|/logit range {rel:.4f}")
    assert figures["vitnp-int8"][1] <= figures["ort-int8"][1]
    assert figures["vitnp-int8"][0] >= figures["ort-int8"][0]
    assert figures["vitnp-bf16"][1] <= figures["vitnp-int8"][1]
    assert figures["vitnp-bf16"][0] == 1.0


def test_server_loads_models_in_the_requested_precision():
    from vitnp.cli import parse_command
    from vitnp.options import ServingOptions
    from vitnp.registry import ModelRegistry
    from vitnp.startup import name_models

    options = parse_command(["serve", "--model", "bundled:digits", "--precision", "int8"])
    assert options.engine.precision == "int8"
    assert parse_command(["serve", "--model", "bundled:digits"]).engine.precision == "fp32"
    registry = ModelRegistry(ServingOptions(warmup=False), options.engine)
    try:
        worker = registry.load(name_models(options.models)[0])
        assert worker.classifier.precision == "int8"
        assert worker.classifier.backend_report()["layers"]["fc1"]["precision"] == "int8"
    finally:
        registry.close()
