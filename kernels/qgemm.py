"""Reduced-precision GEMMs: int8 (dynamic quantisation) and bf16 weights, with fused fp32 epilogues.

    out (=|+=) epilogue(dequant(A_q @ B_q) + bias)        epilogue: "none" | "gelu" | "add"

One register-tiled micro-kernel generator (LLVM IR through a Numba intrinsic, phi-carried vector
accumulators as in _microkernel.py) serves four inner products, picked by the dtypes of A and B:

  kind     A (activations)        B (packed weight)     k per lane  instruction                 ISA
  vnni     uint8 (x/s + zp)       int8                  4           vpdpbusd (u8 x s8 -> i32)   AVX-512 VNNI
  madd     int16 (x/s + zp - zp)  int16 (int8 values)   2           vpmaddwd + vpaddd (exact)   AVX2, SSE2, AVX-512
  dpbf16   bf16 (x rounded)       bf16                  2           vdpbf16ps (-> f32)          AVX-512 BF16
  widen    float32 (x)            bf16                  1           bf16 << 16, vfmadd (f32)    any

int8: the activation row i is quantised asymmetrically to u8 in [0, 255] with scale s_i and zero point
zp_i (x ~ s_i * (u - zp_i)); weights are symmetric per output column (w ~ c_n * q, q in [-127, 127]).
  vnni:  acc = sum_k u_k q_kn (vpdpbusd's operands are exactly u8 x s8, no saturation: int32 sums;
         |acc| <= 255*127*K), then acc - zp_i * colsum_n (colsum_n = sum_k q_kn, precomputed at load).
  madd:  A is stored as the int16 u_k - zp_i (range [-255, 255]) and B as int16, so vpmaddwd's pair
         sums (<= 2*255*127) and the int32 accumulation are exact.  We do not use vpmaddubsw: its
         u8 x s8 pair sums saturate at int16 (255*127*2 > 32767), which would need 7-bit activations.
Both give the same integer sum_k (u_k - zp_i) q_kn; the epilogue is float(that) * (s_i * c_n) + bias_n,
so results are identical on every ISA.  All four kinds hold the full K in registers (no K slabs), so the
dequantisation, bias and residual add happen on the accumulators; GELU runs on each row block right after.

Numba's on-disk cache is keyed on the caller's source file: after editing this file delete
kernels/__pycache__/qgemm*.nbi/.nbc.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import isa
from ._aligned import aligned_empty
from ._microkernel import store_ragged
from .elementwise import gelu_inplace_serial
from .gemm import _task_bounds, _task_count

MR = isa.SPEC.gemm_mr
NR = isa.SPEC.gemm_nr
LANES = isa.SPEC.lanes
MR_MID, MR_SMALL = isa.SPEC.gemm_row_variants[1:]
A_BLOCK_BYTES = 192 * 1024   # rows of quantised A per block: the block stays in L2 while all column panels pass
EPILOGUES = {"none": 0, "gelu": 1, "add": 2}

# group size (k values per 32-bit lane) of each kind; A and B numpy dtypes
GROUP = {"vnni": 4, "madd": 2, "dpbf16": 2, "widen": 1}
A_DTYPE = {"vnni": np.uint8, "madd": np.int16, "dpbf16": np.uint16, "widen": np.float32}
B_DTYPE = {"vnni": np.int8, "madd": np.int16, "dpbf16": np.uint16, "widen": np.uint16}
INT8_KINDS = ("vnni", "madd")
BF16_KINDS = ("dpbf16", "widen")
INT8_ENV = "VITNP_INT8_KERNEL"
BF16_ENV = "VITNP_BF16_KERNEL"


def _is_x86():
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def supported_kinds() -> set:
    """The kernel kinds code generated in this process may use (honours VITNP_ISA)."""
    kinds = {"madd", "widen"}  # plain vector integer / float IR: every ISA
    if isa.ISA == "avx512" and _is_x86():
        if isa.has("avx512vnni"):
            kinds.add("vnni")
        if isa.has("avx512bf16"):
            kinds.add("dpbf16")
    return kinds


def _choose(env, preferred, fallback):
    kinds = supported_kinds()
    wanted = os.environ.get(env, "").strip().lower()
    if wanted and wanted != "auto":
        allowed = (preferred, fallback)
        if wanted not in allowed:
            raise isa.IsaError(f"{env}={wanted!r} is not one of {', '.join(allowed)} (or auto)")
        if wanted not in kinds:
            raise isa.IsaError(f"{env}={wanted}: not available with ISA {isa.ISA} on this CPU")
        return wanted
    return preferred if preferred in kinds else fallback


INT8_KIND = _choose(INT8_ENV, "vnni", "madd")
BF16_KIND = _choose(BF16_ENV, "dpbf16", "widen")

_KIND_BY_DTYPES = {(types.uint8, types.int8): "vnni", (types.int16, types.int16): "madd",
                   (types.uint16, types.uint16): "dpbf16", (types.float32, types.uint16): "widen"}

_F32 = ir.FloatType()
_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _c64(v):
    return ir.Constant(_I64, v)


def make_qkernel(mr, nr=NR, lanes=LANES):
    """kernel(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add,
              rscale, rzp, r_off, cscale, colsum, bias, n_off)

    a: row i of the A tile starts at a[a_off + i*lda] (mr rows are read: pad A's rows); group p (GROUP[kind]
    k values, 4 bytes) at + p*GROUP.  b: one packed panel from b[b_off]: group p, column j, element t at
    b_off + (p*nr + j)*GROUP + t.  c: flat float32 output, (i, j) at c[c_off + i*ldc + j]; the first
    `rows` x `cols` of the tile are stored (add=False) or added (add=True).  Epilogue on the accumulators:
    int kinds: float(acc [- rzp[r_off+i]*colsum[n]]) * (rscale[r_off+i]*cscale[n]) + bias[n]; bf16 kinds:
    acc + bias[n]; n = n_off + j (cscale, colsum, bias padded to whole panels).
    """
    if nr % lanes:
        raise ValueError("nr must be a multiple of the vector width")
    vectors = nr // lanes

    @intrinsic
    def kernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add,
               rscale, rzp, r_off, cscale, colsum, bias, n_off):
        arrays = (a, b, c, rscale, rzp, cscale, colsum, bias)
        if not all(isinstance(t, types.Array) and t.ndim == 1 for t in arrays):
            return None
        kind = _KIND_BY_DTYPES.get((a.dtype, b.dtype))
        if kind is None or kind not in supported_kinds():
            return None
        if not (c.dtype == rscale.dtype == cscale.dtype == bias.dtype == types.float32
                and rzp.dtype == colsum.dtype == types.int32):
            return None
        i64 = types.int64
        sig = types.void(a, i64, i64, b, i64, c, i64, i64, i64, i64, i64, types.boolean,
                         rscale, rzp, i64, cscale, colsum, bias, i64)
        return sig, _codegen(kind, mr, nr, lanes, vectors)

    kernel.mr, kernel.nr, kernel.lanes = mr, nr, lanes
    return kernel


def _codegen(kind, mr, nr, lanes, vectors):
    g = GROUP[kind]
    integer = kind in INT8_KINDS
    acc_elem = _I32 if integer else _F32
    ACC = ir.VectorType(acc_elem, lanes)
    FVEC = ir.VectorType(_F32, lanes)
    IVEC = ir.VectorType(_I32, lanes)
    if kind == "widen":
        BVEC = ir.VectorType(_I16, lanes)   # lanes columns x 1 k
    elif kind == "madd":
        BVEC = ir.VectorType(_I16, 2 * lanes)
    else:
        BVEC = IVEC                          # 4 x u8 / s8 or 2 x bf16 per 32-bit lane

    def codegen(context, builder, sig, args):
        (a_arr, a_off, lda, b_arr, b_off, c_arr, c_off, ldc, groups, rows, cols, add_flag,
         rs_arr, rzp_arr, r_off, cs_arr, colsum_arr, bias_arr, n_off) = args
        data = lambda i, v: context.make_array(sig.args[i])(context, builder, v).data  # noqa: E731
        a_data, b_data, c_data = data(0, a_arr), data(3, b_arr), data(5, c_arr)
        rs_data, rzp_data = data(12, rs_arr), data(13, rzp_arr)
        cs_data, colsum_data, bias_data = data(15, cs_arr), data(16, colsum_arr), data(17, bias_arr)
        module = builder.module

        a_base = builder.gep(a_data, [a_off])
        a_rows = [builder.gep(a_base, [builder.mul(_c64(i), lda)]) for i in range(mr)]
        b_base = builder.gep(b_data, [b_off])
        c_base = builder.gep(c_data, [c_off])
        c_rows = [builder.gep(c_base, [builder.mul(_c64(i), ldc)]) for i in range(mr)]
        full_tile = builder.and_(builder.icmp_signed(">=", rows, _c64(mr)),
                                 builder.icmp_signed(">=", cols, _c64(nr)))

        if kind == "vnni":
            dot = cgutils.get_or_insert_function(module, ir.FunctionType(IVEC, [IVEC, IVEC, IVEC]),
                                                 f"llvm.x86.avx512.vpdpbusd.{lanes * 32}")
        elif kind == "dpbf16":
            dot = cgutils.get_or_insert_function(module, ir.FunctionType(FVEC, [FVEC, IVEC, IVEC]),
                                                 f"llvm.x86.avx512bf16.dpbf16ps.{lanes * 32}")
        elif kind == "widen":
            dot = cgutils.get_or_insert_function(module, ir.FunctionType(FVEC, [FVEC, FVEC, FVEC]),
                                                 f"llvm.fmuladd.v{lanes}f32")
        zero = ir.Constant(ACC, [ir.Constant(acc_elem, 0)] * lanes)
        splat_mask = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
        even = ir.Constant(ir.VectorType(_I32, lanes), [2 * i for i in range(lanes)])
        odd = ir.Constant(ir.VectorType(_I32, lanes), [2 * i + 1 for i in range(lanes)])

        def splat(value, vec_type):
            undef = ir.Constant(vec_type, ir.Undefined)
            return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)), undef,
                                          splat_mask)

        entry = builder.basic_block
        loop = builder.append_basic_block("qk.loop")
        done = builder.append_basic_block("qk.done")
        builder.cbranch(builder.icmp_signed(">", groups, _c64(0)), loop, done)

        builder.position_at_end(loop)
        p = builder.phi(_I64, "p")
        p.add_incoming(_c64(0), entry)
        accs = []
        for i in range(mr):
            row = []
            for v in range(vectors):
                phi = builder.phi(ACC)
                phi.add_incoming(zero, entry)
                row.append(phi)
            accs.append(row)
        b_step = builder.gep(b_base, [builder.mul(p, _c64(nr * g))])
        b_vecs = []
        for v in range(vectors):
            ptr = builder.bitcast(builder.gep(b_step, [_c64(v * lanes * g)]), BVEC.as_pointer())
            vec = builder.load(ptr, align=1)
            if kind == "widen":
                vec = builder.bitcast(builder.shl(builder.zext(vec, IVEC), ir.Constant(IVEC, [16] * lanes)), FVEC)
            elif kind == "madd":
                vec = builder.sext(vec, ir.VectorType(_I32, 2 * lanes))
            b_vecs.append(vec)
        a_step = builder.mul(p, _c64(g))
        new_accs = []
        for i in range(mr):
            a_ptr = builder.gep(a_rows[i], [a_step])
            if kind == "widen":
                a_val = splat(builder.load(a_ptr, align=4), FVEC)
            else:
                a_val = splat(builder.load(builder.bitcast(a_ptr, _I32.as_pointer()), align=1), IVEC)
            if kind == "madd":
                a_wide = builder.sext(builder.bitcast(a_val, ir.VectorType(_I16, 2 * lanes)),
                                      ir.VectorType(_I32, 2 * lanes))
            row = []
            for v in range(vectors):
                if kind == "madd":
                    prod = builder.mul(a_wide, b_vecs[v])
                    pair = builder.add(builder.shuffle_vector(prod, prod, even),
                                       builder.shuffle_vector(prod, prod, odd))
                    row.append(builder.add(accs[i][v], pair))
                elif kind == "widen":
                    row.append(builder.call(dot, [a_val, b_vecs[v], accs[i][v]]))
                else:  # vnni: (acc, u8 operand, s8 operand); dpbf16: (acc, bf16, bf16)
                    row.append(builder.call(dot, [accs[i][v], a_val, b_vecs[v]]))
            new_accs.append(row)
        p_next = builder.add(p, _c64(1))
        loop_end = builder.basic_block
        p.add_incoming(p_next, loop_end)
        for i in range(mr):
            for v in range(vectors):
                accs[i][v].add_incoming(new_accs[i][v], loop_end)
        back_edge = builder.cbranch(builder.icmp_signed("<", p_next, groups), loop, done)
        _no_unroll(builder.module, back_edge)

        builder.position_at_end(done)
        phis = []
        for i in range(mr):  # the phi nodes first: LLVM wants them at the top of the block
            row = []
            for v in range(vectors):
                phi = builder.phi(ACC)
                phi.add_incoming(zero, entry)
                phi.add_incoming(new_accs[i][v], loop_end)
                row.append(phi)
            phis.append(row)
        n_base_bias = builder.gep(bias_data, [n_off])
        bias_vecs = [builder.load(builder.bitcast(builder.gep(n_base_bias, [_c64(v * lanes)]), FVEC.as_pointer()),
                                  align=4) for v in range(vectors)]
        if integer:
            cs_base = builder.gep(cs_data, [n_off])
            cs_vecs = [builder.load(builder.bitcast(builder.gep(cs_base, [_c64(v * lanes)]), FVEC.as_pointer()),
                                    align=4) for v in range(vectors)]
            if kind == "vnni":
                colsum_base = builder.gep(colsum_data, [n_off])
                colsum_vecs = [builder.load(builder.bitcast(builder.gep(colsum_base, [_c64(v * lanes)]),
                                                            IVEC.as_pointer()), align=4) for v in range(vectors)]
        results = []
        for i in range(mr):
            rs = zp = None
            if integer:
                r = builder.add(r_off, _c64(i))
                rs = splat(builder.load(builder.gep(rs_data, [r])), FVEC)
                if kind == "vnni":
                    zp = splat(builder.load(builder.gep(rzp_data, [r])), IVEC)
            results.append((phis[i], rs, zp))
        values = []
        for row, rs, zp in results:
            out_row = []
            for v, acc in enumerate(row):
                if integer:
                    if kind == "vnni":
                        acc = builder.sub(acc, builder.mul(zp, colsum_vecs[v]))
                    value = builder.fmul(builder.sitofp(acc, FVEC), builder.fmul(rs, cs_vecs[v]))
                    value = builder.fadd(value, bias_vecs[v])
                else:
                    value = builder.fadd(acc, bias_vecs[v])
                out_row.append(value)
            values.append(out_row)

        with builder.if_else(full_tile, likely=True) as (whole, ragged):
            with whole:
                for c_row, row in zip(c_rows, values):
                    for v, value in enumerate(row):
                        ptr = builder.bitcast(builder.gep(c_row, [_c64(v * lanes)]), FVEC.as_pointer())
                        with builder.if_else(add_flag) as (then_add, then_store):
                            with then_add:
                                builder.store(builder.fadd(builder.load(ptr, align=4), value), ptr, align=4)
                            with then_store:
                                builder.store(value, ptr, align=4)
            with ragged:
                store_ragged(builder, c_rows, values, lanes, add_flag, rows, cols)
        return context.get_dummy_value()

    return codegen


_loop_ids = iter(range(1 << 62))


def _no_unroll(module, branch):
    """Mark the k loop llvm.loop.unroll.disable: unrolled, its mr*vectors accumulators (plus the B vectors
    and A broadcasts) no longer fit the register file and LLVM spills them every step."""
    disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    loop_id = module.add_metadata([ir.MetaDataString(module, f"vitnp.qgemm.k.{next(_loop_ids)}"), disable])
    loop_id.operands = (loop_id, disable)  # a loop ID refers to itself
    branch.set_metadata("llvm.loop", loop_id)


_micro = make_qkernel(MR)
_micro_mid = make_qkernel(MR_MID)
_micro_small = make_qkernel(MR_SMALL)


@njit(cache=True)
def _cdiv(a, b):
    return (a + b - 1) // b


@njit(cache=True)
def _micro_rows(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
                cscale, colsum, bias, n_off):
    if rows > MR_MID:
        _micro(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
               cscale, colsum, bias, n_off)
    elif rows > MR_SMALL:
        _micro_mid(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
                   cscale, colsum, bias, n_off)
    else:
        _micro_small(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
                     cscale, colsum, bias, n_off)


@intrinsic
def _fetch_add(typingctx, counter, value):
    """Atomically counter[0] += value; returns the old value."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and value == types.int64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, args[1], "monotonic")
    return types.int64(counter, value), codegen


@njit(cache=True, parallel=True)
def _qgemm_tasks(a, lda, groups, b, group, c, rows_total, cols_total, rscale, rzp, cscale, colsum, bias,
                 epilogue, task_rows, task_cols, workers, counter, c_begin, c_end):
    """Tasks of task_rows x task_cols (whole micro-tiles), handed out through an atomic counter: a worker
    that the OS deschedules (other processes on the cores) delays one task, not a fixed share of the GEMM.
    Per task: column panels outer (one B panel stays in L1/L2), row panels inner (the task's rows of A,
    at most A_BLOCK_BYTES, stay in L2); GELU on the task's block right after.  Only output columns
    [c_begin, c_end) are computed (c_begin a multiple of NR)."""
    c_flat = c.reshape(-1)
    tasks = _task_count(rows_total, c_end - c_begin, task_rows, task_cols)
    add = epilogue == 2
    panel = groups * NR * group
    for w in prange(workers):
        while True:
            task = _fetch_add(counter, 1)
            if task >= tasks:
                break
            r0, r1, c0, c1 = _task_bounds(task, rows_total, c_end - c_begin, task_rows, task_cols)
            c0, c1 = c0 + c_begin, c1 + c_begin
            for col in range(c0, c1, NR):
                cols = min(NR, c1 - col)
                b_off = (col // NR) * panel
                for row in range(r0, r1, MR):
                    rows = min(MR, r1 - row)
                    _micro_rows(a, row * lda, lda, b, b_off, c_flat, row * cols_total + col, cols_total,
                                groups, rows, cols, add, rscale, rzp, row, cscale, colsum, bias, col)
            if epilogue == 1:
                for i in range(r0, r1):
                    gelu_inplace_serial(c_flat[i * cols_total + c0:i * cols_total + c1])


# -- activations ----------------------------------------------------------------------------------------

_EXACT_FAST = {"nnan", "ninf", "nsz"}  # lets LLVM vectorise min/max reductions; arithmetic stays exact
# LLVM's own rint / minnum / maxnum below: unlike np.rint (a call per element) and Python's min/max (compare
# and branch), loops over these vectorise (vroundps, vminps, vmaxps).


def _float_codegen(name, arity):
    def codegen(context, builder, sig, llargs):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32] * arity), f"llvm.{name}.f32")
        return builder.call(f, llargs)
    return codegen


@intrinsic
def _rint(typingctx, x):
    return (types.float32(x), _float_codegen("rint", 1)) if x == types.float32 else None


@intrinsic
def _minnum(typingctx, a, b):
    return (types.float32(a, b), _float_codegen("minnum", 2)) if a == b == types.float32 else None


@intrinsic
def _maxnum(typingctx, a, b):
    return (types.float32(a, b), _float_codegen("maxnum", 2)) if a == b == types.float32 else None


@njit(cache=True, fastmath=_EXACT_FAST)
def _row_range(x):
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for k in range(x.size):
        lo = _minnum(lo, x[k])
        hi = _maxnum(hi, x[k])
    return lo, hi


@njit(cache=True, fastmath=_EXACT_FAST)
def _quantize_into(x, inv, offset, lo, hi, q):
    """q[k] = clip(rint(x[k] * inv) + offset, lo, hi), vectorised (vroundps, vcvtps2dq, vpminsd/vpmaxsd)."""
    for k in range(x.size):
        u = np.int32(_rint(x[k] * inv)) + offset
        q[k] = min(max(u, lo), hi)


@njit(cache=True)
def row_scale_zero_point(x):
    """Asymmetric uint8 quantisation of one row: the range [min(x, 0), max(x, 0)] over 255 steps.
    scale = (hi - lo) / 255 (1 if the row is all zeros), zp = rint(-lo / scale) (as -lo * (1/scale)),
    u = clip(rint(x * (1/scale)) + zp, 0, 255); all in float32.  Returns (scale, 1/scale, zp)."""
    lo, hi = _row_range(x)
    scale = (hi - lo) / np.float32(255.0)
    if not scale > 0:
        scale = np.float32(1.0)
    inv = np.float32(1.0) / scale
    zp = np.int32(_rint(-lo * inv))
    zp = min(max(zp, np.int32(0)), np.int32(255))
    return scale, inv, zp


@njit(cache=True)
def _quantize_row_into(x, qa, scale_out, zp_out, i, kind_madd):
    """Row i of A for the integer kernels: u8 u (vnni) or int16 u - zp (madd); padding columns zero."""
    k = x.size
    scale, inv, zp = row_scale_zero_point(x)
    if kind_madd:  # clip(rint(x/s) + zp, 0, 255) - zp == clip(rint(x/s), -zp, 255 - zp)
        _quantize_into(x, inv, np.int32(0), np.int32(-zp), np.int32(255 - zp), qa[:k])
    else:
        _quantize_into(x, inv, zp, np.int32(0), np.int32(255), qa[:k])
    for j in range(k, qa.size):
        qa[j] = 0
    scale_out[i] = scale
    zp_out[i] = zp


@njit(cache=True)
def _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd):
    if i < x.shape[0]:
        _quantize_row_into(x[i], qa[i], scale_out, zp_out, i, kind_madd)
    else:
        qa[i, :] = 0
        scale_out[i] = 0.0
        zp_out[i] = 0


@njit(cache=True, parallel=True)
def _quantize_rows(x, qa, scale_out, zp_out, kind_madd):
    for i in prange(qa.shape[0]):
        _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd)


@njit(cache=True)
def _quantize_rows_serial(x, qa, scale_out, zp_out, kind_madd):
    for i in range(qa.shape[0]):
        _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd)


@njit(cache=True)
def _bf16_row(x, out):
    """float32 -> bfloat16 bits, round to nearest even (NaN kept a NaN); padding zero."""
    bits = x.view(np.uint32)
    for j in range(x.size):
        b = bits[j]
        if (b & 0x7FFFFFFF) > 0x7F800000:
            out[j] = np.uint16((b >> 16) | 0x40)
        else:
            out[j] = np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    for j in range(x.size, out.size):
        out[j] = 0


@njit(cache=True)
def _bf16_row_or_pad(x, out, i):
    if i < x.shape[0]:
        _bf16_row(x[i], out[i])
    else:
        out[i, :] = 0


@njit(cache=True, parallel=True)
def _bf16_rows(x, out):
    for i in prange(out.shape[0]):
        _bf16_row_or_pad(x, out, i)


@njit(cache=True)
def _bf16_rows_serial(x, out):
    for i in range(out.shape[0]):
        _bf16_row_or_pad(x, out, i)


@njit(cache=True)
def _copy_rows(x, out):
    rows, k = x.shape
    for i in range(out.shape[0]):
        if i < rows:
            out[i, :k] = x[i]
            out[i, k:] = 0.0
        else:
            out[i, :] = 0.0


# -- weights ---------------------------------------------------------------------------------------------

@njit(cache=True)
def quantize_weight_rows(w, q, scale, colsum):
    """Symmetric per-output-channel int8: scale_n = max|w[n]| / 127 (1 if all zero), q = rint(w / scale)."""
    n_out, k = w.shape
    for n in range(n_out):
        m = np.float32(0.0)
        for j in range(k):
            v = abs(w[n, j])
            if v > m:
                m = v
        s = m / np.float32(127.0)
        if not s > 0:
            s = np.float32(1.0)
        total = 0
        for j in range(k):
            v = np.int32(np.rint(w[n, j] / s))
            v = min(max(v, -127), 127)
            q[n, j] = v
            total += v
        scale[n] = s
        colsum[n] = total


@njit(cache=True)
def _pack_int(q, group, packed):
    """q (N, K) int8 values -> panels: panel j (NR columns), group p, column c, element t at
    ((j*groups + p)*NR + c)*group + t; zero past N and K."""
    n_out, k = q.shape
    groups = packed.size // (_cdiv(n_out, NR) * NR * group)
    packed[:] = 0
    for n in range(n_out):
        j, cc = n // NR, n % NR
        base = j * groups * NR * group + cc * group
        for kk in range(k):
            p, t = kk // group, kk % group
            packed[base + p * NR * group + t] = q[n, kk]


def bf16_bits(w):
    """float32 array -> uint16 bfloat16 bits, round to nearest even."""
    w = np.ascontiguousarray(w, np.float32)
    out = np.empty(w.shape, np.uint16)
    _bf16_row(w.reshape(-1), out.reshape(-1))
    return out


class PackedWeight:
    """A Linear's weight in one reduced-precision kernel's layout, with its column-wise epilogue terms."""

    def __init__(self, kind, n_out, k, packed, cscale, colsum, bias):
        self.kind, self.out_features, self.in_features = kind, n_out, k
        self.group = GROUP[kind]
        self.groups = _cdiv(k, self.group)
        self.packed, self.cscale, self.colsum, self.bias = packed, cscale, colsum, bias

    @property
    def nbytes(self):
        return int(self.packed.nbytes + self.cscale.nbytes + self.colsum.nbytes + self.bias.nbytes)


def _padded(values, n_pad, dtype):
    out = np.zeros(n_pad, dtype)
    if values is not None:
        out[:len(values)] = values
    return out


def _row_parts(weight):
    """A 2-D weight, or a list of 2-D weights stacked along N (e.g. q, k, v read separately from the file)."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    k = parts[0].shape[1]
    if any(p.ndim != 2 or p.shape[1] != k for p in parts):
        raise ValueError("weight parts must be 2-D with the same number of columns")
    return parts, sum(p.shape[0] for p in parts), k


def pack_int8(weight, bias=None, kind=None):
    """(N, K) float weight (or a list of row blocks) -> PackedWeight for the int8 kernel `kind` (default:
    this CPU's).  A float32 part (e.g. a read-only view of a mapped file) is read in place, never copied."""
    kind = kind or INT8_KIND
    parts, n_out, k = _row_parts(weight)
    q = np.empty((n_out, k), np.int8)
    scale = np.empty(n_out, np.float32)
    colsum = np.empty(n_out, np.int32)
    r = 0
    for part in parts:
        n = part.shape[0]
        quantize_weight_rows(np.ascontiguousarray(part, np.float32), q[r:r + n], scale[r:r + n], colsum[r:r + n])
        r += n
    return pack_quantized(q, scale, colsum, bias, kind)


def pack_quantized(q, scale, colsum, bias, kind):
    n_out, k = q.shape
    n_pad = _cdiv(n_out, NR) * NR
    g = GROUP[kind]
    packed = aligned_empty(1, n_pad * _cdiv(k, g) * g, B_DTYPE[kind])[0]
    _pack_int(q, g, packed)
    return PackedWeight(kind, n_out, k, packed, _padded(scale, n_pad, np.float32),
                        _padded(colsum, n_pad, np.int32), _padded(bias, n_pad, np.float32))


def pack_bf16(weight, bias=None, kind=None):
    """(N, K) float weight -> PackedWeight of its bfloat16 rounding for kernel `kind` (default: this CPU's)."""
    kind = kind or BF16_KIND
    parts, n_out, k = _row_parts(weight)
    bits = np.empty((n_out, k), np.uint16)
    r = 0
    for part in parts:
        n = part.shape[0]
        _bf16_row(np.ascontiguousarray(part, np.float32).reshape(-1), bits[r:r + n].reshape(-1))
        r += n
    n_pad = _cdiv(n_out, NR) * NR
    g = GROUP[kind]
    packed = aligned_empty(1, n_pad * _cdiv(k, g) * g, np.uint16)[0]
    _pack_int(bits, g, packed)
    return PackedWeight(kind, n_out, k, packed, np.zeros(n_pad, np.float32), np.zeros(n_pad, np.int32),
                        _padded(bias, n_pad, np.float32))


# -- driver ----------------------------------------------------------------------------------------------

_local = threading.local()


def _scratch(name, rows, cols, dtype):
    key = (name, np.dtype(dtype).str)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.size < rows * cols:
        buf = bufs[key] = aligned_empty(1, rows * cols, dtype)[0]
    return buf[:rows * cols].reshape(rows, cols)


TASKS_PER_WORKER = 4  # enough tasks that a stalled worker's share is picked up by the others


def _plan(rows, cols, row_bytes, workers):
    """(task_rows, task_cols): row blocks whose A slab fits A_BLOCK_BYTES, columns cut so that there are
    about TASKS_PER_WORKER tasks per worker (whole micro-tiles, at least two column panels each)."""
    block = max(MR, (A_BLOCK_BYTES // max(1, row_bytes)) // MR * MR)
    task_rows = min(block, _cdiv(rows, MR) * MR)
    row_tasks = _cdiv(rows, task_rows)
    panels = _cdiv(cols, NR)
    col_tasks = max(1, min(_cdiv(panels, 2), _cdiv(TASKS_PER_WORKER * workers, row_tasks))) if workers > 1 else 1
    return task_rows, _cdiv(panels, col_tasks) * NR


# Activations up to this many elements are quantised on the calling thread: one vectorised pass over a
# (197, 3072) activation takes ~80 us, while starting and joining a parallel region costs 10-100 us on an idle
# machine and ~1 ms when other processes share the cores (measured), and a ViT-B forward has 48 of them.
SERIAL_PREPARE_MAX = 1 << 20
_ROW_SCRATCH = np.zeros(1, np.float32)
_ZP_SCRATCH = np.zeros(1, np.int32)


def prepare_a(x, kind):
    """x (M, K) float32 -> (A operand with rows padded to MR and K to the group, row scales, zero points)."""
    rows, k = x.shape
    g = GROUP[kind]
    rows_pad = _cdiv(max(rows, 1), MR) * MR
    kp = _cdiv(k, g) * g
    a = _scratch("a", rows_pad, kp, A_DTYPE[kind])
    serial = rows_pad * kp <= SERIAL_PREPARE_MAX
    if kind in INT8_KINDS:
        scale = _scratch("scale", 1, rows_pad, np.float32)[0]
        zp = _scratch("zp", 1, rows_pad, np.int32)[0]
        (_quantize_rows_serial if serial else _quantize_rows)(x, a, scale, zp, kind == "madd")
        return a, scale, zp
    if kind == "dpbf16":
        (_bf16_rows_serial if serial else _bf16_rows)(x, a)
    else:
        _copy_rows(x, a)
    return a, _ROW_SCRATCH, _ZP_SCRATCH


def qgemm(x, weight: PackedWeight, out, epilogue="none", columns=None):
    """out (=|+=) epilogue(x @ W^T + bias) with a reduced-precision weight (x, out float32 C-contiguous);
    columns=(start, stop), start a multiple of NR: only out[:, start:stop] is computed."""
    rows, k = x.shape
    n = weight.out_features
    c_begin, c_end = (0, n) if columns is None else columns
    if rows == 0 or c_end == c_begin:
        return
    a, rscale, rzp = prepare_a(x, weight.kind)
    lda = a.shape[1]
    workers = get_num_threads()
    task_rows, task_cols = _plan(rows, c_end - c_begin, lda * a.itemsize, workers)
    counter = _scratch("counter", 1, 1, np.int64)[0]
    counter[0] = 0
    _qgemm_tasks(a.reshape(-1), lda, weight.groups, weight.packed, weight.group, out, rows, n, rscale, rzp,
                 weight.cscale, weight.colsum, weight.bias, EPILOGUES[epilogue], task_rows, task_cols,
                 workers, counter, c_begin, c_end)


@njit(cache=True)
def _unpack_int(packed, group, n_out, k, q):
    groups = packed.size // (_cdiv(n_out, NR) * NR * group)
    for n in range(n_out):
        j, cc = n // NR, n % NR
        base = j * groups * NR * group + cc * group
        for kk in range(k):
            q[n, kk] = packed[base + (kk // group) * NR * group + kk % group]


def unpack(weight: PackedWeight) -> np.ndarray:
    """The (N, K) float32 weight a PackedWeight stands for: int8 values times their column scale, or the
    bfloat16 values widened."""
    n, k = weight.out_features, weight.in_features
    q = np.empty((n, k), weight.packed.dtype)
    _unpack_int(weight.packed, weight.group, n, k, q)
    if weight.kind in INT8_KINDS:
        return (q.astype(np.float32) * weight.cscale[:n, None]).astype(np.float32)
    return (q.astype(np.uint32) << 16).view(np.float32)


def kernels_for(precision: str) -> tuple:
    """The dispatchers whose compiled presence shows this precision's GEMM is ready: the int8 and bf16
    GEMMs share one driver (with different operand types), so each one's activation-preparing kernel
    tells them apart."""
    if precision == "int8":
        return (_qgemm_tasks, _quantize_rows)
    if precision == "bf16":
        return (_qgemm_tasks, _bf16_rows if BF16_KIND == "dpbf16" else _copy_rows)
    raise ValueError(f"precision must be int8 or bf16, got {precision!r}")
