"""A naive NumPy ViT / DeiT forward pass, picoGPT-style: the reference point "what plain NumPy gives you".

Straight from model.safetensors + config.json, no vitnp code: np.matmul for every product (numpy hands those to
its BLAS), softmax with np.exp, exact GELU with erf from the Abramowitz & Stegun 7.1.26 formula (|error| < 1.5e-7),
LayerNorm with mean/var.  Every step allocates fresh arrays; nothing is fused or preallocated.  Scalars are Python floats so
that NumPy 2 keeps everything float32.

    from naive_numpy import NaiveViT
    logits = NaiveViT("path/to/checkpoint").logits(pixel_values)   # (B, 3, H, W) float32 -> (B, num_labels)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def erf(x):
    # Abramowitz & Stegun 7.1.26, odd extension to negative x.
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def gelu(x):
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x, w, b):
    return x @ w.T + b  # torch layout: w is (out_features, in_features)


def mha(x, q, k, v, out, n_head):
    batch, tokens, width = x.shape
    head = width // n_head

    def split(t):  # (B, T, D) -> (B, H, T, d)
        return t.reshape(batch, tokens, n_head, head).transpose(0, 2, 1, 3)

    qh, kh, vh = split(linear(x, *q)), split(linear(x, *k)), split(linear(x, *v))
    attn = softmax(qh @ kh.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(head))) @ vh
    return linear(attn.transpose(0, 2, 1, 3).reshape(batch, tokens, width), *out)


def block(x, p, n_head, eps):
    x = x + mha(layer_norm(x, *p["ln_1"], eps), p["q"], p["k"], p["v"], p["attn_out"], n_head)
    return x + linear(gelu(linear(layer_norm(x, *p["ln_2"], eps), *p["fc"])), *p["proj"])


def patch_embed(pixels, w, b):
    """Conv2d(kernel = stride = patch) as reshape + matmul."""
    batch, channels, height, width = pixels.shape
    d, _, patch, _ = w.shape
    gh, gw = height // patch, width // patch
    patches = pixels.reshape(batch, channels, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, gh * gw, channels * patch * patch) @ w.reshape(d, -1).T + b


class NaiveViT:
    def __init__(self, checkpoint):
        from safetensors.numpy import load_file

        checkpoint = Path(checkpoint)
        self.config = json.loads((checkpoint / "config.json").read_text())
        tensors = {k: v.astype(np.float32) for k, v in load_file(checkpoint / "model.safetensors").items()}
        c = self.config
        p = c["model_type"]  # "vit" | "deit": the tensor-name prefix
        self.distilled = c["architectures"][0].endswith("WithTeacher")
        self.n_head, self.eps = c["num_attention_heads"], c["layer_norm_eps"]

        def pair(name):
            return tensors[f"{name}.weight"], tensors[f"{name}.bias"]

        self.patch = pair(f"{p}.embeddings.patch_embeddings.projection")
        prefix = [tensors[f"{p}.embeddings.cls_token"]]
        if f"{p}.embeddings.distillation_token" in tensors:
            prefix.append(tensors[f"{p}.embeddings.distillation_token"])
        self.prefix = np.concatenate(prefix, axis=1)           # (1, 1 or 2, D)
        self.pos = tensors[f"{p}.embeddings.position_embeddings"]
        self.blocks = []
        for i in range(c["num_hidden_layers"]):
            layer = f"{p}.encoder.layer.{i}"
            self.blocks.append({
                "ln_1": pair(f"{layer}.layernorm_before"),
                "q": pair(f"{layer}.attention.attention.query"),
                "k": pair(f"{layer}.attention.attention.key"),
                "v": pair(f"{layer}.attention.attention.value"),
                "attn_out": pair(f"{layer}.attention.output.dense"),
                "ln_2": pair(f"{layer}.layernorm_after"),
                "fc": pair(f"{layer}.intermediate.dense"),
                "proj": pair(f"{layer}.output.dense"),
            })
        self.ln_f = pair(f"{p}.layernorm")
        if self.distilled:
            self.heads = [pair("cls_classifier"), pair("distillation_classifier")]
        else:
            self.heads = [pair("classifier")]

    def logits(self, pixel_values):
        x = patch_embed(np.asarray(pixel_values, np.float32), *self.patch)
        batch = x.shape[0]
        x = np.concatenate([np.broadcast_to(self.prefix, (batch, *self.prefix.shape[1:])), x], axis=1) + self.pos
        for p in self.blocks:
            x = block(x, p, self.n_head, self.eps)
        x = layer_norm(x, *self.ln_f, self.eps)
        # [CLS] feeds the classifier; a distilled DeiT averages it with the distillation token's head.
        outputs = [linear(x[:, i], *head) for i, head in enumerate(self.heads)]
        return (sum(outputs) / len(outputs)).astype(np.float32)
