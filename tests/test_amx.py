"""AMX (kinds amx-bf16, amx-int8): detection, the tile permission, the packed tile layout and blocking (by a
NumPy emulation of the tile instructions), and the kernels' machine code for an AMX CPU, all on any x86
machine; the kernels' results where the CPU has AMX (elsewhere those tests are skipped: they did not run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitnp.kernels import amx, isa, qgemm
from vitnp.kernels.elementwise import gelu_inplace_serial
from vitnp.kernels.qgemm import kinds, tiles

from test_precision import ROOT, ref_bf16, ref_linear

AMX_FEATURES = "+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512vnni,+avx512bf16,+avx2,+fma,+amx-tile,+amx-bf16,+amx-int8"
PRECISION = {kind: precision for precision, kind in kinds.AMX_KINDS.items()}
TWIN = {"amx-int8": "vnni", "amx-bf16": "dpbf16"}  # the AVX-512 kind with the same operands and math
AMX_KIND_LIST = sorted(PRECISION)
needs_amx = pytest.mark.skipif(not (amx.usable("bf16") and amx.usable("int8")),
                               reason="did not run: " + (amx.status("int8")[1] if amx.usable("bf16")
                                                                 else amx.status("bf16")[1]))
needs_avx512 = pytest.mark.skipif(isa.ISA != "avx512" or not isa.is_x86(),
                                  reason="the AMX kinds' panels are the AVX-512 build's (NR = 32)")


def pack(w, b, kind):
    return (qgemm.pack_int8 if kind in qgemm.INT8_KINDS else qgemm.pack_bf16)(w, b, kind)


def reference(x, w, b, kind, epilogue, out0):
    """float64 result of the math an AMX kind performs: its AVX-512 twin's (same operands, exact products)."""
    return ref_linear(x, w, b, TWIN[kind], epilogue, out0)


def check_amx(kind, shapes, seed=0):
    """test_precision.check_kind for an AMX kind: every epilogue, with and without bias, relative error 2e-6."""
    rng = np.random.default_rng(seed)
    for m, k, n in shapes:
        x = rng.standard_normal((m, k)).astype(np.float32) * 2 + 0.3
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        for with_bias in (False, True):
            b = rng.standard_normal(n).astype(np.float32) if with_bias else None
            weight = pack(w, b, kind)
            for epilogue in ("none", "gelu", "add"):
                out0 = rng.standard_normal((m, n)).astype(np.float32)
                out = out0.copy()
                qgemm.qgemm(x, weight, out, epilogue)
                ref = reference(x, w, b, kind, epilogue, out0)
                err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
                assert err <= 2e-6, f"{kind} {m}x{k}x{n} bias={with_bias} {epilogue}: relative error {err:.3g}"


# -- detection and the tile permission (the real CPU flags and the real syscall) -----------------------------


def test_permission_is_requested_once_and_answered():
    first = amx.request_tile_permission()
    assert amx.request_tile_permission() is first  # one request per process, its answer kept
    if amx.cpu_has("bf16") or amx.cpu_has("int8"):
        assert first.granted, first.reason  # an AMX CPU under a Linux that grants the tile state (>= 5.16)
    else:  # the real arch_prctl on a CPU without AMX: refused, and the reason says so
        assert not first.granted
        assert re.search(r"Linux refused the AMX tile state: arch_prctl\(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA\) "
                         r"failed with E[A-Z]+ \(.+\)", first.reason), first.reason


def test_detection_follows_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    for precision, (tile, instructions) in amx.FEATURES.items():
        llvm = isa.has(tile) and isa.has(instructions)
        assert amx.cpu_has(precision) == (llvm and isa.ISA == "avx512")
        if flags:  # LLVM's host features agree with the kernel's CPU flags
            assert llvm == bool(re.search(rf"\b{tile.replace('-', '_')}\b", flags)
                                and re.search(rf"\b{instructions.replace('-', '_')}\b", flags))
        usable, reason = amx.status(precision)
        assert usable == (amx.cpu_has(precision) and amx.request_tile_permission().granted)
        kind = kinds.AMX_KINDS[precision]
        assert (kind in qgemm.supported_kinds()) == usable
        if not usable:
            assert qgemm.KIND[precision] != kind
            assert qgemm.REASON[precision] == f"AMX not used: {reason}"
            if not amx.cpu_has(precision):
                assert "has no AMX" in reason or "forced" in reason
        else:
            assert qgemm.KIND[precision] == kind


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_forcing_amx(precision):
    variable, preferred, fallback = kinds.CHOICES[precision]
    kind = kinds.AMX_KINDS[precision]
    for value in ("amx", kind, "AMX"):
        if amx.usable(precision):
            assert kinds.choose(precision, {variable: value}) == kind
        else:
            with pytest.raises(isa.IsaError, match=rf"^{variable}={value.lower()}: not available: "
                                                   + re.escape(amx.status(precision)[1])):
                kinds.choose(precision, {variable: value})
    # the AVX-512 kind stays selectable on an AMX machine (to measure both there)
    if preferred in qgemm.supported_kinds():
        assert kinds.choose(precision, {variable: preferred}) == preferred
    assert kinds.choose(precision, {variable: fallback}) == fallback
    with pytest.raises(isa.IsaError, match=f"is not one of {preferred}, {fallback}, amx"):
        kinds.choose(precision, {variable: "tiles"})


@pytest.mark.skipif(amx.usable("bf16"), reason="this CPU runs AMX bf16: forcing it is no error here")
def test_forcing_amx_without_it_is_one_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VITNP_ISA", "VITNP_INT8", "VITNP_BF16"))}
    env["VITNP_BF16_KERNEL"] = "amx"
    run = subprocess.run([sys.executable, "-c", "import vitnp.kernels.qgemm"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == f"vitnp.kernels.isa.IsaError: VITNP_BF16_KERNEL=amx: not available: {amx.status('bf16')[1]}"


# -- the tile layout and blocking, by emulating the tile instructions in NumPy ---------------------------------


def tile_load(buffer, byte_offset, stride):
    """tileloadd: 16 rows of 64 bytes, row r at byte_offset + r * stride."""
    raw = buffer.view(np.uint8)
    return np.stack([raw[byte_offset + r * stride:byte_offset + r * stride + kinds.TILE_BYTES]
                     for r in range(kinds.TILE_ROWS)])


def tdpbf16ps(c, a, b):
    """c (16, 16) float32 += a (16 rows x 32 bf16) . b (16 pairs x 16 columns x 2 bf16), as the SDM specifies:
    per pair k, the two products (exact in float32) added into c one after the other, float32 rounding."""
    widen = lambda bits: (bits.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    a = widen(a.view(np.uint16)).reshape(16, 16, 2)
    b = widen(b.view(np.uint16)).reshape(16, 16, 2)
    for k in range(16):
        for t in range(2):
            c += a[:, k, t][:, None] * b[k, :, t][None, :]
    return c


def tdpbusd(c, a, b):
    """c (16, 16) int32 += a (16 rows x 64 u8) . b (16 quadruples x 16 columns x 4 s8), exact int32 sums."""
    a = a.view(np.uint8).reshape(16, 16, 4).astype(np.int64)
    b = b.view(np.int8).reshape(16, 16, 4).astype(np.int64)
    return (c + np.einsum("mkt,knt->mn", a, b)).astype(np.int32)


def emulate_qgemm(x, weight, out, epilogue):
    """qgemm's AMX path with every tile instruction emulated: the same operands (prepare_a, the packed
    weight), the same blocks of tiles.MR rows and NR columns, the same byte addresses and strides
    (tiles.py), the same float32 epilogue."""
    kind = weight.kind
    a, rscale, rzp = qgemm.prepare_a(x, kind)
    rows, n = x.shape[0], weight.out_features
    g, item = weight.group, a.itemsize
    lda = a.shape[1]
    assert a.shape[0] % tiles.MR == 0 and lda % (kinds.TILE_ROWS * g) == 0 and weight.groups % kinds.TILE_ROWS == 0
    packed, nr, steps = weight.packed, qgemm.NR, weight.groups // kinds.TILE_ROWS
    integer = kind in qgemm.INT8_KINDS
    acc_dtype = np.int32 if integer else np.float32
    dot = tdpbusd if integer else tdpbf16ps
    result = np.empty((a.shape[0], -(-n // nr) * nr), np.float32)
    for col in range(0, n, nr):
        b_off = (col // nr) * weight.groups * nr * g
        for row in range(0, rows, tiles.MR):
            m_tiles = 2 if rows - row > kinds.TILE_ROWS else 1
            acc = np.zeros((m_tiles, tiles.N_TILES, 16, 16), acc_dtype)
            for s in range(steps):
                a_tiles = [tile_load(a.reshape(-1), ((row + 16 * mt) * lda + s * 16 * g) * item, lda * item)
                           for mt in range(m_tiles)]
                b_tiles = [tile_load(packed, (b_off + s * 16 * nr * g + nt * 16 * g) * item, nr * g * item)
                           for nt in range(tiles.N_TILES)]
                for mt in range(m_tiles):
                    for nt in range(tiles.N_TILES):
                        acc[mt, nt] = dot(acc[mt, nt], a_tiles[mt], b_tiles[nt])
            block = acc.transpose(0, 2, 1, 3).reshape(16 * m_tiles, nr)  # the scratch C: rows x NR
            r = slice(row, row + 16 * m_tiles)
            cols = slice(col, col + nr)
            if integer:
                block = (block - rzp[r, None] * weight.colsum[None, cols]).astype(np.float32)
                block = block * (rscale[r, None] * weight.cscale[None, cols]) + weight.bias[None, cols]
            else:
                block = block + weight.bias[None, cols]
            result[r, cols] = block
    value = result[:rows, :n]
    if epilogue == "add":
        out += value
    else:
        out[:] = value
        if epilogue == "gelu":
            for i in range(rows):
                gelu_inplace_serial(out[i])


SHAPES = [(1, 8, 5), (5, 48, 48), (17, 80, 144), (37, 770, 70), (64, 200, 33)]


@needs_avx512
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_tile_layout_round_trip(kind):
    """The packed weight is exact (unpack inverts it) and each B tile holds the k groups and columns the
    instructions expect: tile row p, column c, element t = weight[col0 + c, k0 + group*p + t]."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((70, 150)) * 0.1).astype(np.float32)
    weight = pack(w, None, kind)
    assert weight.groups * weight.group == kinds.padded_k(kind, 150) and weight.groups % kinds.TILE_ROWS == 0
    if kind in qgemm.INT8_KINDS:
        reference = qgemm.pack_int8(w, None, "madd")  # the same quantisation, another layout
        values = np.rint(qgemm.unpack(reference) / reference.cscale[:70, None]).astype(np.int64)
    else:
        values = (ref_bf16(w).astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    np.testing.assert_array_equal(qgemm.unpack(weight), qgemm.unpack(pack(w, None, qgemm.KIND[PRECISION[kind]])))
    g, nr = weight.group, qgemm.NR
    padded = np.zeros((-(-70 // nr) * nr, weight.groups * g), np.int64)
    padded[:70, :150] = values
    element = np.int8 if kind in qgemm.INT8_KINDS else np.uint16
    for col in range(0, 70, nr):
        for s in range(weight.groups // kinds.TILE_ROWS):
            for nt in range(tiles.N_TILES):
                offset = ((col // nr) * weight.groups * nr * g + s * 16 * nr * g + nt * 16 * g) * weight.packed.itemsize
                tile = tile_load(weight.packed, offset, nr * g * weight.packed.itemsize).view(element)
                expect = padded[col + 16 * nt:col + 16 * nt + 16, s * 16 * g:(s + 1) * 16 * g]  # (16 cols, 16*g k)
                expect = expect.reshape(16, 16, g).transpose(1, 0, 2).reshape(16, 16 * g)  # rows = k groups
                if kind == "amx-bf16":
                    expect = expect.astype(np.uint16)
                np.testing.assert_array_equal(tile.astype(np.int64), expect.astype(element).astype(np.int64))


@needs_avx512
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_emulated_tile_gemm_matches_the_reference(kind):
    """The AMX blocking over the packed layout computes the kind's math: int8 bit for bit what the AVX-512
    int8 kernel computes (the same integer sums, the same float32 epilogue), bf16 within float32 rounding of
    the float64 reference (the tolerance of test_precision.check_kind)."""
    rng = np.random.default_rng(1)
    avx_kind = "madd" if kind in qgemm.INT8_KINDS else "widen"
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32) * 2 + 0.3
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        weight = pack(w, b, kind)
        for epilogue in ("none", "gelu", "add"):
            out0 = rng.standard_normal((m, n)).astype(np.float32)
            emulated = out0.copy()
            emulate_qgemm(x, weight, emulated, epilogue)
            ref = reference(x, w, b, kind, epilogue, out0)
            err = np.abs(emulated - ref).max() / np.abs(ref).max()
            assert err <= 2e-6, f"{kind} {m}x{k}x{n} {epilogue}: relative error {err:.3g}"
            if kind in qgemm.INT8_KINDS:
                kernel = out0.copy()
                qgemm.qgemm(x, pack(w, b, avx_kind), kernel, epilogue)
                np.testing.assert_array_equal(emulated, kernel)


def test_amx_kinds_share_their_twins_operands():
    """An AMX kind's operands are its AVX-512 twin's (so the twin's reference, quantisation and epilogue apply)."""
    for kind, twin in TWIN.items():
        assert (kinds.A_DTYPE[kind], kinds.B_DTYPE[kind], kinds.GROUP[kind]) == \
            (kinds.A_DTYPE[twin], kinds.B_DTYPE[twin], kinds.GROUP[twin])
        assert (kind in qgemm.INT8_KINDS) == (twin in qgemm.INT8_KINDS)
        assert kinds.K_ALIGN[kind] == kinds.TILE_ROWS * kinds.GROUP[kind]  # one tile of k: 32 bf16, 64 int8
        assert kinds.TILE_BYTES == kinds.GROUP[kind] * np.dtype(kinds.A_DTYPE[kind]).itemsize * 16


# -- machine code for an AMX CPU (compiled here, not run) -------------------------------------------------------


def amx_target_machine():
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu="sapphirerapids", features="+amx-tile,+amx-bf16,+amx-int8", opt=2)


def tile_kernel_module(kind, m_tiles, intrinsics=tiles.INTRINSICS, configure=True):
    """An LLVM module with one function `tile_block`: tiles.emit_tile_kernel's IR (the Numba intrinsic's body),
    between ldtilecfg and tilerelease when `configure`, the kernel's arguments as its parameters."""
    import llvmlite.binding as llvm
    from llvmlite import ir

    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    element = {"amx-bf16": (ir.IntType(16), ir.IntType(16)), "amx-int8": (ir.IntType(8), ir.IntType(8))}[kind]
    params = [element[0].as_pointer(), i64, i64, element[1].as_pointer(), i64, f32.as_pointer(), i64, i64, i64,
              i64, i64, ir.IntType(1), f32.as_pointer(), i32.as_pointer(), i64, f32.as_pointer(), i32.as_pointer(),
              f32.as_pointer(), i64]
    module = ir.Module()
    module.triple = llvm.get_process_triple()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), params), "tile_block")
    builder = ir.IRBuilder(fn.append_basic_block())
    if configure:
        tiles.emit_configure(builder)
    tiles.emit_tile_kernel(builder, kind, m_tiles, *fn.args, intrinsics=intrinsics)
    if configure:
        tiles.emit_release(builder)
    builder.ret_void()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    return parsed


def compile_tile_kernel(kind, m_tiles):
    """Assembly of the tile kernel's IR for an AMX CPU."""
    return amx_target_machine().emit_assembly(tile_kernel_module(kind, m_tiles))


def count(asm, instruction):
    return len(re.findall(rf"^\s+{instruction}\s", asm, re.MULTILINE))


@needs_avx512
@pytest.mark.parametrize("m_tiles", tiles.M_TILE_VARIANTS)
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_tile_kernel_ir_compiles_to_amx_instructions(kind, m_tiles):
    asm = compile_tile_kernel(kind, m_tiles)
    dot, other = tiles.INSTRUCTION[kind], tiles.INSTRUCTION[next(k for k in AMX_KIND_LIST if k != kind)]
    n_tiles = tiles.N_TILES
    assert count(asm, "ldtilecfg") == 1 and count(asm, "tilerelease") == 1
    assert count(asm, "tilezero") == m_tiles * n_tiles
    assert count(asm, "tileloadd") == m_tiles + n_tiles  # per k step: the A tiles and the B tiles
    assert count(asm, dot) == m_tiles * n_tiles and count(asm, other) == 0
    assert count(asm, "tilestored") == m_tiles * n_tiles
    # the epilogue: zmm float32 arithmetic (int8: int32 -> float32 conversion), masked stores for the ragged edge
    assert "zmm" in asm and re.search(r"vmovups\s+%zmm\d+, .*\{%k\d\}", asm)
    if kind == "amx-int8":
        assert count(asm, "vcvtdq2ps") >= m_tiles * 16 * n_tiles
    # nothing but the tile loop touches tiles: the k loop is tile loads and dot products only
    loop = asm[asm.index("tileloadd"):asm.rindex(dot)]
    assert "zmm" not in loop


DRIVER_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import numba
    import numpy as np
    from vitnp.kernels.qgemm import driver, kinds, tiles
    out = {}
    i64 = numba.types.int64
    for kind in ("amx-bf16", "amx-int8"):
        a, b = np.zeros(64, kinds.A_DTYPE[kind]), np.zeros(64, kinds.B_DTYPE[kind])
        c, f, i = np.zeros((2, 2), np.float32), np.zeros(4, np.float32), np.zeros(4, np.int32)
        counter = np.zeros(1, np.int64)
        t = numba.typeof
        sig = (i64, i64, t(a), i64, i64, t(b), i64, t(c), i64, i64, t(f), t(i), t(f), t(i), t(f), i64, i64, i64,
               t(counter), i64, i64)
        driver._amx_task.compile(sig)
        asm = driver._amx_task.inspect_asm(sig)
        out[kind] = {name: len(re.findall(r"^\\s+" + name + r"\\s", asm, re.M))
                     for name in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tdpbusd", "tilestored", "tilerelease")}
    json.dump(out, sys.stdout)
""")


@needs_avx512
def test_driver_compiles_for_an_amx_cpu(tmp_path):
    """The whole AMX driver (_amx_task with both kernels, configure and release) compiles with Numba for a
    Sapphire Rapids target: the intrinsics type, lower and select to tile instructions.  Nothing is run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VITNP_ISA", "VITNP_INT8", "VITNP_BF16"))}
    env.update(NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=AMX_FEATURES, VITNP_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", DRIVER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)
    for kind, found in counts.items():
        dot, other = tiles.INSTRUCTION[kind], ("tdpbusd" if kind == "amx-bf16" else "tdpbf16ps")
        assert found["ldtilecfg"] >= 1 and found["tilerelease"] >= 1, found
        assert found["tileloadd"] > 0 and found[dot] > 0 and found[other] == 0, found
        assert found["tilestored"] > 0, found


class EmulatedTiles:
    """Eight tile registers of 16 x 64 bytes and the tile operations on them, as C callbacks with the AMX
    intrinsics' signatures (tile numbers, byte pointers, byte strides), computing as tile_load / tdpbf16ps /
    tdpbusd above."""

    def __init__(self):
        import ctypes

        self.tmm = np.zeros((8, 16, 64), np.uint8)
        load_store = ctypes.CFUNCTYPE(None, ctypes.c_uint8, ctypes.c_void_p, ctypes.c_int64)
        one = ctypes.CFUNCTYPE(None, ctypes.c_uint8)
        three = ctypes.CFUNCTYPE(None, ctypes.c_uint8, ctypes.c_uint8, ctypes.c_uint8)
        self.callbacks = {"tileloadd64": load_store(self.load), "tilestored64": load_store(self.store),
                          "tilezero": one(self.zero), "tdpbf16ps": three(self.bf16), "tdpbusd": three(self.int8)}
        self.names = {name: f"emulated_{name}" for name in self.callbacks}

    def rows(self, ptr, stride):
        import ctypes

        return [np.ctypeslib.as_array((ctypes.c_uint8 * 64).from_address(ptr + r * stride)) for r in range(16)]

    def load(self, t, ptr, stride):
        self.tmm[t] = np.stack(self.rows(ptr, stride))

    def store(self, t, ptr, stride):
        for r, row in enumerate(self.rows(ptr, stride)):
            row[:] = self.tmm[t, r]

    def zero(self, t):
        self.tmm[t] = 0

    def bf16(self, c, a, b):
        acc = self.tmm[c].view(np.float32).copy()
        self.tmm[c] = tdpbf16ps(acc, self.tmm[a], self.tmm[b]).view(np.uint8)

    def int8(self, c, a, b):
        self.tmm[c] = tdpbusd(self.tmm[c].view(np.int32), self.tmm[a], self.tmm[b]).view(np.uint8)


def jit_tile_kernel(kind, m_tiles, emulated):
    """tiles.emit_tile_kernel's IR with its tile operations calling `emulated`, compiled for this CPU."""
    import ctypes

    import llvmlite.binding as llvm

    for name, callback in emulated.callbacks.items():
        llvm.add_symbol(emulated.names[name], ctypes.cast(callback, ctypes.c_void_p).value)
    module = tile_kernel_module(kind, m_tiles, intrinsics=emulated.names, configure=False)
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=llvm.get_host_cpu_name(), opt=2)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn = ctypes.CFUNCTYPE(None, p, i, i, p, i, p, i, i, i, i, i, ctypes.c_bool, p, p, i, p, p, p, i)(
        engine.get_function_address("tile_block"))
    fn.keep = (engine, module)
    return fn


@needs_avx512
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_tile_kernel_ir_with_emulated_tiles(kind):
    """The kernel's own IR (its k loop, tile addresses and strides, scratch, epilogue, full / ragged / add
    stores) run on this CPU with each tile operation emulated, called block by block as driver._amx_task
    does: the driver's result (emulate_qgemm, bit for bit) and nothing outside the computed columns."""
    emulated = EmulatedTiles()
    kernels = {m: jit_tile_kernel(kind, m, emulated) for m in tiles.M_TILE_VARIANTS}
    rng = np.random.default_rng(6)
    addr = lambda arr: arr.ctypes.data  # noqa: E731
    for m, k, n in [(1, 8, 5), (17, 80, 70), (45, 130, 33), (64, 64, 64)]:
        x = rng.standard_normal((m, k)).astype(np.float32) * 2 + 0.3
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        weight = pack(w, rng.standard_normal(n).astype(np.float32), kind)
        a, rscale, rzp = qgemm.prepare_a(x, kind)
        lda, nr = a.shape[1], qgemm.NR
        for epilogue in ("none", "add"):
            out0 = rng.standard_normal((m, n + 3)).astype(np.float32)  # 3 columns the kernel must not touch
            out = out0.copy()
            for col in range(0, n, nr):
                for row in range(0, m, tiles.MR):
                    rows = min(tiles.MR, m - row)
                    kernels[2 if rows > kinds.TILE_ROWS else 1](
                        addr(a), row * lda, lda, addr(weight.packed),
                        (col // nr) * weight.groups * nr * weight.group, addr(out), row * (n + 3) + col, n + 3,
                        weight.groups, rows, min(nr, n - col), epilogue == "add", addr(rscale), addr(rzp), row,
                        addr(weight.cscale), addr(weight.colsum), addr(weight.bias), col)
            expect = np.ascontiguousarray(out0[:, :n])
            emulate_qgemm(x, weight, expect, epilogue)
            np.testing.assert_array_equal(out[:, :n], expect, err_msg=f"{kind} {m}x{k}x{n} {epilogue}")
            np.testing.assert_array_equal(out[:, n:], out0[:, n:])


def test_tile_config_bytes():
    """ldtilecfg's operand: palette 1, tiles 0..7 of 16 rows x 64 bytes, the rest zero."""
    cfg = tiles.tile_config()
    assert len(cfg) == 64 and cfg[0] == 1 and not any(cfg[1:16])
    colsb = np.frombuffer(cfg[16:48], np.uint16)
    assert list(colsb[:8]) == [64] * 8 and not colsb[8:].any()
    assert list(cfg[48:56]) == [16] * 8 and not any(cfg[56:])


# -- the kernels themselves (only where the CPU has AMX) -------------------------------------------------------


@needs_amx
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_amx_kernel_matches_exact_quantised_math(kind):
    check_amx(kind, SHAPES + [(197, 768, 96), (33, 64, 64), (16, 32, 32), (32, 130, 100)])


@needs_amx
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_amx_kernel_matches_its_emulation(kind):
    rng = np.random.default_rng(4)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        weight = pack(w, rng.standard_normal(n).astype(np.float32), kind)
        for epilogue in ("none", "gelu", "add"):
            out0 = rng.standard_normal((m, n)).astype(np.float32)
            emulated, kernel = out0.copy(), out0.copy()
            emulate_qgemm(x, weight, emulated, epilogue)
            qgemm.qgemm(x, weight, kernel, epilogue)
            if kind in qgemm.INT8_KINDS:
                np.testing.assert_array_equal(kernel, emulated)
            else:
                np.testing.assert_allclose(kernel, emulated, rtol=2e-6, atol=2e-6 * np.abs(emulated).max())


@needs_amx
def test_amx_int8_agrees_bit_for_bit_with_vnni():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((45, 300)).astype(np.float32)
    w = (rng.standard_normal((75, 300)) * 0.05).astype(np.float32)
    outs = []
    for kind in ("amx-int8", "vnni"):
        out = np.empty((45, 75), np.float32)
        qgemm.qgemm(x, qgemm.pack_int8(w, None, kind), out)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


@needs_amx
@pytest.mark.parametrize("kind", AMX_KIND_LIST)
def test_amx_column_range(kind):
    """A column range is the full call's columns; nothing outside it is written."""
    rng = np.random.default_rng(5)
    n = 4 * qgemm.NR + 5
    weight = pack((rng.standard_normal((n, 70)) * 0.1).astype(np.float32), rng.standard_normal(n).astype(np.float32),
                  kind)
    for rows in (1, 17, 197):
        x = rng.standard_normal((rows, 70)).astype(np.float32)
        for epilogue in ("none", "gelu", "add"):
            initial = rng.standard_normal((rows, n)).astype(np.float32)
            full = initial.copy()
            qgemm.qgemm(x, weight, full, epilogue)
            for start, stop in [(qgemm.NR, 3 * qgemm.NR), (2 * qgemm.NR, n), (0, qgemm.NR + 3)]:
                out = initial.copy()
                qgemm.qgemm(x, weight, out, epilogue, columns=(start, stop))
                np.testing.assert_allclose(out[:, start:stop], full[:, start:stop], rtol=3e-7, atol=1e-7)
                out[:, start:stop] = initial[:, start:stop]
                np.testing.assert_array_equal(out, initial)


@needs_amx
def test_amx_is_chosen_and_the_avx512_kernels_can_be_forced():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VITNP_ISA", "VITNP_INT8", "VITNP_BF16"))}
    script = "import json; from vitnp.kernels import qgemm; print(json.dumps(qgemm.KIND))"
    forced = {"VITNP_INT8_KERNEL": "vnni", "VITNP_BF16_KERNEL": "dpbf16"}
    for extra, expect in (({}, {"int8": "amx-int8", "bf16": "amx-bf16"}), (forced, {"int8": "vnni", "bf16": "dpbf16"})):
        run = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                             timeout=300)
        assert json.loads(run.stdout) == expect, run.stderr
