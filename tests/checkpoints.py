"""Random-initialised checkpoints written by transformers itself, in the Hub's format.

Used by the test suite and the benchmarks. Every tensor name, shape and the
config.json come from `save_pretrained`; preprocessor_config.json is written in
the exact form the Hub repos use (old FeatureExtractor style for the two real
models, new ImageProcessor style for the tiny ones, so both parsers are used).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Hub-format preprocessor configs, as published with the real checkpoints.
VIT_BASE_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}
DEIT_BASE_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "DeiTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 256,
}

BASE_SHAPE = dict(
    image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-12,
)
TINY_SHAPE = dict(
    image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=80, layer_norm_eps=1e-12,
)


def tiny_preprocessor(arch: str) -> dict:
    if arch == "vit":
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        }
    return {
        "image_processor_type": "DeiTImageProcessor",
        "do_resize": True, "size": {"height": 40, "width": 40}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }


def _labels(n: int) -> tuple[dict, dict]:
    id2label = {i: f"class {i:04d}" for i in range(n)}
    return id2label, {v: k for k, v in id2label.items()}


def make_checkpoint(
    out_dir: str | os.PathLike,
    arch: str = "vit",
    size: str = "tiny",
    num_labels: int = 10,
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides,
) -> Path:
    """Write a random-initialised checkpoint with transformers' save_pretrained.

    arch: "vit" (ViTForImageClassification), "deit" (DeiTForImageClassification) or
    "deit-distilled" (DeiTForImageClassificationWithTeacher).
    Biases and layernorm parameters are perturbed away from their 0/1 init so that
    a forward pass that ignored any of them would fail the parity tests.
    """
    import torch
    import transformers

    out = Path(out_dir)
    shape = dict(BASE_SHAPE if size == "base" else TINY_SHAPE)
    shape.update(config_overrides)
    id2label, label2id = _labels(num_labels)
    torch.manual_seed(seed)
    if arch == "vit":
        cfg = transformers.ViTConfig(**shape, id2label=id2label, label2id=label2id)
        model = transformers.ViTForImageClassification(cfg)
    elif arch == "deit":
        cfg = transformers.DeiTConfig(**shape, id2label=id2label, label2id=label2id)
        model = transformers.DeiTForImageClassification(cfg)
    elif arch == "deit-distilled":
        cfg = transformers.DeiTConfig(**shape, id2label=id2label, label2id=label2id)
        model = transformers.DeiTForImageClassificationWithTeacher(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "layernorm" in name.lower() and name.endswith("weight"):
                p.normal_(1.0, 0.1)
    model.eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    if size == "base":
        pre = VIT_BASE_PREPROCESSOR if arch == "vit" else DEIT_BASE_PREPROCESSOR
    else:
        pre = tiny_preprocessor("vit" if arch == "vit" else "deit")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


def make_overflowing_copy(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> Path:
    """A copy of a ViT checkpoint whose finite weights overflow float32 on every image: every logit is +inf,
    so softmax gives NaN."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    dst = Path(shutil.copytree(src_dir, dst_dir))
    tensors = load_file(dst / "model.safetensors")
    tensors["vit.layernorm.bias"] = np.full_like(tensors["vit.layernorm.bias"], 10.0)
    tensors["classifier.weight"] = np.full_like(tensors["classifier.weight"], 3e38)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def fill_hub_cache(cache_dir: str | os.PathLike, repo_id: str, src_dir: str | os.PathLike,
                   commit: str = "0123456789abcdef0123456789abcdef01234567",
                   files: list[str] | None = None) -> Path:
    """Lay files out exactly as huggingface_hub's cache does (blobs + snapshots + refs/main)."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    names = files or sorted(p.name for p in Path(src_dir).iterdir() if p.is_file())
    for name in names:
        import hashlib

        data = (Path(src_dir) / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(Path(src_dir) / name, blob)
        link = snap / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    return snap
