"""LLVM-level helpers Numba does not expose: building 2**n from exponent bits (for a vectorisable exp)."""
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


@intrinsic
def maxnum_float32(typingctx, a, b):
    """llvm.maxnum on float32: unlike Python's max (a compare-and-branch), LLVM vectorises it."""
    if a != types.float32 or b != types.float32:
        return None
    sig = types.float32(types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32]), "llvm.maxnum.f32")
        return builder.call(fn, args)

    return sig, codegen
