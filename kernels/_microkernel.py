"""Register-tiled GEMM micro-kernels emitted directly as LLVM IR through Numba intrinsics.

Written as plain Numba loops, the MR x NR accumulator tile lives in memory (Numba arrays may alias, so
LLVM cannot promote it to registers).  Here the accumulators are SSA vector values carried around the k
loop by phi nodes, so the register allocator keeps all of them in zmm registers and each k step is
NR/16 vector loads of packed B, MR broadcasts of packed A, and MR*NR/16 FMAs.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # float32 lanes of a zmm register


def make_microkernel(mr, nr):
    """Return an intrinsic kernel(a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate).

    a: A panel, element (i, p) at a[a_off + i*a_row_step + p*a_k_step] (packed: a_row_step=1,
    a_k_step=mr; straight from a row-major matrix: a_row_step=lda, a_k_step=1); b: B panel, (p, j) at
    b[b_off + p*ldb + j] (ldb = nr when packed); c: flat output, (i, j) at c[c_off + i*ldc + j].  Computes the mr x nr product
    over kc steps and stores it (accumulate=False) or adds it (accumulate=True) into c.
    """
    if nr % LANES:
        raise ValueError(f"nr must be a multiple of {LANES}")
    vectors = nr // LANES

    @intrinsic
    def kernel(typingctx, a, a_off, a_row_step, a_k_step, b, b_off, ldb, c, c_off, ldc, kc, accumulate):
        for arr in (a, b, c):
            if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
                return None
        sig = types.void(a, types.int64, types.int64, types.int64, b, types.int64, types.int64, c, types.int64, types.int64, types.int64,
                         types.boolean)

        def codegen(context, builder, signature, args):
            a_arr, a_off_v, a_row_v, a_k_v, b_arr, b_off_v, ldb_v, c_arr, c_off_v, ldc_v, kc_v, acc_flag = args
            f32 = ir.FloatType()
            i64 = ir.IntType(64)
            vec = ir.VectorType(f32, LANES)
            a_data = context.make_array(signature.args[0])(context, builder, a_arr).data
            b_data = context.make_array(signature.args[4])(context, builder, b_arr).data
            c_data = context.make_array(signature.args[7])(context, builder, c_arr).data
            a_base = builder.gep(a_data, [a_off_v])
            a_rows = [builder.gep(a_base, [builder.mul(ir.Constant(i64, i), a_row_v)]) for i in range(mr)]
            b_base = builder.gep(b_data, [b_off_v])
            c_base = builder.gep(c_data, [c_off_v])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 "llvm.fma.v16f32")
            zero = ir.Constant(vec, [0.0] * LANES)
            undef_vec = ir.Constant(vec, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)

            # The C tile is touched only after the k loop: start pulling its lines in now so the
            # final load/add/store does not stall on L2/L3 (rw=1: will be written, locality=3).
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(ir.IntType(8)), ir.IntType(32),
                                                                ir.IntType(32), ir.IntType(32)]),
                "llvm.prefetch.p0")
            i32 = ir.IntType(32)
            for i in range(mr):
                c_row = builder.gep(c_base, [builder.mul(ir.Constant(i64, i), ldc_v)])
                for v in range(0, vectors, 64 // (LANES * 4) or 1):
                    line = builder.gep(c_row, [ir.Constant(i64, v * LANES)])
                    builder.call(prefetch, [builder.bitcast(line, ir.PointerType(ir.IntType(8))),
                                            ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])

            entry = builder.basic_block
            loop = builder.append_basic_block("mk.loop")
            done = builder.append_basic_block("mk.done")
            has_work = builder.icmp_signed(">", kc_v, ir.Constant(i64, 0))
            builder.cbranch(has_work, loop, done)

            builder.position_at_end(loop)
            p = builder.phi(i64, "p")
            p.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for i in range(mr):
                row = []
                for v in range(vectors):
                    phi = builder.phi(vec, f"acc{i}_{v}")
                    phi.add_incoming(zero, entry)
                    row.append(phi)
                accs.append(row)
            b_row = builder.gep(b_base, [builder.mul(p, ldb_v)])
            b_vecs = []
            for v in range(vectors):
                ptr = builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * LANES)]), vec.as_pointer())
                b_vecs.append(builder.load(ptr, align=4))
            a_step = builder.mul(p, a_k_v)
            new_accs = []
            for i in range(mr):
                a_val = builder.load(builder.gep(a_rows[i], [a_step]), align=4)
                a_splat = builder.shuffle_vector(builder.insert_element(undef_vec, a_val, ir.Constant(ir.IntType(32), 0)),
                                                undef_vec, splat_mask)
                new_accs.append([builder.call(fma, [a_splat, b_vecs[v], accs[i][v]]) for v in range(vectors)])
            p_next = builder.add(p, ir.Constant(i64, 1))
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
                    phi = builder.phi(vec)
                    phi.add_incoming(zero, entry)
                    phi.add_incoming(new_accs[i][v], loop_end)
                    row.append(phi)
                results.append(row)
            with builder.if_else(acc_flag) as (then_add, then_store):
                with then_add:
                    _store_tile(builder, c_base, ldc_v, results, vec, add=True)
                with then_store:
                    _store_tile(builder, c_base, ldc_v, results, vec, add=False)
            return context.get_dummy_value()

        return sig, codegen

    kernel.mr = mr
    kernel.nr = nr
    return kernel


def _store_tile(builder, c_base, ldc, results, vec, add):
    i64 = ir.IntType(64)
    for i, row in enumerate(results):
        c_row = builder.gep(c_base, [builder.mul(ir.Constant(i64, i), ldc)])
        for v, value in enumerate(row):
            ptr = builder.bitcast(builder.gep(c_row, [ir.Constant(i64, v * LANES)]), vec.as_pointer())
            if add:
                value = builder.fadd(builder.load(ptr, align=4), value)
            builder.store(value, ptr, align=4)
