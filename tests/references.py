"""Float64 NumPy references the kernel tests compare against (independent of vitnp's code)."""

import math

import numpy as np


def gelu_reference(x):
    x = np.asarray(x, np.float64)
    # erfc(-z) = 1 + erf(z), without 1 + erf's cancellation in the negative tail.
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    return 0.5 * x * erfc(-x / math.sqrt(2.0))


def attention_reference(qkv, num_heads):
    """softmax(q k^T / sqrt(hd)) v per head, for qkv (B, T, 3D) = [q | k | v]."""
    batch, seq, width3 = qkv.shape
    width = width3 // 3
    hd = width // num_heads
    q, k, v = (qkv[..., i * width:(i + 1) * width].astype(np.float64)
               .reshape(batch, seq, num_heads, hd).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ v).transpose(0, 2, 1, 3).reshape(batch, seq, width)
