"""Multi-head scaled dot-product attention over a fused QKV activation, one (batch, head) per task."""
import math
import threading

import numpy as np
from numba import get_num_threads, njit, prange

from .elementwise import check_f32_contiguous, exp32

_ROW_BLOCK = 4  # query rows per pass: each K^T row loaded once feeds 4 score rows


@njit(cache=True, fastmath=True)
def _attend_one_head(qkv, out, b, h, head_dim, width, kt, scores, acc):
    seq = qkv.shape[1]
    q_col = h * head_dim
    k_col = width + h * head_dim
    v_col = 2 * width + h * head_dim
    scale = np.float32(1.0 / math.sqrt(head_dim))
    # K_h^T, pre-scaled, contiguous along the key axis so score rows vectorise over keys.
    for j in range(seq):
        for d in range(head_dim):
            kt[d, j] = qkv[b, j, k_col + d] * scale
    for i0 in range(0, seq, _ROW_BLOCK):
        rows = min(_ROW_BLOCK, seq - i0)
        for r in range(rows):
            for j in range(seq):
                scores[r, j] = 0.0
        for d in range(head_dim):
            if rows == _ROW_BLOCK:
                q0 = qkv[b, i0, q_col + d]
                q1 = qkv[b, i0 + 1, q_col + d]
                q2 = qkv[b, i0 + 2, q_col + d]
                q3 = qkv[b, i0 + 3, q_col + d]
                for j in range(seq):
                    kv = kt[d, j]
                    scores[0, j] += q0 * kv
                    scores[1, j] += q1 * kv
                    scores[2, j] += q2 * kv
                    scores[3, j] += q3 * kv
            else:
                for r in range(rows):
                    qr = qkv[b, i0 + r, q_col + d]
                    for j in range(seq):
                        scores[r, j] += qr * kt[d, j]
        for r in range(rows):
            top = scores[r, 0]
            for j in range(1, seq):
                top = max(top, scores[r, j])
            total = np.float32(0.0)
            for j in range(seq):
                e = exp32(scores[r, j] - top)
                scores[r, j] = e
                total += e
            inv_total = np.float32(1.0) / total
            for d in range(head_dim):
                acc[d] = 0.0
            for j in range(seq):
                p = scores[r, j]
                for d in range(head_dim):
                    acc[d] += p * qkv[b, j, v_col + d]
            for d in range(head_dim):
                out[b, i0 + r, q_col + d] = acc[d] * inv_total


@njit(cache=True, fastmath=True, parallel=True)
def _attention(qkv, out, num_heads, kt_scratch, score_scratch, acc_scratch):
    batch = qkv.shape[0]
    width = qkv.shape[2] // 3
    head_dim = width // num_heads
    tasks = batch * num_heads
    workers = kt_scratch.shape[0]
    # Static round-robin over workers so each owns one scratch slot (no allocation per task).
    for w in prange(workers):
        for task in range(w, tasks, workers):
            b = task // num_heads
            h = task - b * num_heads
            _attend_one_head(qkv, out, b, h, head_dim, width,
                             kt_scratch[w], score_scratch[w], acc_scratch[w])


def attention(qkv, out, num_heads):
    """out (B,T,D) = concat_h softmax(q_h k_h^T / sqrt(hd)) v_h for qkv (B,T,3D) = [q | k | v]."""
    check_f32_contiguous(qkv, "qkv")
    check_f32_contiguous(out, "out")
    if qkv.ndim != 3 or qkv.shape[2] % 3:
        raise ValueError(f"attention: qkv must be (B, T, 3*D), got {qkv.shape}")
    batch, seq, width3 = qkv.shape
    width = width3 // 3
    if width % num_heads:
        raise ValueError(f"attention: width {width} not divisible by num_heads {num_heads}")
    if out.shape != (batch, seq, width):
        raise ValueError(f"attention: out must be {(batch, seq, width)}, got {out.shape}")
    head_dim = width // num_heads
    workers = max(1, min(get_num_threads(), batch * num_heads))
    kt, scores, acc = _scratch(workers, head_dim, seq)
    _attention(qkv, out, num_heads, kt, scores, acc)
    return out


_local = threading.local()  # scratch per calling Python thread, so concurrent callers never share it


def _scratch(workers, head_dim, seq):
    """Per-worker scratch (K^T, score rows, output accumulator), reused across calls of the same shape."""
    key = (workers, head_dim, seq)
    cached = getattr(_local, "attention_scratch", None)
    if cached is None or cached[0] != key:
        cached = (key, (np.empty((workers, head_dim, seq), np.float32),
                        np.empty((workers, _ROW_BLOCK, seq), np.float32),
                        np.empty((workers, head_dim), np.float32)))
        _local.attention_scratch = cached
    return cached[1]
