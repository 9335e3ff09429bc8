"""Register-tiled GEMM micro-kernels emitted directly as LLVM IR through Numba intrinsics.

Written as plain Numba loops, the MR x NR accumulator tile lives in memory (Numba arrays may alias, so
LLVM cannot promote it to registers).  Here the accumulators are SSA vector values carried around the k
loop by phi nodes, so the register allocator keeps all of them in vector registers and each k step is
NR/lanes vector loads of B, MR broadcasts of A and MR*NR/lanes FMAs.  The vector width is a parameter
(isa.py picks it and a tile that fits the register file); tests/test_kernels.py checks the k loop's
assembly: vbroadcastss / vmovups / vfmadd231ps on zmm (AVX-512) or ymm (AVX2) registers, no spills.

The tile's skeleton is shared with the int8 / bf16 kernels (qgemm/codegen.py): `k_loop` carries the
accumulators around the k loop and `store_tile` writes them (whole tile, or the ragged edge masked); each
kernel supplies its own k step (how B and A are loaded and combined into the accumulators).

Numba's on-disk cache (cache=True) is keyed on the source file of each jitted *caller*, so after editing
this file delete kernels/__pycache__/*.nbi and *.nbc (and kernels/qgemm/__pycache__/), or the callers
keep their old machine code.
"""
from itertools import count

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
_I1 = ir.IntType(1)
_I8P = ir.PointerType(ir.IntType(8))
FLOATS_PER_LINE = 16  # float32 per 64-byte cache line


def int64(value):
    return ir.Constant(I64, value)


def splat(builder, value, vec_type):
    """A vector of vec_type with every lane `value`."""
    undef = ir.Constant(vec_type, ir.Undefined)
    lanes = ir.Constant(ir.VectorType(I32, vec_type.count), [0] * vec_type.count)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(I32, 0)), undef, lanes)


def row_pointers(builder, data, offset, rows, stride):
    """Pointers to data[offset + i*stride] for i in range(rows): a tile's rows of A or C."""
    base = builder.gep(data, [offset])
    return [builder.gep(base, [builder.mul(int64(i), stride)]) for i in range(rows)]


def vector_ptr(builder, row_ptr, v, lanes, element=F32):
    """Pointer to the v-th <lanes x element> vector from row_ptr."""
    return builder.bitcast(builder.gep(row_ptr, [int64(v * lanes)]), ir.VectorType(element, lanes).as_pointer())


def full_tile(builder, rows, cols, mr, nr):
    """i1: the whole mr x nr tile is stored (rows >= mr and cols >= nr)."""
    return builder.and_(builder.icmp_signed(">=", rows, int64(mr)), builder.icmp_signed(">=", cols, int64(nr)))


def k_loop(builder, steps, zero, mr, vectors, load_b, load_a, update, unroll=True):
    """Emit `for p in range(steps)` over an mr x vectors tile of accumulators, each starting at `zero` and
    carried by phi nodes (so they live in registers).  Step p: b = load_b(p) (the step's `vectors` B
    operands), then per row i: a = load_a(p, i) and acc[i][v] = update(acc[i][v], a, b[v]).  Returns the
    accumulators after the loop ([row][vector], zero when steps <= 0); the builder is left after the loop.

    unroll=False marks the loop llvm.loop.unroll.disable, for kernels whose unrolled body (accumulators,
    B vectors and A broadcasts of two steps) no longer fits the register file: LLVM would spill every step.
    """
    entry = builder.basic_block
    loop = builder.append_basic_block("k.loop")
    done = builder.append_basic_block("k.done")
    builder.cbranch(builder.icmp_signed(">", steps, int64(0)), loop, done)

    builder.position_at_end(loop)
    p = builder.phi(I64, "p")
    p.add_incoming(int64(0), entry)
    accs = []
    for i in range(mr):
        row = []
        for v in range(vectors):
            phi = builder.phi(zero.type, f"acc{i}_{v}")
            phi.add_incoming(zero, entry)
            row.append(phi)
        accs.append(row)
    b_vecs = load_b(p)
    new_accs = []
    for i in range(mr):
        a_val = load_a(p, i)
        new_accs.append([update(accs[i][v], a_val, b_vecs[v]) for v in range(vectors)])
    p_next = builder.add(p, int64(1))
    loop_end = builder.basic_block
    p.add_incoming(p_next, loop_end)
    for i in range(mr):
        for v in range(vectors):
            accs[i][v].add_incoming(new_accs[i][v], loop_end)
    back_edge = builder.cbranch(builder.icmp_signed("<", p_next, steps), loop, done)
    if not unroll:
        _no_unroll(builder.module, back_edge)

    builder.position_at_end(done)
    results = []
    for i in range(mr):  # the phi nodes first: LLVM wants them at the top of the block
        row = []
        for v in range(vectors):
            phi = builder.phi(zero.type)
            phi.add_incoming(zero, entry)
            phi.add_incoming(new_accs[i][v], loop_end)
            row.append(phi)
        results.append(row)
    return results


_loop_ids = count()


def _no_unroll(module, branch):
    disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    loop_id = module.add_metadata([ir.MetaDataString(module, f"vitnp.k.{next(_loop_ids)}"), disable])
    loop_id.operands = (loop_id, disable)  # a loop ID refers to itself
    branch.set_metadata("llvm.loop", loop_id)


def store_tile(builder, c_rows, values, lanes, add, rows, cols, whole):
    """Store (add=False) or add (add=True) the float32 tile `values` ([row][vector]) into the rows `c_rows`:
    all of it when `whole`, else only rows below `rows` and lanes below `cols`."""
    with builder.if_else(whole, likely=True) as (then_whole, then_ragged):
        with then_whole:
            with builder.if_else(add) as (then_add, then_store):
                with then_add:
                    _store_full(builder, c_rows, values, lanes, add=True)
                with then_store:
                    _store_full(builder, c_rows, values, lanes, add=False)
        with then_ragged:
            _store_ragged(builder, c_rows, values, lanes, add, rows, cols)


def _store_full(builder, c_rows, values, lanes, add):
    for c_row, row in zip(c_rows, values):
        for v, value in enumerate(row):
            ptr = vector_ptr(builder, c_row, v, lanes)
            if add:
                value = builder.fadd(builder.load(ptr, align=4), value)
            builder.store(value, ptr, align=4)


def _store_ragged(builder, c_rows, values, lanes, add, rows, cols):
    """Masked loads and stores (AVX-512 mask registers, AVX2 vmaskmovps, element by element on SSE): nothing
    outside the rows x cols corner is touched."""
    vec = ir.VectorType(F32, lanes)
    mask = ir.VectorType(_I1, lanes)
    lane_vec = ir.VectorType(I64, lanes)
    module = builder.module
    vec_ptr = vec.as_pointer()
    masked_load = cgutils.get_or_insert_function(
        module, ir.FunctionType(vec, [vec_ptr, I32, mask, vec]), f"llvm.masked.load.v{lanes}f32.p0")
    masked_store = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VoidType(), [vec, vec_ptr, I32, mask]), f"llvm.masked.store.v{lanes}f32.p0")
    lane_ids = ir.Constant(lane_vec, list(range(lanes)))
    zero = ir.Constant(vec, [0.0] * lanes)
    align = ir.Constant(I32, 4)
    masks = [builder.icmp_signed("<", lane_ids, splat(builder, builder.sub(cols, int64(v * lanes)), lane_vec))
             for v in range(len(values[0]))]
    for i, (c_row, row) in enumerate(zip(c_rows, values)):
        with builder.if_then(builder.icmp_signed("<", int64(i), rows)):
            for v, value in enumerate(row):
                ptr = vector_ptr(builder, c_row, v, lanes)
                old = builder.call(masked_load, [ptr, align, masks[v], zero])
                value = builder.select(add, builder.fadd(old, value), value)
                builder.call(masked_store, [value, ptr, align, masks[v]])


def _prefetch(builder, ptr, write, locality):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8P, I32, I32, I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, _I8P), ir.Constant(I32, write), ir.Constant(I32, locality),
                      ir.Constant(I32, 1)])


def make_microkernel(mr, nr, lanes, prefetch_b=False):
    """Return an intrinsic
        kernel(a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate, rows, cols
               [, pf_off, pf_shift if prefetch_b])

    a: A panel, element (i, p) at a[a_off + i*a_row_step + p*a_k_step] (packed panels: a_row_step=1,
    a_k_step=mr); b: B panel, (p, j) at b[b_off + p*ldb + j] (ldb = nr when packed); c: flat output,
    (i, j) at c[c_off + i*ldc + j].  Computes the mr x nr product over kc steps and stores
    (accumulate=False) or adds (accumulate=True) its first `rows` rows and `cols` columns into c; a
    ragged tile is written with masked stores, so nothing outside it is touched.  With prefetch_b, step p
    of the k loop also prefetches (into L2) the cache line at b[pf_off + (p >> pf_shift) * 16]: callers
    point it at the B panel they will need next, spreading its DRAM fetch over the current panel's
    compute.  All of A's mr rows and B's nr columns are read, so panels must be padded (zeros) to full size.
    """
    if nr % lanes:
        raise ValueError(f"nr must be a multiple of the vector width {lanes}")
    vectors = nr // lanes
    vec = ir.VectorType(F32, lanes)

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
        a_arr, a_off, a_row_step, a_k_step, b_arr, b_off, ldb, c_arr, c_off, ldc, kc, accumulate, rows, cols = \
            args[:14]
        data = lambda i, value: context.make_array(signature.args[i])(context, builder, value).data  # noqa: E731
        a_data, b_data, c_data = data(0, a_arr), data(4, b_arr), data(7, c_arr)
        a_rows = row_pointers(builder, a_data, a_off, mr, a_row_step)
        b_base = builder.gep(b_data, [b_off])
        c_rows = row_pointers(builder, c_data, c_off, mr, ldc)
        whole = full_tile(builder, rows, cols, mr, nr)

        # The C tile is touched only after the k loop: start pulling its lines in now so the final
        # load/add/store does not stall on L2/L3 (rw=1: will be written, locality=3).
        with builder.if_then(whole, likely=True):
            for c_row in c_rows:
                for offset in range(0, nr, FLOATS_PER_LINE):
                    _prefetch(builder, builder.gep(c_row, [int64(offset)]), write=1, locality=3)

        # fmuladd: one FMA instruction where the ISA has it (AVX2, AVX-512), mul + add where it does not
        # (llvm.fma would become a libm call per lane on plain SSE2).
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                             f"llvm.fmuladd.v{lanes}f32")

        def load_b(p):
            if prefetch_b:
                pf_off, pf_shift = args[14:]
                line = builder.add(pf_off, builder.mul(builder.ashr(p, pf_shift), int64(FLOATS_PER_LINE)))
                _prefetch(builder, builder.gep(b_data, [line]), write=0, locality=2)
            b_row = builder.gep(b_base, [builder.mul(p, ldb)])
            return [builder.load(vector_ptr(builder, b_row, v, lanes), align=4) for v in range(vectors)]

        def load_a(p, i):
            return splat(builder, builder.load(builder.gep(a_rows[i], [builder.mul(p, a_k_step)]), align=4), vec)

        def update(acc, a, b):
            return builder.call(fma, [a, b, acc])

        results = k_loop(builder, kc, ir.Constant(vec, [0.0] * lanes), mr, vectors, load_b, load_a, update)
        store_tile(builder, c_rows, results, lanes, accumulate, rows, cols, whole)
        return context.get_dummy_value()

    kernel.mr = mr
    kernel.nr = nr
    kernel.lanes = lanes
    return kernel
