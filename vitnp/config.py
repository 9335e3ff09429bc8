"""config.json of a ViT / DeiT image classifier -> one frozen ViTConfig."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# architecture -> (tensor-name prefix, number of leading tokens, head layout).
# Every DeiT model prepends [CLS] and the distillation token; only the "WithTeacher" head reads the latter.
ARCHITECTURES = {
    "ViTForImageClassification": ("vit", 1, "single"),
    "DeiTForImageClassification": ("deit", 2, "single"),
    "DeiTForImageClassificationWithTeacher": ("deit", 2, "distilled"),
}
# transformers' ACT2FN names that are the exact erf GELU.
SUPPORTED_ACTIVATIONS = ("gelu",)
PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification", "regression")
# Upper bounds on the sizes a config may claim, checked before anything is allocated from them. Each is far
# above any published ViT / DeiT (ViT-22B: hidden 6144, 48 layers; ImageNet-21k: 21843 labels).
MAX_SIZES = {
    "image_size": 16384, "patch_size": 16384, "num_channels": 64, "hidden_size": 65536,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "intermediate_size": 262144,
}
MAX_LABELS = 100_000
MAX_LAYER_NORM_EPS = 1.0


@dataclass(frozen=True)
class ViTConfig:
    architecture: str
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool
    id2label: tuple[str, ...]
    problem_type: str | None = None
    model_type: str = "vit"

    @property
    def prefix(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @property
    def num_prefix_tokens(self) -> int:
        """[CLS] (+ distillation token for DeiT-with-teacher)."""
        return ARCHITECTURES[self.architecture][1]

    @property
    def distilled(self) -> bool:
        return ARCHITECTURES[self.architecture][2] == "distilled"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ViTConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: 'architectures' must be a list of class names, got {archs!r:.100}")
        model_type = d.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ConfigError(f"{source}: 'model_type' must be a string, got {model_type!r:.100}")
        supported = ", ".join(ARCHITECTURES)
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            if not archs and model_type in ("vit", "deit"):
                # save_pretrained always writes "architectures"; a bare config is a base model.
                raise ConfigError(
                    f"{source}: no 'architectures' entry; vitnp needs an image-classification checkpoint "
                    f"({supported})"
                )
            raise ConfigError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"vitnp supports {supported}"
            )

        def field(name, kind, default=None):
            value = d.get(name, default)
            if value is None:
                raise ConfigError(f"{source}: missing required field {name!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{source}: {name!r} must be a positive integer, got {value!r:.100}")
            if kind is int and value > MAX_SIZES[name]:
                raise ConfigError(f"{source}: {name!r} is {value}, above the largest vitnp accepts "
                                  f"({MAX_SIZES[name]})")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0 < value <= MAX_LAYER_NORM_EPS):
                raise ConfigError(f"{source}: {name!r} must be a finite number in (0, {MAX_LAYER_NORM_EPS:g}], "
                                  f"got {value!r:.100}")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{source}: {name!r} must be true or false, got {value!r:.100}")
            return value

        # Defaults are transformers' ViTConfig / DeiTConfig defaults (same for both).
        image_size = field("image_size", int, 224)
        patch_size = field("patch_size", int, 16)
        hidden = field("hidden_size", int, 768)
        heads = field("num_attention_heads", int, 12)
        if image_size % patch_size:
            raise ConfigError(f"{source}: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        act = d.get("hidden_act", "gelu")
        if not isinstance(act, str) or act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{source}: unsupported hidden_act {act!r:.100}; vitnp supports {', '.join(SUPPORTED_ACTIVATIONS)} "
                "(the exact erf GELU)"
            )
        problem_type = d.get("problem_type")
        if not (problem_type is None or isinstance(problem_type, str)) or problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"{source}: unknown problem_type {problem_type!r:.100}; expected one of "
                + ", ".join(str(p) for p in PROBLEM_TYPES[1:])
            )
        return cls(
            architecture=arch,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=field("num_channels", int, 3),
            hidden_size=hidden,
            num_hidden_layers=field("num_hidden_layers", int, 12),
            num_attention_heads=heads,
            intermediate_size=field("intermediate_size", int, 3072),
            hidden_act=act,
            layer_norm_eps=float(field("layer_norm_eps", float, 1e-12)),
            qkv_bias=field("qkv_bias", bool, True),
            id2label=_parse_id2label(d, source),
            problem_type=problem_type,
            model_type=model_type or ARCHITECTURES[arch][0],
        )


def _parse_id2label(d: dict, source: str) -> tuple[str, ...]:
    raw = d.get("id2label")
    n = d.get("num_labels", 2)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LABELS:
        raise ConfigError(f"{source}: 'num_labels' must be an integer in 1..{MAX_LABELS}, got {n!r:.100}")
    if raw is None:
        return tuple(f"LABEL_{i}" for i in range(n))  # transformers' default names
    # Given both, id2label decides the labels, as in transformers.
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: 'id2label' must be a non-empty object mapping class index to label")
    if len(raw) > MAX_LABELS:
        raise ConfigError(f"{source}: 'id2label' has {len(raw)} labels, more than vitnp accepts ({MAX_LABELS})")
    if not all(re.fullmatch(r"0|[1-9][0-9]*", k) for k in raw):
        raise ConfigError(f"{source}: 'id2label' keys must be integers, got {sorted(raw)[:5]!r:.100}")
    bad = next((v for v in raw.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise ConfigError(f"{source}: 'id2label' labels must be strings, got {bad!r:.100}")
    items = {int(k): v for k, v in raw.items()}
    if sorted(items) != list(range(len(items))):
        raise ConfigError(f"{source}: 'id2label' keys must be 0..{len(items) - 1} without gaps")
    return tuple(items[i] for i in range(len(items)))


def check_against_tensors(cfg: ViTConfig, shapes: Mapping[str, tuple], source: str = "config.json") -> None:
    """ConfigError naming the field when config.json claims a size the checkpoint's own tensors contradict.

    shapes: tensor name -> shape, from the checkpoint's header (no weight is read). A claim is checked against
    the tensors that carry it; when those tensors agree among themselves and the config says otherwise, the
    config is what is wrong (a checkpoint at odds with itself is left to the tensor-by-tensor validation,
    which lists every tensor). Runs before anything is built from the config, so a config that claims a
    million layers fails at once."""
    p = cfg.prefix
    layers = {int(m.group(1)) for name in shapes
              if (m := re.match(re.escape(p) + r"\.encoder\.layer\.(0|[1-9][0-9]*)\.", name))}
    top = max(layers) + 1 if layers else 0
    if cfg.num_hidden_layers > top or (layers == set(range(top)) and cfg.num_hidden_layers != top):
        raise ConfigError(f"{source}: 'num_hidden_layers' is {cfg.num_hidden_layers} but the checkpoint holds "
                          f"{len(layers)} encoder layer(s) ({p}.encoder.layer.*)")

    def carried(claim: str, claimed: int, carriers: list[tuple[str, int]]) -> None:
        seen = [(name, shapes[name], axis) for name, axis in carriers if name in shapes and len(shapes[name]) > axis]
        values = {shape[axis] for _, shape, axis in seen}
        if len(values) == 1 and claimed not in values:
            name, shape, _ = seen[0]
            raise ConfigError(f"{source}: {claim} but the checkpoint's tensors hold {values.pop()} "
                              f"({name} has shape {list(shape)})")

    emb = f"{p}.embeddings."
    projection = emb + "patch_embeddings.projection.weight"
    carried(f"'hidden_size' is {cfg.hidden_size}", cfg.hidden_size, [
        (emb + "cls_token", 2), (emb + "position_embeddings", 2), (projection, 0),
        (emb + "patch_embeddings.projection.bias", 0), (f"{p}.layernorm.weight", 0), (f"{p}.layernorm.bias", 0)])
    carried(f"'num_channels' is {cfg.num_channels}", cfg.num_channels, [(projection, 1)])
    carried(f"'patch_size' is {cfg.patch_size}", cfg.patch_size, [(projection, 2), (projection, 3)])
    carried(f"'image_size' {cfg.image_size} / 'patch_size' {cfg.patch_size} make {cfg.seq_len} positions",
            cfg.seq_len, [(emb + "position_embeddings", 1)])
    carried(f"'intermediate_size' is {cfg.intermediate_size}", cfg.intermediate_size, [
        (f"{p}.encoder.layer.{i}.{t}", axis) for i in sorted(layers)
        for t, axis in (("intermediate.dense.weight", 0), ("intermediate.dense.bias", 0),
                        ("output.dense.weight", 1))])
    heads = ("cls_classifier", "distillation_classifier") if cfg.distilled else ("classifier",)
    carried(f"'id2label' / 'num_labels' give {cfg.num_labels} labels", cfg.num_labels,
            [(f"{h}.{t}", 0) for h in heads for t in ("weight", "bias")])


def load_config(path: str | Path) -> ViTConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config.json is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config.json: {e.strerror}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError):  # nested too deeply, or an integer too long to convert
        raise ConfigError(f"{path}: not valid JSON (nested too deeply or a number too long)") from None
    return ViTConfig.from_dict(d, source=str(path))
