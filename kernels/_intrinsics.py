"""LLVM-level helpers Numba does not expose: 2**n from exponent bits (for a vectorisable exp), vectorisable
max / min / rint, a register-resident column softmax, software prefetch.

Numba's on-disk cache (cache=True) is keyed on the source file of each jitted *caller*, so after editing
this file delete kernels/__pycache__/*.nbi and *.nbc, or the callers keep their old machine code.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def exp2_int_float32(typingctx, n):
    """2**n as float32 for an integral-valued float32 n in [-126, 127]: (n + 127) << 23, bit-cast.

    Numba would widen the integer arithmetic to int64; doing it at i32 keeps the loop vectorisable.
    """
    if n != types.float32:
        return None
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        as_int = builder.fptosi(args[0], i32)
        biased = builder.add(as_int, ir.Constant(i32, 127))
        bits = builder.shl(biased, ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


def _float_codegen(name, arity):
    """Codegen calling LLVM's llvm.<name>.f32 on float32 arguments."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * arity), f"llvm.{name}.f32")
        return builder.call(fn, args)
    return codegen


# LLVM's own maxnum / minnum / rint: unlike Python's max and min (compare and branch) and np.rint (a call per
# element), loops over these vectorise (vmaxps, vminps, vroundps).
@intrinsic
def maxnum_float32(typingctx, a, b):
    """llvm.maxnum on float32."""
    return (types.float32(a, b), _float_codegen("maxnum", 2)) if a == b == types.float32 else None


@intrinsic
def minnum_float32(typingctx, a, b):
    """llvm.minnum on float32."""
    return (types.float32(a, b), _float_codegen("minnum", 2)) if a == b == types.float32 else None


@intrinsic
def rint_float32(typingctx, x):
    """llvm.rint on float32: round half to even."""
    return (types.float32(x), _float_codegen("rint", 1)) if x == types.float32 else None


EXP_CONSTANTS = dict(lo=-87.0, hi=88.0, log2e=1.4426950408889634, ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,
                      poly=(0.0013887316, 0.0083369026, 0.041666485, 0.16666655, 0.49999999, 1.0, 1.0))


def _vec_const(value, lanes):
    return ir.Constant(ir.VectorType(ir.FloatType(), lanes), [float(value)] * lanes)


def _vector_exp(builder, x, lanes):
    """The same range-reduced polynomial exp as elementwise.exp32, on a <lanes x float>."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, lanes)
    ivec = ir.VectorType(ir.IntType(32), lanes)
    module = builder.module
    name = f"v{lanes}f32"
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fmuladd.{name}")
    vmax = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec]), f"llvm.maxnum.{name}")
    vmin = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec]), f"llvm.minnum.{name}")
    floor = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]), f"llvm.floor.{name}")
    c = EXP_CONSTANTS

    def const(value):
        return _vec_const(value, lanes)

    x = builder.call(vmax, [builder.call(vmin, [x, const(c["hi"])]), const(c["lo"])])
    n = builder.call(floor, [builder.call(fma, [x, const(c["log2e"]), const(0.5)])])
    r = builder.call(fma, [n, const(-c["ln2_hi"]), x])
    r = builder.call(fma, [n, const(-c["ln2_lo"]), r])
    p = const(c["poly"][0])
    for coefficient in c["poly"][1:]:
        p = builder.call(fma, [p, r, const(coefficient)])
    bits = builder.shl(builder.add(builder.fptosi(n, ivec), ir.Constant(ivec, [127] * lanes)),
                       ir.Constant(ivec, [23] * lanes))
    return builder.fmul(p, builder.bitcast(bits, vec))


def make_column_softmax(width, lanes):
    """Intrinsic softmax_columns(s, offset, rows): in place, each of the `width` columns of the row-major
    block s[offset : offset + rows*width] becomes its softmax down the `rows` rows.

    Numba cannot keep `width` running maxima/sums in registers (they would live in an array that may
    alias s, which defeats the vectoriser); here they are <lanes x float> values, so every pass is pure
    vector loads, maxnum / exp polynomial FMAs and stores.
    """
    if width % lanes:
        raise ValueError(f"width must be a multiple of {lanes}")
    vectors = width // lanes

    @intrinsic
    def softmax_columns(typingctx, s, offset, rows):
        if not (isinstance(s, types.Array) and s.dtype == types.float32 and s.ndim == 1):
            return None
        sig = types.void(s, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            s_arr, offset_v, rows_v = args
            f32 = ir.FloatType()
            vec = ir.VectorType(f32, lanes)
            vec_ptr = vec.as_pointer()
            i64 = ir.IntType(64)
            base = builder.gep(context.make_array(signature.args[0])(context, builder, s_arr).data, [offset_v])
            vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec]),
                                                  f"llvm.maxnum.v{lanes}f32")

            def pointer(row, v):
                index = builder.add(builder.mul(row, ir.Constant(i64, width)), ir.Constant(i64, v * lanes))
                return builder.bitcast(builder.gep(base, [index]), vec_ptr)

            maxima = [cgutils.alloca_once_value(builder, builder.load(pointer(ir.Constant(i64, 0), v), align=4))
                      for v in range(vectors)]
            sums = [cgutils.alloca_once_value(builder, _vec_const(0.0, lanes)) for _ in range(vectors)]
            with cgutils.for_range(builder, rows_v) as loop:
                for v in range(vectors):
                    value = builder.load(pointer(loop.index, v), align=4)
                    builder.store(builder.call(vmax, [builder.load(maxima[v]), value]), maxima[v])
            top = [builder.load(m) for m in maxima]
            with cgutils.for_range(builder, rows_v) as loop:
                for v in range(vectors):
                    ptr = pointer(loop.index, v)
                    e = _vector_exp(builder, builder.fsub(builder.load(ptr, align=4), top[v]), lanes)
                    builder.store(e, ptr, align=4)
                    builder.store(builder.fadd(builder.load(sums[v]), e), sums[v])
            inverse = [builder.fdiv(_vec_const(1.0, lanes), builder.load(total)) for total in sums]
            with cgutils.for_range(builder, rows_v) as loop:
                for v in range(vectors):
                    ptr = pointer(loop.index, v)
                    builder.store(builder.fmul(builder.load(ptr, align=4), inverse[v]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return softmax_columns


@intrinsic
def prefetch_read(typingctx, arr, index):
    """Software prefetch of arr[index] (into all cache levels) for strided walks the hardware misses."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1) or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, types.int64)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
