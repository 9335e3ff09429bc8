"""Register-tiled GEMM micro-kernels emitted directly as LLVM IR through Numba intrinsics.

Written as plain Numba loops, the MR x NR accumulator tile lives in memory (Numba arrays may alias, so
LLVM cannot promote it to registers).  Here the accumulators are SSA vector values carried around the k
loop by phi nodes, so the register allocator keeps all of them in vector registers and each k step is
NR/lanes vector loads of B, MR broadcasts of A and MR*NR/lanes FMAs.  The vector width is a parameter
(isa.py picks it and a tile that fits the register file); tests/test_kernels.py checks the k loop's
assembly: vbroadcastss / vmovups / vfmadd231ps on zmm (AVX-512) or ymm (AVX2) registers, no spills.

Numba's on-disk cache (cache=True) is keyed on the source file of each jitted *caller*, so after editing
this file delete kernels/__pycache__/*.nbi and *.nbc, or the callers keep their old machine code.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_F32 = ir.FloatType()
_I1 = ir.IntType(1)
_I8P = ir.PointerType(ir.IntType(8))
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
FLOATS_PER_LINE = 16  # float32 per 64-byte cache line


def make_microkernel(mr, nr, lanes, prefetch_b=False):
    """Return an intrinsic
        kernel(a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate, rows, cols
               [, pf_off, pf_shift if prefetch_b])

    a: A panel, element (i, p) at a[a_off + i*a_row_step + p*a_k_step] (packed panels: a_row_step=1,
    a_k_step=mr); b: B panel, (p, j) at b[b_off + p*ldb + j] (ldb = nr when packed); c: flat output,
    (i, j) at c[c_off + i*ldc + j].  Computes the mr x nr product over kc steps and stores
    (accumulate=False) or adds (accumulate=True) its first `rows` rows and `cols` columns into c; a
    ragged tile is written with masked stores, so nothing outside it is touched.  With prefetch_b, step p of the k loop
    also prefetches (into L2) the cache line at b[pf_off + (p >> pf_shift) * 16]: callers point it at
    the B panel they will need next, spreading its DRAM fetch over the current panel's compute.  All of A's mr rows and
    B's nr columns are read, so panels must be padded (zeros) to full size.
    """
    if nr % lanes:
        raise ValueError(f"nr must be a multiple of the vector width {lanes}")
    vectors = nr // lanes
    LANES = lanes
    _VEC = ir.VectorType(_F32, lanes)

    def typer(a, b, c, extra):
        for arr in (a, b, c):
            if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
                return None
        i64 = types.int64
        return types.void(a, i64, i64, i64, b, i64, i64, c, i64, i64, i64, types.boolean, i64, i64,
                          *([i64] * extra))

    if prefetch_b:
        @intrinsic
        def kernel(typingctx, a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate,
                   rows, cols, pf_off, pf_shift):
            sig = typer(a, b, c, 2)
            return None if sig is None else (sig, codegen)
    else:
        @intrinsic
        def kernel(typingctx, a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate,
                   rows, cols):
            sig = typer(a, b, c, 0)
            return None if sig is None else (sig, codegen)

    def codegen(context, builder, signature, args):
        (a_arr, a_off_v, a_row_v, a_k_v, b_arr, b_off_v, ldb_v, c_arr, c_off_v, ldc_v, kc_v, acc_flag,
         rows_v, cols_v) = args[:14]
        a_data = context.make_array(signature.args[0])(context, builder, a_arr).data
        b_data = context.make_array(signature.args[4])(context, builder, b_arr).data
        c_data = context.make_array(signature.args[7])(context, builder, c_arr).data
        a_base = builder.gep(a_data, [a_off_v])
        a_rows = [builder.gep(a_base, [builder.mul(_const(i), a_row_v)]) for i in range(mr)]
        b_base = builder.gep(b_data, [b_off_v])
        c_base = builder.gep(c_data, [c_off_v])
        c_rows = [builder.gep(c_base, [builder.mul(_const(i), ldc_v)]) for i in range(mr)]
        full_tile = builder.and_(builder.icmp_signed(">=", rows_v, _const(mr)),
                                 builder.icmp_signed(">=", cols_v, _const(nr)))

        # The C tile is touched only after the k loop: start pulling its lines in now so the final
        # load/add/store does not stall on L2/L3 (rw=1: will be written, locality=3).
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), "llvm.prefetch.p0")
        with builder.if_then(full_tile, likely=True):
            for i in range(mr):
                for offset in range(0, nr, FLOATS_PER_LINE):
                    line = builder.bitcast(builder.gep(c_rows[i], [_const(offset)]), _I8P)
                    builder.call(prefetch, [line, ir.Constant(_I32, 1), ir.Constant(_I32, 3),
                                            ir.Constant(_I32, 1)])

        # fmuladd: one FMA instruction where the ISA has it (AVX2, AVX-512), mul + add where it does not
        # (llvm.fma would become a libm call per lane on plain SSE2).
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]),
                                             f"llvm.fmuladd.v{LANES}f32")
        zero = ir.Constant(_VEC, [0.0] * LANES)
        undef_vec = ir.Constant(_VEC, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)

        entry = builder.basic_block
        loop = builder.append_basic_block("mk.loop")
        done = builder.append_basic_block("mk.done")
        builder.cbranch(builder.icmp_signed(">", kc_v, _const(0)), loop, done)

        builder.position_at_end(loop)
        p = builder.phi(_I64, "p")
        p.add_incoming(_const(0), entry)
        accs = []
        for i in range(mr):
            row = []
            for v in range(vectors):
                phi = builder.phi(_VEC, f"acc{i}_{v}")
                phi.add_incoming(zero, entry)
                row.append(phi)
            accs.append(row)
        if prefetch_b:
            pf_off_v, pf_shift_v = args[14:]
            pf_line = builder.gep(b_data, [builder.add(pf_off_v, builder.mul(builder.ashr(p, pf_shift_v),
                                                                           _const(FLOATS_PER_LINE)))])
            builder.call(prefetch, [builder.bitcast(pf_line, _I8P), ir.Constant(_I32, 0),
                                    ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        b_row = builder.gep(b_base, [builder.mul(p, ldb_v)])
        b_vecs = [builder.load(_vector_ptr(builder, b_row, v, lanes), align=4) for v in range(vectors)]
        a_step = builder.mul(p, a_k_v)
        new_accs = []
        for i in range(mr):
            a_val = builder.load(builder.gep(a_rows[i], [a_step]), align=4)
            a_splat = builder.shuffle_vector(builder.insert_element(undef_vec, a_val, ir.Constant(_I32, 0)),
                                             undef_vec, splat_mask)
            new_accs.append([builder.call(fma, [a_splat, b_vecs[v], accs[i][v]]) for v in range(vectors)])
        p_next = builder.add(p, _const(1))
        loop_end = builder.basic_block
        p.add_incoming(p_next, loop_end)
        for i in range(mr):
            for v in range(vectors):
                accs[i][v].add_incoming(new_accs[i][v], loop_end)
        builder.cbranch(builder.icmp_signed("<", p_next, kc_v), loop, done)

        builder.position_at_end(done)
        results = []
        for i in range(mr):
            row = []
            for v in range(vectors):
                phi = builder.phi(_VEC)
                phi.add_incoming(zero, entry)
                phi.add_incoming(new_accs[i][v], loop_end)
                row.append(phi)
            results.append(row)
        with builder.if_else(full_tile, likely=True) as (whole, ragged):
            with whole:
                with builder.if_else(acc_flag) as (then_add, then_store):
                    with then_add:
                        _store_full(builder, c_rows, results, lanes, add=True)
                    with then_store:
                        _store_full(builder, c_rows, results, lanes, add=False)
            with ragged:
                store_ragged(builder, c_rows, results, lanes, acc_flag, rows_v, cols_v)
        return context.get_dummy_value()


    kernel.mr = mr
    kernel.nr = nr
    kernel.lanes = lanes
    return kernel


def _const(value):
    return ir.Constant(_I64, value)


def _vector_ptr(builder, row_ptr, v, lanes):
    return builder.bitcast(builder.gep(row_ptr, [_const(v * lanes)]), ir.VectorType(_F32, lanes).as_pointer())


def _store_full(builder, c_rows, results, lanes, add):
    for c_row, row in zip(c_rows, results):
        for v, value in enumerate(row):
            ptr = _vector_ptr(builder, c_row, v, lanes)
            if add:
                value = builder.fadd(builder.load(ptr, align=4), value)
            builder.store(value, ptr, align=4)


def store_ragged(builder, c_rows, results, lanes, acc_flag, rows_v, cols_v):
    """Store (or, under acc_flag, add) the float32 tile `results` ([row][vector]) into the rows `c_rows`:
    rows below `rows_v` only, lanes below `cols_v` only (masked load/store: AVX-512 mask registers, AVX2
    vmaskmovps, element by element on SSE).  Shared by the fp32 and the int8/bf16 micro-kernels."""
    vec = ir.VectorType(_F32, lanes)
    mask = ir.VectorType(_I1, lanes)
    lane_vec = ir.VectorType(_I64, lanes)
    module = builder.module
    vec_ptr = vec.as_pointer()
    masked_load = cgutils.get_or_insert_function(
        module, ir.FunctionType(vec, [vec_ptr, _I32, mask, vec]), f"llvm.masked.load.v{lanes}f32.p0")
    masked_store = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VoidType(), [vec, vec_ptr, _I32, mask]), f"llvm.masked.store.v{lanes}f32.p0")
    lane_ids = ir.Constant(lane_vec, list(range(lanes)))
    zero = ir.Constant(vec, [0.0] * lanes)
    align = ir.Constant(_I32, 4)
    masks = []
    for v in range(len(results[0])):
        remaining = builder.sub(cols_v, _const(v * lanes))
        splat = builder.shuffle_vector(
            builder.insert_element(ir.Constant(lane_vec, ir.Undefined), remaining, ir.Constant(_I32, 0)),
            ir.Constant(lane_vec, ir.Undefined), ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
        masks.append(builder.icmp_signed("<", lane_ids, splat))
    for i, (c_row, row) in enumerate(zip(c_rows, results)):
        with builder.if_then(builder.icmp_signed("<", _const(i), rows_v)):
            for v, value in enumerate(row):
                ptr = _vector_ptr(builder, c_row, v, lanes)
                old = builder.call(masked_load, [ptr, align, masks[v], zero])
                value = builder.select(acc_flag, builder.fadd(old, value), value)
                builder.call(masked_store, [value, ptr, align, masks[v]])
