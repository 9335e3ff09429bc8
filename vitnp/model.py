"""The ViT / DeiT forward pass: pre-LN transformer encoder over patch tokens, then the classifier head(s).

One Workspace of preallocated buffers is reused across calls; forward() reads top to bottom and allocates
nothing per layer.
"""

from __future__ import annotations

import numpy as np

from .config import ViTConfig
from .kernels import attention, layernorm
from .weights import ViTWeights


class Workspace:
    """Activation buffers for up to `capacity` images, grown on demand; smaller batches use leading views."""

    def __init__(self, cfg: ViTConfig):
        self.cfg = cfg
        self.capacity = 0

    def reserve(self, batch: int) -> None:
        if batch <= self.capacity:
            return
        c, T, D = self.cfg, self.cfg.seq_len, self.cfg.hidden_size
        rows = batch * T
        self.patches = np.empty((batch * c.num_patches, c.num_channels * c.patch_size ** 2), np.float32)
        self.hidden = np.empty((rows, D), np.float32)       # the residual stream
        self.normed = np.empty((rows, D), np.float32)       # layernorm output, GEMM input
        self.qkv = np.empty((rows, 3 * D), np.float32)
        self.context = np.empty((rows, D), np.float32)      # attention output, heads concatenated
        self.mlp = np.empty((rows, c.intermediate_size), np.float32)
        # The last layer past its attention: the prefix tokens' rows only, image-major (B, prefix, .)
        prefix = c.num_prefix_tokens * batch
        self.prefix_hidden = np.empty((prefix, D), np.float32)
        self.prefix_normed = np.empty((prefix, D), np.float32)
        self.prefix_qkv = np.empty((prefix, 3 * D), np.float32)  # their queries: the first D columns
        self.prefix_context = np.empty((prefix, D), np.float32)
        self.prefix_mlp = np.empty((prefix, c.intermediate_size), np.float32)
        self.pooled = np.empty((prefix, D), np.float32)
        self.head_out = np.empty((batch, c.num_labels), np.float32)
        self.capacity = batch


def patchify(pixel_values: np.ndarray, patch: int, out: np.ndarray) -> None:
    """(B, C, H, W) -> (B * num_patches, C * patch * patch), in the order of the conv weight's (C, kh, kw) axes."""
    B, C, H, W = pixel_values.shape
    gh, gw = H // patch, W // patch
    view = pixel_values.reshape(B, C, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    out.reshape(B, gh, gw, C, patch, patch)[...] = view


def tokens_of(rows: np.ndarray, batch: int) -> np.ndarray:
    """(B * T, width) -> (B, T, width) view."""
    return rows.reshape(batch, -1, rows.shape[1])


def project_prefix_queries(qkv_layer, normed, qkv, prefix_normed, prefix_qkv, batch: int) -> None:
    """qkv = normed @ W_qkv^T + b, except that queries are computed for the prefix tokens only: keys and values
    of every token, in one call over a column range, then the prefix rows' queries from their rows of normed
    gathered into prefix_normed (B * npre rows, image-major; prefix_qkv the same rows).  A range must start on a
    whole panel of the packed weight; where D does not, all of qkv is computed."""
    D = normed.shape[1]
    if D % qkv_layer.column_step:
        qkv_layer(normed, qkv)
        return
    npre = prefix_normed.shape[0] // batch
    tokens_of(prefix_normed, batch)[...] = tokens_of(normed, batch)[:, :npre]
    qkv_layer(normed, qkv, columns=(D, 3 * D))
    qkv_layer(prefix_normed, prefix_qkv, columns=(0, D))
    tokens_of(qkv, batch)[:, :npre, :D] = tokens_of(prefix_qkv, batch)[:, :, :D]


def forward(w: ViTWeights, cfg: ViTConfig, pixel_values: np.ndarray, ws: Workspace) -> np.ndarray:
    """pixel_values (B, C, H, W) float32 -> logits (B, num_labels) float32 (a new array)."""
    B = pixel_values.shape[0]
    T, D, P, npre = cfg.seq_len, cfg.hidden_size, cfg.num_patches, cfg.num_prefix_tokens
    eps = cfg.layer_norm_eps
    ws.reserve(B)
    rows = B * T
    hidden, normed = ws.hidden[:rows], ws.normed[:rows]
    qkv, context, mlp = ws.qkv[:rows], ws.context[:rows], ws.mlp[:rows]

    # Embeddings: [CLS] (+ distillation) tokens, then the patch projection, each plus its position embedding.
    patches = ws.patches[: B * P]
    patchify(pixel_values, cfg.patch_size, patches)
    tokens = tokens_of(hidden, B)
    projected = normed[: B * P]
    w.patch_embed(patches, projected)
    np.add(projected.reshape(B, P, D), w.patch_pos_embed, out=tokens[:, npre:])
    tokens[:, :npre] = w.prefix_tokens

    last = len(w.layers) - 1
    for index, layer in enumerate(w.layers):
        layernorm(hidden, layer.ln1_weight, layer.ln1_bias, eps, normed)
        if index < last:
            layer.qkv(normed, qkv)
        else:
            # Only the prefix tokens' outputs reach the heads.  Their attention still reads every token's
            # keys and values, but it needs only their queries, and from there on every op is per token: run
            # it all on those B * npre rows alone (the same logits; 6.9% of ViT-B's work skipped).
            n = B * npre
            project_prefix_queries(layer.qkv, normed, qkv, ws.prefix_normed[:n], ws.prefix_qkv[:n], B)
            hidden, normed = ws.prefix_hidden[:n], ws.prefix_normed[:n]
            context, mlp = ws.prefix_context[:n], ws.prefix_mlp[:n]
            tokens_of(hidden, B)[...] = tokens[:, :npre]
        queries = hidden.shape[0] // B
        attention(qkv.reshape(B, T, 3 * D), context.reshape(B, queries, D), cfg.num_attention_heads)
        layer.attn_out(context, hidden, epilogue="add")
        layernorm(hidden, layer.ln2_weight, layer.ln2_bias, eps, normed)
        layer.fc1(normed, mlp, epilogue="gelu")
        layer.fc2(mlp, hidden, epilogue="add")

    # The heads take the prefix tokens, one kind at a time; layernorm is per token: normalise just those.
    pooled = ws.pooled[: npre * B]
    pooled.reshape(npre, B, D)[...] = tokens_of(hidden, B)[:, :npre].transpose(1, 0, 2)
    layernorm(pooled, w.final_ln_weight, w.final_ln_bias, eps, pooled)
    pooled = pooled.reshape(npre, B, D)
    head_out = ws.head_out[:B]
    w.heads[0](pooled[0], head_out)
    logits = head_out.copy()
    if cfg.distilled:
        # DeiT with teacher: the mean of the [CLS] head and the distillation head.
        w.heads[1](pooled[1], head_out)
        logits += head_out
        logits /= 2
    return logits
