"""Multi-head scaled dot-product attention over a fused QKV activation, one (batch, head) per task.

Per head, queries are processed in blocks of QB (one micro-tile width: 32 on AVX-512, 16 on AVX2), with scores kept
*transposed* (keys x queries) so that the softmax over keys is element-wise across 32-wide vectors:
  S^T = K Q_blk^T        GEMM micro-kernel, A = pre-scaled K in MR-key panels, B = packed Q_blk^T
  softmax down each column of S^T (max, exp, sum, scale: all vectorised over the QB queries)
  O_blk = P V            micro-kernel reading P straight from S^T (A element (i, j) = S^T[j, i]) and
                         V in place from qkv, writing straight into `out`
The only scratch is per worker: K panels (T x hd), one (T x QB) score block and a Q^T block; the
(B, H, T, T) score tensor never exists.
"""
import math
import threading

import numpy as np
from numba import get_num_threads, njit

from . import parallel
from ._aligned import aligned_empty
from ._intrinsics import make_column_softmax, prefetch_read
from ._microkernel import make_microkernel
from .elementwise import check_f32_contiguous
from .isa import SPEC
from .tiling import cdiv

MR = SPEC.attn_key_rows     # keys per micro-tile of S^T       (AVX-512: 12, AVX2: 6)
QB = SPEC.attn_query_block  # queries per block = tile width   (AVX-512: 32, AVX2: 16)
OR = SPEC.attn_out_rows     # queries per micro-tile of O       (AVX-512: 8, AVX2: 6)
PREFETCH_ROWS = 8  # qkv rows are 3*D floats apart (a new page each): fetch ahead of the strided walk
OR_LAST = QB % OR or OR     # rows of the last O micro-tile of a full block (AVX2: 16 = 6 + 6 + 4)
_micro_scores = make_microkernel(MR, QB, SPEC.lanes)
_micro_out = make_microkernel(OR, QB, SPEC.lanes)
_micro_out_last = make_microkernel(OR_LAST, QB, SPEC.lanes)
_softmax_columns = make_column_softmax(QB, SPEC.lanes)


@njit(cache=True, fastmath=True, inline="always")
def _pack_keys(qkv_flat, row0, ld, col0, seq, head_dim, scale, k_panels):
    """k_panels[panel][d][i] = K[panel*MR + i, d] * scale, zero keys past seq."""
    for panel in range(cdiv(seq, MR)):
        base = panel * head_dim * MR
        for i in range(MR):
            j = panel * MR + i
            if j + PREFETCH_ROWS < seq:
                ahead = row0 + (j + PREFETCH_ROWS) * ld + col0
                for line in range(0, head_dim, 16):
                    prefetch_read(qkv_flat, ahead + line)
            if j < seq:
                src = row0 + j * ld + col0
                for d in range(head_dim):
                    k_panels[base + d * MR + i] = qkv_flat[src + d] * scale
            else:
                for d in range(head_dim):
                    k_panels[base + d * MR + i] = 0.0


@njit(cache=True, fastmath=True, inline="always")
def _pack_queries_transposed(qkv_flat, start, ld, queries, head_dim, q_t):
    """q_t[d][i] = Q[i, d] for i < queries (zero columns up to QB)."""
    for i in range(queries):
        if i + PREFETCH_ROWS < queries:
            for line in range(0, head_dim, 16):
                prefetch_read(qkv_flat, start + (i + PREFETCH_ROWS) * ld + line)
        src = start + i * ld
        for d in range(head_dim):
            q_t[d * QB + i] = qkv_flat[src + d]
    for d in range(head_dim):
        for i in range(queries, QB):
            q_t[d * QB + i] = 0.0


@njit(cache=True, fastmath=True, inline="always")
def _attend_one_head(qkv_flat, out_flat, b, h, seq, queries_out, width, head_dim, k_panels, scores_t, q_t,
                     v_pad):
    ld = 3 * width
    batch_row0 = b * seq * ld
    head_col = h * head_dim
    key_panels = cdiv(seq, MR)
    _pack_keys(qkv_flat, batch_row0, ld, width + head_col, seq, head_dim,
               np.float32(1.0 / math.sqrt(head_dim)), k_panels)
    # V is read in place when a head is whole 32-column panels (ViT: hd = 64); otherwise padded.
    v_direct = head_dim % QB == 0
    hd_pad = cdiv(head_dim, QB) * QB
    if v_direct:
        v_src, v_off, v_ld = qkv_flat, batch_row0 + 2 * width + head_col, ld
    else:
        for j in range(seq):
            src = batch_row0 + j * ld + 2 * width + head_col
            for d in range(head_dim):
                v_pad[j * hd_pad + d] = qkv_flat[src + d]
            for d in range(head_dim, hd_pad):
                v_pad[j * hd_pad + d] = 0.0
        v_src, v_off, v_ld = v_pad, 0, hd_pad
    out_row0 = b * queries_out * width
    for q0 in range(0, queries_out, QB):
        queries = min(QB, queries_out - q0)
        _pack_queries_transposed(qkv_flat, batch_row0 + q0 * ld + head_col, ld, queries, head_dim, q_t)
        for kp in range(key_panels):
            _micro_scores(k_panels, kp * head_dim * MR, 1, MR, q_t, 0, QB, scores_t, kp * MR * QB, QB,
                          head_dim, False, MR, QB)
        _softmax_columns(scores_t, 0, seq)
        for r0 in range(0, queries, OR):
            rows = min(OR, queries - r0)
            for dp in range(hd_pad // QB):
                out_off = out_row0 + (q0 + r0) * width + head_col + dp * QB
                cols = min(QB, head_dim - dp * QB)
                if rows <= OR_LAST:  # the micro-kernel computes all its rows: use the shorter one
                    _micro_out_last(scores_t, r0, 1, QB, v_src, v_off + dp * QB, v_ld, out_flat, out_off,
                                    width, seq, False, rows, cols)
                else:
                    _micro_out(scores_t, r0, 1, QB, v_src, v_off + dp * QB, v_ld, out_flat, out_off, width,
                               seq, False, rows, cols)


@njit(cache=True, fastmath=True)
def _attention_task(worker, workers, qkv, out, num_heads, k_panels, scores_t, q_t, v_pad):
    """One worker's (batch, head) pairs (parallel.run), round-robin, in its own scratch slot (no
    allocation per head)."""
    batch, seq, width3 = qkv.shape
    queries_out = out.shape[1]
    width = width3 // 3
    head_dim = width // num_heads
    qkv_flat = qkv.reshape(-1)
    out_flat = out.reshape(-1)
    for task in range(worker, batch * num_heads, workers):
        b = task // num_heads
        h = task - b * num_heads
        _attend_one_head(qkv_flat, out_flat, b, h, seq, queries_out, width, head_dim, k_panels[worker],
                         scores_t[worker], q_t[worker], v_pad[worker])


def attention(qkv, out, num_heads):
    """out (B,Tq,D) = concat_h softmax(q_h k_h^T / sqrt(hd)) v_h for qkv (B,T,3D) = [q | k | v], over all T
    keys and the first Tq <= T queries of each sequence (Tq = T normally; fewer when only the leading
    tokens' outputs are needed, as in a ViT's last layer)."""
    check_f32_contiguous(qkv, "qkv")
    check_f32_contiguous(out, "out")
    if qkv.ndim != 3 or qkv.shape[2] % 3:
        raise ValueError(f"attention: qkv must be (B, T, 3*D), got {qkv.shape}")
    batch, seq, width3 = qkv.shape
    width = width3 // 3
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"attention: width {width} not divisible by num_heads {num_heads}")
    if out.ndim != 3 or out.shape[0] != batch or not 0 <= out.shape[1] <= seq or out.shape[2] != width:
        raise ValueError(f"attention: out must be {(batch, seq, width)} (or fewer queries than {seq}), "
                         f"got {out.shape}")
    if seq == 0 or batch == 0 or out.shape[1] == 0:
        return out
    head_dim = width // num_heads
    workers = max(1, min(get_num_threads(), batch * num_heads))
    parallel.run(_attention_task, workers, qkv, out, num_heads, *_scratch(workers, head_dim, seq))
    return out


_local = threading.local()  # scratch per calling Python thread, so concurrent callers never share it


def _scratch(workers, head_dim, seq):
    """Per-worker scratch: K panels, one transposed score block, Q^T block, padded V."""
    key = (workers, head_dim, seq)
    cached = getattr(_local, "attention_scratch", None)
    if cached is None or cached[0] != key:
        keys_pad = -(-seq // MR) * MR
        hd_pad = -(-head_dim // QB) * QB
        v_size = 1 if head_dim % QB == 0 else seq * hd_pad
        cached = (key, (aligned_empty(workers, keys_pad * head_dim), aligned_empty(workers, keys_pad * QB),
                        aligned_empty(workers, head_dim * QB), aligned_empty(workers, v_size)))
        _local.attention_scratch = cached
    return cached[1]


# The dispatchers whose compiled presence (in this process or Numba's disk cache) shows attention is ready.
KERNELS = (_attention_task,)
