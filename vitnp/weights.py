"""model.safetensors -> ViTWeights: validated against the config, laid out once for the forward pass.

Tensors are read as zero-copy views on a memory map of the file; each one is converted/packed exactly once
(fused QKV, float32, the layout its layer computes from: vitnp.layers builds each projection) and its pages are
released afterwards, so the resident weights are the packed ones only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layers
from .checkpoint import check_finite, open_checkpoint
from .config import ViTConfig, check_against_tensors
from .errors import CheckpointError
from .layers import Layer
from .options import EngineOptions

# The tensor dtypes the forward pass computes from (each converted to float32 or packed at load).
COMPUTED_DTYPES = ("F32", "F16", "BF16")
# Tensors that transformers itself ignores when loading these architectures.
_IGNORED_SUFFIXES = ("pooler.dense.weight", "pooler.dense.bias")


@dataclass
class LayerWeights:
    ln1_weight: np.ndarray
    ln1_bias: np.ndarray
    qkv: Layer           # fused query|key|value projection
    attn_out: Layer
    ln2_weight: np.ndarray
    ln2_bias: np.ndarray
    fc1: Layer
    fc2: Layer


@dataclass
class ViTWeights:
    patch_embed: Layer             # conv(kernel=stride=patch) as a GEMM over flattened patches
    prefix_tokens: np.ndarray      # (num_prefix_tokens, D): [CLS] (+ distillation token), position embedding added
    patch_pos_embed: np.ndarray    # (num_patches, D)
    layers: list[LayerWeights]
    final_ln_weight: np.ndarray
    final_ln_bias: np.ndarray
    heads: list[Layer]             # one classifier, or [cls_classifier, distillation_classifier]


def expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name transformers' save_pretrained writes for this config, with its shape."""
    p, D, I, L = cfg.prefix, cfg.hidden_size, cfg.intermediate_size, cfg.num_labels
    e = {
        f"{p}.embeddings.cls_token": (1, 1, D),
        f"{p}.embeddings.position_embeddings": (1, cfg.seq_len, D),
        f"{p}.embeddings.patch_embeddings.projection.weight": (D, cfg.num_channels, cfg.patch_size, cfg.patch_size),
        f"{p}.embeddings.patch_embeddings.projection.bias": (D,),
        f"{p}.layernorm.weight": (D,),
        f"{p}.layernorm.bias": (D,),
    }
    if cfg.num_prefix_tokens == 2:
        e[f"{p}.embeddings.distillation_token"] = (1, 1, D)
    for i in range(cfg.num_hidden_layers):
        q = f"{p}.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            e[q + f"attention.attention.{name}.weight"] = (D, D)
            if cfg.qkv_bias:
                e[q + f"attention.attention.{name}.bias"] = (D,)
        e[q + "attention.output.dense.weight"] = (D, D)
        e[q + "attention.output.dense.bias"] = (D,)
        e[q + "intermediate.dense.weight"] = (I, D)
        e[q + "intermediate.dense.bias"] = (I,)
        e[q + "output.dense.weight"] = (D, I)
        e[q + "output.dense.bias"] = (D,)
        for ln in ("layernorm_before", "layernorm_after"):
            e[q + f"{ln}.weight"] = (D,)
            e[q + f"{ln}.bias"] = (D,)
    heads = ("cls_classifier", "distillation_classifier") if cfg.distilled else ("classifier",)
    for h in heads:
        e[f"{h}.weight"] = (L, D)
        e[f"{h}.bias"] = (L,)
    return e


def validate(tensors: dict, cfg: ViTConfig, where: Path) -> None:
    expected = expected_shapes(cfg)
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    for name in sorted(set(expected) & set(tensors)):
        dtype, shape, _, _ = tensors[name].entries[name]
        if dtype not in COMPUTED_DTYPES:
            problems.append(f"{name} has dtype {dtype}; supported: F32, F16, BF16")
        elif shape != expected[name]:
            problems.append(f"{name} has shape {list(shape)}, config.json implies {list(expected[name])}")
    if problems:
        raise CheckpointError(
            f"{where}: checkpoint does not match config.json ({cfg.architecture}):\n  " + "\n  ".join(problems)
        )


def _float32(tensors: dict, name: str) -> np.ndarray:
    """A float32 copy, never a view, after which the tensor's mapped pages are released: the resident
    weights are the packed copies only, and loading never holds the whole file in memory besides them.
    A NaN or infinity is a CheckpointError naming the tensor: no score is ever computed from one."""
    f = tensors[name]
    raw = f.view(name)
    if f.entries[name][0] == "BF16":
        # bfloat16 is the top half of a float32.
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = np.array(raw, dtype=np.float32, copy=True)
    f.release(name)
    check_finite(name, out, f.path)
    return out


def _readable(tensors: dict, name: str) -> np.ndarray:
    """The weight as a layer reads it: the zero-copy view of the mapped file for float32 and float16 (each
    layer lays it out in its own copy), a float32 copy for bfloat16 (stored as raw 16-bit words); checked
    finite either way."""
    if tensors[name].entries[name][0] == "BF16":
        return _float32(tensors, name)
    view = tensors[name].view(name)
    check_finite(name, view, tensors[name].path)
    return view


def load_weights(model_dir: str | Path, cfg: ViTConfig, options: EngineOptions = EngineOptions()) -> ViTWeights:
    """Every projection is built by vitnp.layers from the mapped tensors, one layer at a time (so the float32
    weights never exist all at once), and each tensor's pages are released once its layer holds it; LayerNorm
    and the embeddings are float32 copies."""
    model_dir = Path(model_dir)
    tensors = open_checkpoint(model_dir)
    # The config's sizes against the header's shapes, before anything is allocated from either.
    check_against_tensors(cfg, {n: f.entries[n][1] for n, f in tensors.items()}, str(model_dir / "config.json"))
    validate(tensors, cfg, model_dir)
    p = cfg.prefix
    get = lambda name: _float32(tensors, name)  # noqa: E731

    def layer(role: str, weight_names: list[str], bias_names: list[str], shape=None) -> Layer:
        """The layer for `role` from these weight tensors (stacked along N) and bias tensors (concatenated)."""
        bias = np.concatenate([get(n) for n in bias_names]) if bias_names else None
        weights = [_readable(tensors, n) if shape is None else _readable(tensors, n).reshape(shape)
                   for n in weight_names]
        built = layers.build(role, weights if len(weights) > 1 else weights[0], bias, options)
        for n in weight_names:
            tensors[n].release(n)
        return built

    def dense(role: str, prefix: str) -> Layer:
        return layer(role, [prefix + ".weight"], [prefix + ".bias"])

    D = cfg.hidden_size
    pos = get(f"{p}.embeddings.position_embeddings").reshape(cfg.seq_len, D)
    prefix_tokens = [get(f"{p}.embeddings.cls_token").reshape(D)]
    if cfg.num_prefix_tokens == 2:
        prefix_tokens.append(get(f"{p}.embeddings.distillation_token").reshape(D))
    prefix_tokens = np.stack(prefix_tokens) + pos[: cfg.num_prefix_tokens]

    blocks = []
    for i in range(cfg.num_hidden_layers):
        q = f"{p}.encoder.layer.{i}."
        att = [q + f"attention.attention.{n}" for n in ("query", "key", "value")]
        blocks.append(LayerWeights(
            ln1_weight=get(q + "layernorm_before.weight"), ln1_bias=get(q + "layernorm_before.bias"),
            qkv=layer("qkv", [a + ".weight" for a in att], [a + ".bias" for a in att] if cfg.qkv_bias else []),
            attn_out=dense("attn_out", q + "attention.output.dense"),
            ln2_weight=get(q + "layernorm_after.weight"), ln2_bias=get(q + "layernorm_after.bias"),
            fc1=dense("fc1", q + "intermediate.dense"),
            fc2=dense("fc2", q + "output.dense"),
        ))

    conv = f"{p}.embeddings.patch_embeddings.projection"
    heads = ["cls_classifier", "distillation_classifier"] if cfg.distilled else ["classifier"]
    return ViTWeights(
        patch_embed=layer("patch_embed", [conv + ".weight"], [conv + ".bias"], shape=(D, -1)),
        prefix_tokens=np.ascontiguousarray(prefix_tokens, dtype=np.float32),
        patch_pos_embed=np.ascontiguousarray(pos[cfg.num_prefix_tokens:]),
        layers=blocks,
        final_ln_weight=get(f"{p}.layernorm.weight"),
        final_ln_bias=get(f"{p}.layernorm.bias"),
        heads=[dense("head", h) for h in heads],
    )
