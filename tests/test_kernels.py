"""vitnp.kernels against float64 NumPy / math.erf references, on odd shapes and every code path."""

import math
import subprocess
import sys

import numpy as np
import pytest

from references import attention_reference, gelu_reference
from vitnp import kernels
from vitnp.kernels import gemm as gemm_module

RNG_SEED = 1234


def rng():
    return np.random.default_rng(RNG_SEED)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    import numba

    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("machine has fewer threads")
    previous = numba.get_num_threads()
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# import


def test_import_compiles_nothing():
    code = (
        "import numba, vitnp.kernels as k\n"
        "from vitnp.kernels import elementwise, gemm, mha, qgemm\n"
        "from vitnp.kernels.qgemm import codegen, driver, pack, quantize\n"
        "compiled = [n for m in (elementwise, gemm, mha, codegen, driver, pack, quantize)\n"
        "            for n, f in vars(m).items()\n"
        "            if isinstance(f, numba.core.dispatcher.Dispatcher) and f.signatures]\n"
        "print(compiled)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# erf / exp / GELU


def test_erf_max_error_against_math_erf():
    # Our own dense grid through the float32 kernel, compared with math.erf in float64.
    grid = np.linspace(-7.0, 7.0, 200_001, dtype=np.float32)
    approx = kernels.erf(grid).astype(np.float64)
    exact = np.array([math.erf(v) for v in grid.astype(np.float64).tolist()])
    err_f32 = float(np.max(np.abs(approx - exact)))
    err_f64 = kernels.erf_max_error()
    print(f"\nerf max abs error vs math.erf: float64 path {err_f64:.3g}, float32 output {err_f32:.3g}")
    assert err_f64 <= 1e-7
    assert err_f32 <= 1e-7  # float32 output adds at most half an ulp (3e-8) near |erf| = 1
    assert kernels.erf(np.array([0.0, 50.0, -50.0], np.float32)).tolist() == [0.0, 1.0, -1.0]


def test_exp_relative_error():
    x = np.linspace(-80.0, 80.0, 100_001, dtype=np.float32)
    approx = kernels.exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(approx / exact - 1.0)) < 1e-6


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 197, 37), (5, 3072)])
def test_gelu_in_place_matches_float64(shape):
    x = (rng().standard_normal(shape) * 4).astype(np.float32)
    expected = gelu_reference(x)
    y = x.copy()
    result = kernels.gelu_erf(y)
    assert result is y
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


def test_gelu_extremes():
    x = np.array([-100.0, -10.0, -5.0, 0.0, 5.0, 10.0, 100.0, 1e-30], np.float32)
    np.testing.assert_allclose(kernels.gelu_erf(x.copy()), gelu_reference(x), rtol=1e-6, atol=1e-7)


def test_gelu_max_error_against_math_erfc():
    # The float32 kernel over a dense grid against x*erfc(-x/sqrt2)/2 in float64, scaled by max(1, |x|):
    # float32 rounding alone is 6e-8 there, and the error of erfc's fit is 6e-9 relative.
    err = kernels.gelu_max_error()
    print(f"\nGELU max error vs math.erfc, scaled by max(1, |x|): {err:.3g}")
    assert err <= 2e-7
    # The negative tail keeps relative precision: GELU(-5) = -7.2e-6, far below the absolute tolerance.
    x = np.array([-5.0, -6.0, -7.0], np.float32)
    np.testing.assert_allclose(kernels.gelu_erf(x.copy()), gelu_reference(x), rtol=1e-5)


def test_gelu_rejects_bad_arrays():
    with pytest.raises(TypeError):
        kernels.gelu_erf(np.zeros(4, np.float64))
    with pytest.raises(TypeError):
        kernels.gelu_erf(np.zeros((4, 4), np.float32)[:, ::2])


# --------------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_reference(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("rows,width", [(1, 1), (1, 768), (13, 37), (197, 768), (9 * 198, 64)])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_layernorm(rows, width, in_place, threads):
    r = rng()
    x = (r.standard_normal((rows, width)) * 3 + 5).astype(np.float32)
    gamma = r.standard_normal(width).astype(np.float32)
    beta = r.standard_normal(width).astype(np.float32)
    expected = layernorm_reference(x, gamma, beta, 1e-6)
    out = x if in_place else np.empty_like(x)
    kernels.layernorm(x, gamma, beta, 1e-6, out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


def test_layernorm_large_offset_is_stable():
    # A two-pass variance: a large common offset must not destroy the small spread.
    r = rng()
    x = (r.standard_normal((4, 768)) * 0.01 + 1000.0).astype(np.float32)
    gamma = np.ones(768, np.float32)
    beta = np.zeros(768, np.float32)
    out = np.empty_like(x)
    kernels.layernorm(x, gamma, beta, 1e-12, out)
    np.testing.assert_allclose(out, layernorm_reference(x, gamma, beta, 1e-12), atol=1e-4)


def test_non_finite_rows_pass_through_the_dividing_kernels_and_leave_the_other_rows_alone():
    """inf and NaN in a row give non-finite outputs in that row (IEEE, as NumPy), never an exception; huge finite
    rows stay finite; the other rows match the references."""
    r = rng()
    x = r.standard_normal((6, 64)).astype(np.float32)
    x[1, 3], x[2, 5], x[3, :] = np.inf, np.nan, np.float32(1e37) * x[3, :]
    x[4, :] = np.nan
    clean = [0, 3, 5]
    gamma, beta = np.ones(64, np.float32), np.zeros(64, np.float32)
    ln = kernels.layernorm(x, gamma, beta, 1e-12, np.empty_like(x))
    sm = kernels.softmax_rows(x, np.empty_like(x))
    ge = kernels.gelu_erf(x.copy())
    for out in (ln, sm, ge):
        assert not np.isfinite(out[[1, 2, 4]]).all(axis=1).any()
        assert np.isfinite(out[clean]).all()
    np.testing.assert_allclose(ln[clean], layernorm_reference(x[clean], gamma, beta, 1e-12), atol=1e-4)
    np.testing.assert_allclose(ge[[0, 5]], gelu_reference(x[[0, 5]].astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_layernorm_rejects_mismatched_shapes():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError):
        kernels.layernorm(x, np.ones(5, np.float32), np.zeros(4, np.float32), 1e-5, np.empty_like(x))


# --------------------------------------------------------------------------------------------------
# softmax


def softmax_reference(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rows,width", [(1, 1), (7, 197), (198, 198), (3, 1000)])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_softmax_rows(rows, width, in_place):
    x = (rng().standard_normal((rows, width)) * 5).astype(np.float32)
    expected = softmax_reference(x)
    out = x if in_place else np.empty_like(x)
    kernels.softmax_rows(x, out)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-8)


def test_softmax_rows_is_stable_for_large_logits():
    x = np.array([[1000.0, 999.0, -1000.0], [-5e4, -5e4, -5e4]], np.float32)
    out = np.empty_like(x)
    kernels.softmax_rows(x, out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, softmax_reference(x), rtol=2e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("batch,seq,width,heads", [
    (1, 1, 8, 1), (1, 197, 64, 4), (2, 198, 96, 12), (9, 5, 48, 3), (3, 17, 60, 5), (1, 197, 768, 12),
])
def test_attention(batch, seq, width, heads, threads):
    qkv = (rng().standard_normal((batch, seq, 3 * width)) * 2).astype(np.float32)
    out = np.full((batch, seq, width), np.nan, np.float32)
    kernels.attention(qkv, out, heads)
    np.testing.assert_allclose(out, attention_reference(qkv, heads), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("queries", [0, 1, 2, 17, 196])
def test_attention_first_queries_only(queries, threads):
    # out (B, Tq, D): the first Tq query rows of each sequence against all T keys, and nothing past out.
    qkv = (rng().standard_normal((3, 197, 3 * 96)) * 2).astype(np.float32)
    buffer = np.full(3 * queries * 96 + 96, np.nan, np.float32)
    out = buffer[: 3 * queries * 96].reshape(3, queries, 96)
    kernels.attention(qkv, out, 12)
    np.testing.assert_allclose(out, attention_reference(qkv, 12)[:, :queries], rtol=1e-5, atol=2e-5)
    assert np.isnan(buffer[3 * queries * 96:]).all()


def test_attention_reuses_scratch_across_shapes():
    r = rng()
    for seq in (197, 5, 198):
        qkv = r.standard_normal((2, seq, 3 * 32)).astype(np.float32)
        out = np.empty((2, seq, 32), np.float32)
        kernels.attention(qkv, out, 2)
        np.testing.assert_allclose(out, attention_reference(qkv, 2), rtol=1e-5, atol=2e-5)


def test_attention_rejects_bad_shapes():
    qkv = np.zeros((1, 4, 3 * 10), np.float32)
    with pytest.raises(ValueError):
        kernels.attention(qkv, np.zeros((1, 4, 10), np.float32), 3)
    with pytest.raises(ValueError):
        kernels.attention(qkv, np.zeros((1, 5, 10), np.float32), 2)


# --------------------------------------------------------------------------------------------------
# Linear / GEMM


def linear_reference(x, weight, bias, epilogue, initial):
    w = np.asarray(weight, np.float64)
    y = x.astype(np.float64) @ w.T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if epilogue == "gelu":
        return gelu_reference(y)
    if epilogue == "add":
        return initial.astype(np.float64) + y
    return y


def check_linear(lin, x, weight, bias, epilogue):
    r = np.random.default_rng(7)
    initial = r.standard_normal((x.shape[0], weight.shape[0])).astype(np.float32)
    out = initial.copy()
    result = lin(x, out, epilogue)
    assert result is out
    expected = linear_reference(x, weight, bias, epilogue, initial)
    # Float32 accumulation error grows with K and the magnitude of the products summed.
    scale = np.abs(x.astype(np.float64)) @ np.abs(np.asarray(weight, np.float64)).T
    tol = 2e-6 * scale + 1e-6
    if epilogue == "add":
        tol += 1e-6 * np.abs(initial)
    bad = np.abs(out - expected) > tol
    assert not bad.any(), (f"{bad.sum()} mismatches, max err {np.max(np.abs(out - expected)):.3g}, "
                           f"backend {lin.backend_for(x.shape[0])}")


# (M, K, N): edge tiles in every dimension, K beyond one slab (256), N beyond one column block (768),
# rows per task above the B-packing threshold (384) with two threads, ViT-like 197/198 rows.
LINEAR_SHAPES = [(1, 1, 1), (5, 7, 3), (13, 70, 50), (197, 64, 96), (198, 33, 65), (37, 300, 129),
                 (197, 96, 800), (800, 300, 129), (900, 40, 100)]


@pytest.mark.parametrize("backend", ["numba", "blas"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
def test_linear_matches_float64(backend, shape, epilogue, threads):
    m, k, n = shape
    r = rng()
    weight = (r.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
    bias = r.standard_normal(n).astype(np.float32)
    x = r.standard_normal((m, k)).astype(np.float32)
    check_linear(kernels.Linear(weight, bias, backend=backend), x, weight, bias, epilogue)


@pytest.mark.parametrize("backend", ["numba", "blas"])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
def test_linear_without_bias(backend, epilogue):
    r = rng()
    weight = r.standard_normal((70, 45)).astype(np.float32)
    x = r.standard_normal((11, 45)).astype(np.float32)
    check_linear(kernels.Linear(weight, None, backend=backend), x, weight, None, epilogue)


@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_linear_mid_size_vit_shape(backend):
    # One real ViT-B projection at batch 2 (394 rows: two-thread row split packs B).
    r = rng()
    weight = (r.standard_normal((768, 768)) * 0.03).astype(np.float32)
    bias = r.standard_normal(768).astype(np.float32)
    x = r.standard_normal((394, 768)).astype(np.float32)
    check_linear(kernels.Linear(weight, bias, backend=backend), x, weight, bias, "add")


@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_linear_float16_weight(backend):
    r = rng()
    weight = (r.standard_normal((96, 80)) * 0.1).astype(np.float16)
    bias = r.standard_normal(96).astype(np.float16)
    x = r.standard_normal((197, 80)).astype(np.float32)
    lin = kernels.Linear(weight, bias, backend=backend)
    assert lin.weight_array.dtype == np.float32 and lin.weight_array.flags.c_contiguous
    check_linear(lin, x, weight.astype(np.float64), bias.astype(np.float64), "gelu")


def test_linear_memmapped_read_only_weight_is_not_retained(tmp_path):
    r = rng()
    weight = r.standard_normal((40, 24)).astype(np.float32)
    path = tmp_path / "w.bin"
    weight.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(40, 24))
    lin = kernels.Linear(mapped, None, backend="numba")
    x = r.standard_normal((9, 24)).astype(np.float32)
    check_linear(lin, x, weight, None, "none")
    # One float32 copy, in the Numba GEMM's panel layout, is the only weight-sized array the layer holds.
    assert lin.weight_layout == "panels"
    arrays = _weight_sized_arrays(lin, weight.size)
    assert len(arrays) == 1 and arrays[0] is lin.weight_array
    assert not np.shares_memory(arrays[0], mapped)
    assert lin.in_features == 24 and lin.out_features == 40


def _weight_sized_arrays(lin, size):
    """Every ndarray of at least `size` elements reachable from the layer's attributes (incl. tuples)."""
    found = []
    for value in vars(lin).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, np.ndarray) and item.size >= size:
                found.append(item)
    return found


# auto with nothing stored for the shape packs at load, as numba does (the stored-BLAS case: test_autotune_store)
@pytest.mark.parametrize("backend,layout", [("numba", "panels"), ("blas", "k_by_n"), ("auto", "panels")])
def test_linear_holds_one_weight_copy_per_backend(backend, layout):
    weight = rng().standard_normal((70, 45)).astype(np.float32)
    lin = kernels.Linear(weight, None, backend=backend)
    assert lin.weight_layout == layout
    assert len(_weight_sized_arrays(lin, weight.size)) == 1
    assert lin.report()["weight_layout"] == layout


def test_pack_weight_round_trips_and_pads_with_zeros():
    kc, nr = gemm_module.KC, gemm_module.NR
    depth, cols = kc + 7, 2 * nr + 6
    w_t = rng().standard_normal((depth, cols)).astype(np.float32)
    packed = gemm_module.pack_weight(w_t)
    padded = 3 * nr
    assert packed.size >= depth * padded and packed.ctypes.data % 64 == 0
    # Third panel of the second (7-deep) K slab: w_t[kc:, 2*nr:] then zero columns.
    start = kc * padded + 2 * 7 * nr
    panel = packed[start:start + 7 * nr].reshape(7, nr)
    np.testing.assert_array_equal(panel[:, :6], w_t[kc:, 2 * nr:])
    assert not panel[:, 6:].any()
    np.testing.assert_array_equal(gemm_module.unpack_weight(packed, depth, cols), w_t)


def test_public_kernel_lists_are_what_the_calls_compile():
    """The dispatcher lists kernels/warmup.py checks for compiled code: each path's calls compile each of them."""
    from vitnp.kernels import elementwise, mha

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 24), dtype=np.float32), rng.standard_normal((40, 24), dtype=np.float32)
    out = np.zeros((5, 40), np.float32)
    gemm_module.gemm_packed(x, gemm_module.pack_weight(np.ascontiguousarray(w.T)), 40, None, out, "none")
    gemm_module.pack_weight_nk(w)
    gemm_module.apply_epilogue_inplace(out, np.zeros(40, np.float32), True, 0, 0, 40)
    gemm_module.add_product_inplace(out, out.copy(), np.zeros(40, np.float32), True, 0)
    padded, packed = gemm_module.panel_buffer(24, 40)
    assert padded % gemm_module.NR == 0 and packed.size >= 24 * padded
    gemm_module.unpack_weight(packed, 24, 40)
    kernels.attention(rng.standard_normal((1, 5, 24), dtype=np.float32), np.empty((1, 5, 8), np.float32), 2)
    kernels.layernorm(x, np.ones(24, np.float32), np.zeros(24, np.float32), 1e-6, np.empty_like(x))
    for group in (gemm_module.FLOAT32_KERNELS, gemm_module.BLAS_EPILOGUE_KERNELS, mha.KERNELS,
                  elementwise.LAYERNORM_KERNELS):
        assert group and all(dispatcher.signatures for dispatcher in group), group


@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
@pytest.mark.parametrize("rows,depth,cols", [(197, 600, 70), (13, 5, 32), (400, 260, 100), (1, 1, 1)])
def test_gemm_packed_matches_numpy(threads, epilogue, rows, depth, cols):
    r = rng()
    w_t = r.standard_normal((depth, cols)).astype(np.float32)
    bias = r.standard_normal(cols).astype(np.float32)
    x = r.standard_normal((rows, depth)).astype(np.float32)
    start = r.standard_normal((rows, cols)).astype(np.float32)
    out = start.copy()
    gemm_module.gemm_packed(x, gemm_module.pack_weight(w_t), cols, bias, out, epilogue)
    expected = x.astype(np.float64) @ w_t + bias
    if epilogue == "gelu":
        expected = gelu_reference(expected)
    elif epilogue == "add":
        expected = expected + start
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * math.sqrt(depth))


def test_linear_auto_keeps_one_copy_while_switching_layouts():
    r = rng()
    weight = r.standard_normal((40, 24)).astype(np.float32)
    bias = r.standard_normal(40).astype(np.float32)
    x = r.standard_normal((5, 24)).astype(np.float32)
    lin = kernels.Linear(weight, bias)
    for choice in ("numba", "blas", "numba"):
        lin._adapt_layout(choice)
        check_linear(lin, x, weight, bias, "add")
        assert len(_weight_sized_arrays(lin, weight.size)) == 1
    # Once BLAS has been chosen the layer stays in the layout both backends read.
    assert lin.weight_layout == "k_by_n"


def test_linear_auto_picks_and_reports_a_backend(threads):
    r = rng()
    weight = r.standard_normal((64, 48)).astype(np.float32)
    bias = r.standard_normal(64).astype(np.float32)
    lin = kernels.Linear(weight, bias)  # backend="auto"
    x = r.standard_normal((23, 48)).astype(np.float32)
    check_linear(lin, x, weight, bias, "gelu")
    choice = lin.backend_for(23)
    assert choice in ("numba", "blas")
    report = lin.report()
    assert report["backend"] == "auto"
    assert report["auto_choices"][23]["backend"] == choice
    assert set(report["auto_choices"][23]) >= {"numba_ms", "blas_ms"}
    # Another layer of the same shape reuses the decision instead of timing again.
    assert kernels.Linear(weight, bias).backend_for(23) == choice


def test_linear_validates_inputs():
    lin = kernels.Linear(np.zeros((4, 3), np.float32), backend="numba")
    out = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError):
        lin(np.zeros((2, 3), np.float64), out)
    with pytest.raises(ValueError):
        lin(np.zeros((2, 5), np.float32), out)
    with pytest.raises(ValueError):
        lin(np.zeros((2, 3), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError):
        lin(np.zeros((2, 3), np.float32), out, epilogue="relu")
    square = kernels.Linear(np.zeros((4, 4), np.float32), backend="numba")
    buffer = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError):
        square(buffer, buffer)
    with pytest.raises(ValueError):
        kernels.Linear(np.zeros((4, 3), np.float32), backend="cuda")
    with pytest.raises(ValueError):
        kernels.Linear(np.zeros((4, 3), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(TypeError):
        kernels.Linear(np.zeros((4, 3), np.int32))


@pytest.mark.parametrize("rows,cols,workers", [(197, 2304, 2), (1576, 768, 2), (5, 3, 2), (197, 768, 1)])
def test_gemm_plan_covers_output_with_whole_tiles(rows, cols, workers):
    row_split, col_split = gemm_module.plan(rows, cols, workers)
    assert row_split >= 1 and col_split >= 1
    tasks = -(-rows // row_split) * -(-cols // col_split)
    assert tasks <= max(workers, 1) or workers == 1
    if row_split < rows:
        assert row_split % gemm_module.MR == 0
    if col_split < cols:
        assert col_split % gemm_module.NR == 0


def test_set_num_threads_limits_blas():
    from threadpoolctl import threadpool_info

    import numba

    previous = numba.get_num_threads()
    try:
        assert kernels.set_num_threads(1) == 1
        assert numba.get_num_threads() == 1
        assert all(d["num_threads"] == 1 for d in threadpool_info() if d["user_api"] == "blas")
        with pytest.raises(ValueError):
            kernels.set_num_threads(0)
    finally:
        kernels.set_num_threads(previous)


def test_concurrent_callers_get_correct_results():
    # A server may run requests on several Python threads: scratch buffers are per calling thread.
    import threading

    import numba

    kernels.layernorm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32), 1e-5,
                      np.zeros((1, 4), np.float32))
    if numba.threading_layer() == "workqueue":
        pytest.skip("the workqueue threading layer does not support concurrent parallel launches")
    r = rng()
    weight = (r.standard_normal((96, 64)) / 8).astype(np.float32)
    bias = r.standard_normal(96).astype(np.float32)
    lin = kernels.Linear(weight, bias, backend="numba")
    inputs = [r.standard_normal((197 + 5 * i, 64)).astype(np.float32) for i in range(4)]
    qkvs = [r.standard_normal((1, 30 + i, 96)).astype(np.float32) for i in range(4)]
    failures = []

    def work(i):
        try:
            for _ in range(5):
                check_linear(lin, inputs[i], weight, bias, "gelu")
                att = np.empty((1, qkvs[i].shape[1], 32), np.float32)
                kernels.attention(qkvs[i], att, 4)
                np.testing.assert_allclose(att, attention_reference(qkvs[i], 4), rtol=1e-5, atol=2e-5)
        except Exception as exc:  # reported below, with the thread's index
            failures.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("backend", ["numba", "blas"])
@pytest.mark.parametrize("shape", [(0, 8, 5), (4, 0, 5)], ids=["no-rows", "no-inputs"])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
def test_linear_degenerate_shapes(backend, shape, epilogue):
    m, k, n = shape
    r = rng()
    weight = r.standard_normal((n, k)).astype(np.float32)
    bias = r.standard_normal(n).astype(np.float32)
    x = r.standard_normal((m, k)).astype(np.float32)
    check_linear(kernels.Linear(weight, bias, backend=backend), x, weight, bias, epilogue)


# A column range computes out[:, start:stop] only (a ViT's last layer: keys and values of every token, queries of
# [CLS] alone).  Ranges: inside, to a ragged last panel, ending mid-panel, empty, all.
def _column_ranges(n):
    step = gemm_module.NR
    return [(step, 3 * step), (2 * step, n), (0, step + 3), (step, step), (0, n)]


def _check_column_range(run, x, weight, bias, epilogue, start, stop):
    r = np.random.default_rng(11)
    initial = r.standard_normal((x.shape[0], weight.shape[0])).astype(np.float32)
    out = initial.copy()
    run(out)
    expected = linear_reference(x, weight, bias, epilogue, initial)
    scale = np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
    tol = 2e-6 * scale + 1e-6 + 1e-6 * np.abs(initial)
    inside = np.s_[:, start:stop]
    assert np.all(np.abs(out[inside] - expected[inside]) <= tol[inside]), (start, stop)
    untouched = np.ones(out.shape, bool)
    untouched[inside] = False
    np.testing.assert_array_equal(out[untouched], initial[untouched])


@pytest.mark.parametrize("path", ["numba-panels", "numba-k_by_n", "blas"])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
@pytest.mark.parametrize("rows", [1, 197])
def test_linear_column_range_computes_only_those_columns(path, epilogue, rows, threads):
    r = rng()
    k, n = 70, 4 * gemm_module.NR + 5
    weight = (r.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
    bias = r.standard_normal(n).astype(np.float32)
    x = r.standard_normal((rows, k)).astype(np.float32)
    for start, stop in _column_ranges(n):
        if path == "numba-k_by_n":  # the Numba GEMM reading a (K, N) weight in place (auto after a BLAS choice)
            w_t = np.ascontiguousarray(weight.T)
            run = lambda out: gemm_module.gemm(x, w_t, bias, out, epilogue, (start, stop))  # noqa: E731
        else:
            lin = kernels.Linear(weight, bias, backend=path.split("-")[0])
            assert lin.weight_layout == ("panels" if path == "numba-panels" else "k_by_n")
            run = lambda out: lin(x, out, epilogue, columns=(start, stop))  # noqa: E731
        _check_column_range(run, x, weight, bias, epilogue, start, stop)


def test_linear_column_range_is_checked():
    step = gemm_module.NR
    lin = kernels.Linear(np.zeros((3 * step, 5), np.float32), backend="numba")
    x, out = np.zeros((2, 5), np.float32), np.zeros((2, 3 * step), np.float32)
    for bad in [(1, step), (step, 4 * step), (2 * step, step), (-step, step), (0.5, step), (0,), "ab"]:
        with pytest.raises(ValueError, match="columns"):
            lin(x, out, columns=bad)
    assert lin.column_step == step
