"""config.json of a ViT / DeiT image classifier -> one frozen ViTConfig."""

from __future__ import annotations

import json
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
        supported = ", ".join(ARCHITECTURES)
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            if not archs and d.get("model_type") in ("vit", "deit"):
                # save_pretrained always writes "architectures"; a bare config is a base model.
                raise ConfigError(
                    f"{source}: no 'architectures' entry; vitnp needs an image-classification checkpoint "
                    f"({supported})"
                )
            raise ConfigError(
                f"{source}: unsupported architecture {archs or d.get('model_type')!r}; "
                f"vitnp supports {supported}"
            )

        def field(name, kind, default=None):
            value = d.get(name, default)
            if value is None:
                raise ConfigError(f"{source}: missing required field {name!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{source}: {name!r} must be a positive integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{source}: {name!r} must be a positive number, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{source}: {name!r} must be true or false, got {value!r}")
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
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{source}: unsupported hidden_act {act!r}; vitnp supports {', '.join(SUPPORTED_ACTIVATIONS)} "
                "(the exact erf GELU)"
            )
        problem_type = d.get("problem_type")
        if problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"{source}: unknown problem_type {problem_type!r}; expected one of "
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
            model_type=d.get("model_type", ARCHITECTURES[arch][0]),
        )


def _parse_id2label(d: dict, source: str) -> tuple[str, ...]:
    raw = d.get("id2label")
    if raw is None:
        n = d.get("num_labels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{source}: 'num_labels' must be a positive integer, got {n!r}")
        return tuple(f"LABEL_{i}" for i in range(n))  # transformers' default names
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: 'id2label' must be a non-empty object mapping class index to label")
    try:
        items = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: 'id2label' keys must be integers, got {sorted(raw)[:5]!r}") from None
    if sorted(items) != list(range(len(items))):
        raise ConfigError(f"{source}: 'id2label' keys must be 0..{len(items) - 1} without gaps")
    return tuple(items[i] for i in range(len(items)))


def load_config(path: str | Path) -> ViTConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config.json: {e.strerror}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return ViTConfig.from_dict(d, source=str(path))
