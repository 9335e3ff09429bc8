"""The int8 / bf16 micro-kernels: one LLVM IR generator (the fp32 micro-kernel's skeleton, _microkernel.py)
for the four inner products of kinds.py, picked by the dtypes of A and B.

int8: the activation row i is quantised asymmetrically to u8 in [0, 255] with scale s_i and zero point
zp_i (x ~ s_i * (u - zp_i)); weights are symmetric per output column (w ~ c_n * q, q in [-127, 127]).
  vnni:  acc = sum_k u_k q_kn (vpdpbusd's operands are exactly u8 x s8, no saturation: int32 sums;
         |acc| <= 255*127*K), then acc - zp_i * colsum_n (colsum_n = sum_k q_kn, precomputed at load).
  madd:  A is stored as the int16 u_k - zp_i (range [-255, 255]) and B as int16, so vpmaddwd's pair
         sums (<= 2*255*127) and the int32 accumulation are exact.  We do not use vpmaddubsw: its
         u8 x s8 pair sums saturate at int16 (255*127*2 > 32767), which would need 7-bit activations.
Both give the same integer sum_k (u_k - zp_i) q_kn; the epilogue is float(that) * (s_i * c_n) + bias_n,
so results are identical on every ISA.  All four kinds hold the full K in registers (no K slabs), so the
dequantisation, bias and residual add happen on the accumulators.

Numba's on-disk cache is keyed on the jitted caller's source file: after editing this file delete
kernels/qgemm/__pycache__/*.nbi and *.nbc.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import isa
from .._microkernel import F32, I16, I32, full_tile, int64, k_loop, row_pointers, splat, store_tile, vector_ptr
from .kinds import A_DTYPE, GROUP, INT8_KINDS, supported_kinds

MR = isa.SPEC.gemm_mr  # the fp32 GEMM's micro-tile (isa.py): the same register budget
NR = isa.SPEC.gemm_nr
LANES = isa.SPEC.lanes
MR_MID, MR_SMALL = isa.SPEC.gemm_row_variants[1:]

_KIND_BY_DTYPES = {(types.uint8, types.int8): "vnni", (types.int16, types.int16): "madd",
                   (types.uint16, types.uint16): "dpbf16", (types.float32, types.uint16): "widen"}


def operand_kind(kind_by_dtypes, a, b, c, rscale, rzp, cscale, colsum, bias):
    """The kernel kind a micro-kernel call's operand types select (A and B dtypes: kind_by_dtypes), or None when
    the call does not type: every operand a 1-D array, C and the scales float32, zero points and column sums
    int32."""
    if not all(isinstance(t, types.Array) and t.ndim == 1 for t in (a, b, c, rscale, rzp, cscale, colsum, bias)):
        return None
    if not (c.dtype == rscale.dtype == cscale.dtype == bias.dtype == types.float32
            and rzp.dtype == colsum.dtype == types.int32):
        return None
    return kind_by_dtypes.get((a.dtype, b.dtype))


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

    @intrinsic
    def kernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add,
               rscale, rzp, r_off, cscale, colsum, bias, n_off):
        kind = operand_kind(_KIND_BY_DTYPES, a, b, c, rscale, rzp, cscale, colsum, bias)
        if kind is None or kind not in supported_kinds():
            return None
        i64 = types.int64
        sig = types.void(a, i64, i64, b, i64, c, i64, i64, i64, i64, i64, types.boolean,
                         rscale, rzp, i64, cscale, colsum, bias, i64)
        return sig, _codegen(kind, mr, nr, lanes)

    kernel.mr, kernel.nr, kernel.lanes = mr, nr, lanes
    return kernel


def _inner_step(kind, builder, lanes):
    """(zero accumulator, B vector type, widen_b, load_a_value, update) of kind's k step: the B operand as
    loaded (widen_b turns it into what update takes), A's group as a splat, and one accumulation."""
    fvec = ir.VectorType(F32, lanes)
    ivec = ir.VectorType(I32, lanes)
    module = builder.module

    def intrinsic_call(name, types_):
        return cgutils.get_or_insert_function(module, ir.FunctionType(types_[0], list(types_)), name)

    def a_group(ptr):  # GROUP[kind] k values of A, 4 bytes, splat over the lanes
        return splat(builder, builder.load(builder.bitcast(ptr, I32.as_pointer()), align=1), ivec)

    if kind == "widen":  # lanes columns x 1 k: bf16 bits << 16 is the float32 value
        fma = intrinsic_call(f"llvm.fmuladd.v{lanes}f32", (fvec, fvec, fvec))
        return (ir.Constant(fvec, [0.0] * lanes), ir.VectorType(I16, lanes),
                lambda b: builder.bitcast(builder.shl(builder.zext(b, ivec), ir.Constant(ivec, [16] * lanes)), fvec),
                lambda ptr: splat(builder, builder.load(ptr, align=4), fvec),
                lambda acc, a, b: builder.call(fma, [a, b, acc]))
    if kind == "madd":  # int16 pairs: products widened to int32, adjacent pairs summed (vpmaddwd)
        wide = ir.VectorType(I32, 2 * lanes)
        even = ir.Constant(ivec, [2 * i for i in range(lanes)])
        odd = ir.Constant(ivec, [2 * i + 1 for i in range(lanes)])

        def update(acc, a_wide, b):
            prod = builder.mul(a_wide, b)
            return builder.add(acc, builder.add(builder.shuffle_vector(prod, prod, even),
                                                builder.shuffle_vector(prod, prod, odd)))

        return (ir.Constant(ivec, [0] * lanes), ir.VectorType(I16, 2 * lanes), lambda b: builder.sext(b, wide),
                lambda ptr: builder.sext(builder.bitcast(a_group(ptr), ir.VectorType(I16, 2 * lanes)), wide),
                update)
    if kind == "vnni":  # (acc, u8 operand, s8 operand)
        dot = intrinsic_call(f"llvm.x86.avx512.vpdpbusd.{lanes * 32}", (ivec, ivec, ivec))
        zero = ir.Constant(ivec, [0] * lanes)
    else:  # dpbf16: (acc, bf16 pairs, bf16 pairs)
        dot = intrinsic_call(f"llvm.x86.avx512bf16.dpbf16ps.{lanes * 32}", (fvec, ivec, ivec))
        zero = ir.Constant(fvec, [0.0] * lanes)
    return zero, ivec, lambda b: b, a_group, lambda acc, a, b: builder.call(dot, [acc, a, b])


def _codegen(kind, mr, nr, lanes):
    g = GROUP[kind]
    vectors = nr // lanes

    def codegen(context, builder, sig, args):
        (a_arr, a_off, lda, b_arr, b_off, c_arr, c_off, ldc, groups, rows, cols, add,
         rs_arr, rzp_arr, r_off, cs_arr, colsum_arr, bias_arr, n_off) = args
        data = lambda i, v: context.make_array(sig.args[i])(context, builder, v).data  # noqa: E731
        a_data, b_data, c_data = data(0, a_arr), data(3, b_arr), data(5, c_arr)
        rs_data, rzp_data = data(12, rs_arr), data(13, rzp_arr)
        cs_data, colsum_data, bias_data = data(15, cs_arr), data(16, colsum_arr), data(17, bias_arr)

        a_rows = row_pointers(builder, a_data, a_off, mr, lda)
        b_base = builder.gep(b_data, [b_off])
        c_rows = row_pointers(builder, c_data, c_off, mr, ldc)
        whole = full_tile(builder, rows, cols, mr, nr)
        zero, b_type, widen_b, load_a_value, update = _inner_step(kind, builder, lanes)

        def load_b(p):
            step = builder.gep(b_base, [builder.mul(p, int64(nr * g))])
            return [widen_b(builder.load(builder.bitcast(builder.gep(step, [int64(v * lanes * g)]),
                                                         b_type.as_pointer()), align=1))
                    for v in range(vectors)]

        def load_a(p, i):
            return load_a_value(builder.gep(a_rows[i], [builder.mul(p, int64(g))]))

        accs = k_loop(builder, groups, zero, mr, vectors, load_b, load_a, update, unroll=False)
        values = fused_epilogue(builder, kind, accs, rs_data, rzp_data, r_off, cs_data, colsum_data, bias_data,
                                n_off, lanes)
        store_tile(builder, c_rows, values, lanes, add, rows, cols, whole)
        return context.get_dummy_value()

    return codegen


def fused_epilogue(builder, kind, accs, rs_data, rzp_data, r_off, cs_data, colsum_data, bias_data, n_off, lanes):
    """The float32 tile ([row][vector]) of accumulators `accs` (int32 for the int8 kinds, float32 for bf16)
    after the kind's epilogue: int kinds float(acc [- rzp[r_off+i]*colsum[n]]) * (rscale[r_off+i]*cscale[n])
    + bias[n] (the zero-point term where A is u8), bf16 kinds acc + bias[n]; n = n_off + j."""
    vectors = len(accs[0])
    integer = kind in INT8_KINDS
    zero_point = A_DTYPE[kind] == np.uint8
    fvec = ir.VectorType(F32, lanes)
    ivec = ir.VectorType(I32, lanes)

    def column_vectors(base_data, element):
        base = builder.gep(base_data, [n_off])
        return [builder.load(vector_ptr(builder, base, v, lanes, element), align=4) for v in range(vectors)]

    bias = column_vectors(bias_data, F32)
    if integer:
        cscale = column_vectors(cs_data, F32)
        colsum = column_vectors(colsum_data, I32) if zero_point else None
    values = []
    for i, row in enumerate(accs):
        if not integer:
            values.append([builder.fadd(acc, bias[v]) for v, acc in enumerate(row)])
            continue
        r = builder.add(r_off, int64(i))
        rs = splat(builder, builder.load(builder.gep(rs_data, [r])), fvec)
        if zero_point:
            zp = splat(builder, builder.load(builder.gep(rzp_data, [r])), ivec)
            row = [builder.sub(acc, builder.mul(zp, colsum[v])) for v, acc in enumerate(row)]
        values.append([builder.fadd(builder.fmul(builder.sitofp(acc, fvec), builder.fmul(rs, cscale[v])), bias[v])
                       for v, acc in enumerate(row)])
    return values


_micro = make_qkernel(MR)
_micro_mid = make_qkernel(MR_MID)
_micro_small = make_qkernel(MR_SMALL)


@njit(cache=True, inline="always")
def micro_rows(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
               cscale, colsum, bias, n_off):
    """The micro-kernel for a row panel of `rows` <= MR rows: a shorter kernel for the ragged last panel
    wastes less work on the zero padding."""
    if rows > MR_MID:
        _micro(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
               cscale, colsum, bias, n_off)
    elif rows > MR_SMALL:
        _micro_mid(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
                   cscale, colsum, bias, n_off)
    else:
        _micro_small(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off,
                     cscale, colsum, bias, n_off)
