"""The AMX micro-kernels (kinds amx-bf16, amx-int8): tile GEMM over the packed weight, with the AVX-512
kernels' fused epilogue.

Tile registers (the palette-1 configuration, `configure`, every tile 16 rows x 64 bytes):
  tmm0..3   accumulators: output rows 16*mt.., columns 16*nt.. (mt, nt in 0..1), float32 (bf16) or int32 (int8)
  tmm4, 5   A: 16 activation rows x 64 bytes (32 bf16 or 64 u8 k values), read from the row-major A operand
  tmm6, 7   B: 16 k groups x 16 columns x one group (2 bf16 or 4 int8: the VNNI pairs / quadruples)
The packed weight's panel layout (pack.py: panel of NR = 32 columns, group p, column c at (p*NR + c)*group)
already is the tile layout: B tile (step s, half nt) is 16 consecutive groups of the panel, starting at
column 16*nt, one tile row every NR*group elements.  The AMX kinds pad k to whole tiles (kinds.K_ALIGN) and
A's rows to MR (32), so every tile load reads initialised memory.

Per call (a 32 x 32 or 16 x 32 block, the whole k): tilezero the accumulators; per k step two A and two B
tile loads and four tdpbf16ps / tdpbusd; then tilestored64 into a stack scratch C, from which the epilogue
(codegen.fused_epilogue: bias, dequantisation with the row scales, zero points and column sums) and the
store (or residual add, or the masked ragged edge) run exactly as in the AVX-512 kernels.  The driver loads
the tile configuration once per task (`configure`) and releases the tiles after it (`release`).

The AMX instructions use LLVM's non-internal intrinsics (tile numbers as immediates; llvm.x86.tileloadd64,
tdpbf16ps, tdpbusd, tilestored64, tilezero, ldtilecfg, tilerelease).  `emit_*` build the IR into any
llvmlite builder, so tests compile exactly this IR for an AMX target on any machine; the Numba intrinsics
type only where the code generator's CPU has the AMX features (else calling them is a typing error, never a
crash in LLVM).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import amx, isa
from .._microkernel import F32, I32, full_tile, int64, row_pointers, store_tile, vector_ptr
from .codegen import LANES, NR, fused_epilogue, operand_kind
from .kinds import AMX_KINDS, GROUP, INT8_KINDS, TILE_BYTES, TILE_ROWS

MR = 2 * TILE_ROWS  # rows per call (two accumulator tile rows)
M_TILE_VARIANTS = (2, 1)  # accumulator tile rows of the kernels: 32 rows, and 16 for a short last panel
N_TILES = NR // TILE_ROWS  # accumulator tile columns (NR = 32: two; 16 float32 per tile row)
ACC, A_TILE, B_TILE = 0, 4, 6  # first tile register of each role
_I8 = ir.IntType(8)
_VOID = ir.VoidType()
_I8P = _I8.as_pointer()
_I64 = ir.IntType(64)
INSTRUCTION = {"amx-bf16": "tdpbf16ps", "amx-int8": "tdpbusd"}  # u8 activations x s8 weights, as vnni
# the functions emit_tile_kernel calls per tile operation: LLVM's AMX intrinsics (a test substitutes functions
# of the same signatures that emulate them, to run the kernel's own addressing and epilogue on any CPU)
INTRINSICS = {name: f"llvm.x86.{name}" for name in ("tileloadd64", "tilestored64", "tilezero", "tdpbf16ps",
                                                     "tdpbusd")}


def tile_config() -> bytes:
    """The 64-byte ldtilecfg operand: palette 1, tiles 0..7 of 16 rows x 64 bytes."""
    cfg = bytearray(64)
    cfg[0] = 1  # palette
    for t in range(8):
        cfg[16 + 2 * t:18 + 2 * t] = TILE_BYTES.to_bytes(2, "little")  # colsb
        cfg[48 + t] = TILE_ROWS  # rows
    return bytes(cfg)


def _function(builder, name, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VOID, args), name)


def _tile(t):
    return ir.Constant(_I8, t)


def emit_configure(builder):
    """ldtilecfg of tile_config() (from a stack copy)."""
    cfg_type = ir.ArrayType(_I8, 64)
    slot = cgutils.alloca_once(builder, cfg_type)
    builder.store(ir.Constant(cfg_type, bytearray(tile_config())), slot)
    builder.call(_function(builder, "llvm.x86.ldtilecfg", [_I8P]), [builder.bitcast(slot, _I8P)])


def emit_release(builder):
    builder.call(_function(builder, "llvm.x86.tilerelease", []), [])


def emit_tile_kernel(builder, kind, m_tiles, a_data, a_off, lda, b_data, b_off, c_data, c_off, ldc, groups,
                     rows, cols, add, rs_data, rzp_data, r_off, cs_data, colsum_data, bias_data, n_off,
                     intrinsics=INTRINSICS):
    """The m_tiles*16 x NR block (arguments as qgemm.make_qkernel's, as LLVM values: element pointers, i64
    offsets and strides in elements, groups a multiple of 16); the tile configuration must be loaded."""
    g = GROUP[kind]
    a_item = 2 if kind == "amx-bf16" else 1  # bytes per A / B element
    load = _function(builder, intrinsics["tileloadd64"], [_I8, _I8P, _I64])
    store = _function(builder, intrinsics["tilestored64"], [_I8, _I8P, _I64])
    zero = _function(builder, intrinsics["tilezero"], [_I8])
    dot = _function(builder, intrinsics[INSTRUCTION[kind]], [_I8, _I8, _I8])
    acc_type = I32 if kind in INT8_KINDS else F32
    rows_out = m_tiles * TILE_ROWS

    scratch_type = ir.ArrayType(acc_type, rows_out * NR)
    scratch = builder.bitcast(cgutils.alloca_once(builder, scratch_type), acc_type.as_pointer())
    a_base = builder.gep(a_data, [a_off])
    b_base = builder.gep(b_data, [b_off])
    a_stride = builder.mul(lda, int64(a_item))  # bytes between A rows
    b_stride = int64(NR * g * a_item)           # bytes between B tile rows (k groups)

    def byte_ptr(base, offset):
        return builder.bitcast(builder.gep(base, [offset]), _I8P)

    for t in range(m_tiles * N_TILES):
        builder.call(zero, [_tile(ACC + t)])
    steps = builder.sdiv(groups, int64(TILE_ROWS))
    entry = builder.basic_block
    loop = builder.append_basic_block("tile.k")
    done = builder.append_basic_block("tile.done")
    builder.cbranch(builder.icmp_signed(">", steps, int64(0)), loop, done)
    builder.position_at_end(loop)
    s = builder.phi(_I64, "s")
    s.add_incoming(int64(0), entry)
    a_k = builder.mul(s, int64(TILE_ROWS * g))          # k offset of the step in A's row
    b_k = builder.mul(s, int64(TILE_ROWS * NR * g))     # the step's first group in the panel
    for mt in range(m_tiles):
        a_row = builder.mul(lda, int64(mt * TILE_ROWS))
        builder.call(load, [_tile(A_TILE + mt), byte_ptr(a_base, builder.add(a_row, a_k)), a_stride])
    for nt in range(N_TILES):
        builder.call(load, [_tile(B_TILE + nt), byte_ptr(b_base, builder.add(b_k, int64(nt * TILE_ROWS * g))),
                            b_stride])
    for mt in range(m_tiles):
        for nt in range(N_TILES):
            builder.call(dot, [_tile(ACC + mt * N_TILES + nt), _tile(A_TILE + mt), _tile(B_TILE + nt)])
    s_next = builder.add(s, int64(1))
    s.add_incoming(s_next, builder.basic_block)
    builder.cbranch(builder.icmp_signed("<", s_next, steps), loop, done)
    builder.position_at_end(done)

    c_stride = int64(NR * 4)  # bytes between scratch rows
    for mt in range(m_tiles):
        for nt in range(N_TILES):
            offset = int64(mt * TILE_ROWS * NR + nt * TILE_ROWS)
            builder.call(store, [_tile(ACC + mt * N_TILES + nt), byte_ptr(scratch, offset), c_stride])
    vectors = NR // LANES
    accs = [[builder.load(vector_ptr(builder, builder.gep(scratch, [int64(i * NR)]), v, LANES, acc_type),
                          align=4)
             for v in range(vectors)] for i in range(rows_out)]
    values = fused_epilogue(builder, kind, accs, rs_data, rzp_data, r_off, cs_data, colsum_data, bias_data,
                            n_off, LANES)
    c_rows = row_pointers(builder, c_data, c_off, rows_out, ldc)
    store_tile(builder, c_rows, values, LANES, add, rows, cols, full_tile(builder, rows, cols, rows_out, NR))


def targets_amx(kind) -> bool:
    """Whether Numba's code generator in this process targets a CPU with kind's AMX instructions: the host's
    features, or those of an explicitly configured target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, which lets a
    test compile the AMX driver for an AMX CPU on any machine without running it)."""
    import numba

    precision = next(p for p, k in AMX_KINDS.items() if k == kind)
    if numba.config.CPU_NAME and not isa.FORCED:
        features = (numba.config.CPU_FEATURES or "").split(",")
        return all(f"+{feature}" in features for feature in amx.FEATURES[precision])
    return amx.cpu_has(precision)


_KIND_BY_DTYPES = {(types.uint8, types.int8): "amx-int8", (types.uint16, types.uint16): "amx-bf16"}


def make_tile_kernel(m_tiles):
    """kernel(a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add, rscale, rzp, r_off, cscale,
    colsum, bias, n_off): qgemm.make_qkernel's call for the AMX kinds (by A / B dtypes), m_tiles*16 rows."""

    @intrinsic
    def kernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, groups, rows, cols, add,
               rscale, rzp, r_off, cscale, colsum, bias, n_off):
        kind = operand_kind(_KIND_BY_DTYPES, a, b, c, rscale, rzp, cscale, colsum, bias)
        if kind is None or not targets_amx(kind):
            return None
        i64 = types.int64
        sig = types.void(a, i64, i64, b, i64, c, i64, i64, i64, i64, i64, types.boolean,
                         rscale, rzp, i64, cscale, colsum, bias, i64)

        def codegen(context, builder, sig, args):
            arrays_at = (0, 3, 5, 12, 13, 15, 16, 17)
            values = list(args)
            for i in arrays_at:
                values[i] = context.make_array(sig.args[i])(context, builder, args[i]).data
            emit_tile_kernel(builder, kind, m_tiles, *values)
            return context.get_dummy_value()

        return sig, codegen

    kernel.mr = m_tiles * TILE_ROWS
    return kernel


@intrinsic
def configure(typingctx):
    """Load the tile configuration (ldtilecfg): once per task, before its tile kernels."""
    if not (targets_amx("amx-bf16") or targets_amx("amx-int8")):
        return None

    def codegen(context, builder, sig, args):
        emit_configure(builder)
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def release(typingctx):
    """Release the tiles (tilerelease) after a task."""
    if not (targets_amx("amx-bf16") or targets_amx("amx-int8")):
        return None

    def codegen(context, builder, sig, args):
        emit_release(builder)
        return context.get_dummy_value()
    return types.void(), codegen


tile_kernel = make_tile_kernel(2)
tile_kernel_short = make_tile_kernel(1)
