"""preprocessor_config.json -> PreprocessorConfig: parsing and validation, nothing decoded or allocated.

Every field is checked (type, finite, positive, within bounds) before any image is touched, and a bad
value gets a ConfigError naming the file and the field. Fields absent (or null) take transformers'
defaults for the processor class the file names (ViT or DeiT), exactly as transformers 5.x resolves them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "MAX_PIXEL_MAGNITUDE",
    "MAX_PROCESSOR_SIDE",
    "PIL_RESAMPLE_NAMES",
    "PreprocessorConfig",
    "default_preprocessor_config",
    "load_preprocessor_config",
    "target_size",
]

# transformers.utils.constants.IMAGENET_STANDARD_MEAN / _STD: the defaults of both
# ViTImageProcessor and DeiTImageProcessor (DeiT does *not* default to IMAGENET_DEFAULT_*).
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

PIL_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

# Largest resize or crop side a config may ask for. ViT/DeiT checkpoints take 224-518 pixel inputs;
# 4096 leaves ample room and bounds what one image costs after resizing: a 4096 x 4096 RGB image is
# 64 MB in PIL and its float32 pixel values 192 MB. A 30000-pixel size (1 GB per image before a
# 32-pixel crop) is a broken or hostile file, refused before anything is allocated.
MAX_PROCESSOR_SIDE = 4096

# Largest magnitude a preprocessed pixel value may reach.  ViT/DeiT inputs lie within a few units of zero (1/255
# rescaling, ImageNet mean and std); a million times that is still a valid config, but a rescale_factor, mean or
# std far beyond it (a 1e35 rescale_factor, a 1e-30 std) only makes the forward pass overflow float32 into NaN
# scores, so such a file is refused at load, naming the fields.
MAX_PIXEL_MAGNITUDE = 1e6

# image_processor_type / feature_extractor_type values whose defaults we know.
PROCESSOR_TYPE_TO_MODEL = {
    "ViTFeatureExtractor": "vit",
    "ViTImageProcessor": "vit",
    "ViTImageProcessorFast": "vit",
    "ViTImageProcessorPil": "vit",
    "DeiTFeatureExtractor": "deit",
    "DeiTImageProcessor": "deit",
    "DeiTImageProcessorFast": "deit",
    "DeiTImageProcessorPil": "deit",
}


@dataclass(frozen=True)
class PreprocessorConfig:
    """The resolved preprocessing parameters (transformers' defaults already filled in).

    Exactly one of `size` ((height, width)) and `shortest_edge` is set when do_resize.
    """

    do_resize: bool = True
    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    resample: int = 2
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD

    def __post_init__(self) -> None:
        _validate_fields("PreprocessorConfig", {k: getattr(self, k) for k in self.__dataclass_fields__})
        # tuples keep the config hashable (it keys the value-table cache)
        for name in ("size", "crop_size", "image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                cast = float if name.startswith("image_") else int
                object.__setattr__(self, name, tuple(cast(v) for v in value))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: dict, model_type: str | None = None, source: str = "preprocessor config") -> "PreprocessorConfig":
        """Parse a preprocessor_config.json dict (old FeatureExtractor or new ImageProcessor form).

        Fields absent (or null) take the defaults of the processor class named by
        image_processor_type / feature_extractor_type, else of `model_type` ("vit"/"deit").
        """
        return _config_from_dict(d, model_type, source)


def default_preprocessor_config(model_type: str = "vit") -> PreprocessorConfig:
    """transformers' class defaults, for checkpoints without preprocessor_config.json."""
    kind = _model_kind(model_type, source="model_type")
    if kind == "deit":
        return PreprocessorConfig(
            do_resize=True, size=(256, 256), shortest_edge=None, resample=3,
            do_center_crop=True, crop_size=(224, 224),
            do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
        )
    return PreprocessorConfig(
        do_resize=True, size=(224, 224), shortest_edge=None, resample=2,
        do_center_crop=False, crop_size=None,
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
    )


def load_preprocessor_config(path: str | os.PathLike, model_type: str | None = None) -> PreprocessorConfig:
    """Read preprocessor_config.json; ConfigError (naming the file) if unreadable or invalid."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read file ({e.strerror or e})") from None
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, so not a JSON preprocessor config") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return _config_from_dict(d, model_type, source=path)


def target_size(cfg: PreprocessorConfig) -> tuple[int, int]:
    """(H, W) of every preprocessed image; ConfigError when it depends on the input image."""
    if cfg.do_center_crop:
        return cfg.crop_size  # type: ignore[return-value]
    if cfg.do_resize and cfg.size is not None:
        return cfg.size
    raise ConfigError(
        "preprocessor config: the output size depends on each input image "
        + ("(resize to shortest_edge without center crop)" if cfg.do_resize else "(no resize and no center crop)")
        + "; a ViT needs a fixed input size"
    )


# --------------------------------------------------------------------------- parsing


def _model_kind(model_type: str, source: str) -> str:
    if model_type in ("vit", "deit"):
        return model_type
    raise ConfigError(f"{source}: unsupported model type {model_type!r} (expected 'vit' or 'deit')")


def _processor_kind(d: dict, model_type: str | None, source: str) -> str:
    for field in ("image_processor_type", "feature_extractor_type"):
        name = d.get(field)
        if name is None:
            continue
        if not isinstance(name, str) or name not in PROCESSOR_TYPE_TO_MODEL:
            known = ", ".join(sorted(PROCESSOR_TYPE_TO_MODEL))
            raise ConfigError(f"{source}: field '{field}' is {name!r}; supported processors are {known}")
        return PROCESSOR_TYPE_TO_MODEL[name]
    return _model_kind(model_type or "vit", source)


def _field_error(source: str, field: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{source}: field '{field}' must be {expected}, got {value!r}")


def _parse_bool(d: dict, field: str, default: bool, source: str) -> bool:
    value = d.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(source, field, value, "true or false")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_side(x: Any) -> bool:
    """A resize or crop side: an int in 1..MAX_PROCESSOR_SIDE."""
    return _is_int(x) and 0 < x <= MAX_PROCESSOR_SIDE


def _is_hw(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_side(v) for v in x)


_SIDE = f"1..{MAX_PROCESSOR_SIDE}"


def _parse_hw(value: Any, field: str, source: str, default_to_square: bool = True) -> tuple[tuple[int, int] | None, int | None]:
    """Mirror transformers' get_size_dict: int -> square (or shortest edge), [h, w], or a dict."""
    expected = (f'an int in {_SIDE}, [height, width], {{"height": h, "width": w}} or {{"shortest_edge": s}}'
                if field == "size" else f'an int in {_SIDE}, [height, width] or {{"height": h, "width": w}}')
    if _is_side(value):
        return ((value, value), None) if default_to_square else (None, value)
    if _is_hw(value):
        return (value[0], value[1]), None
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"height", "width"} and all(_is_side(value[k]) for k in keys):
            return (value["height"], value["width"]), None
        if field == "size" and keys == {"shortest_edge"} and _is_side(value["shortest_edge"]):
            return None, value["shortest_edge"]
    raise _field_error(source, field, value, expected)


def _parse_triplet(d: dict, field: str, default: tuple[float, float, float], source: str) -> tuple[float, float, float]:
    value = d.get(field)
    if value is None:
        return default
    if _is_number(value):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise _field_error(source, field, value, "a list of 3 finite numbers (one per RGB channel)")


def _config_from_dict(d: Any, model_type: str | None, source: str) -> PreprocessorConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    defaults = default_preprocessor_config(_processor_kind(d, model_type, source))

    default_to_square = _parse_bool(d, "default_to_square", True, source)
    size, shortest_edge = defaults.size, defaults.shortest_edge
    if d.get("size") is not None:
        size, shortest_edge = _parse_hw(d["size"], "size", source, default_to_square)
    crop_size = defaults.crop_size
    if d.get("crop_size") is not None:
        crop_size, _ = _parse_hw(d["crop_size"], "crop_size", source)

    resample = d.get("resample")
    if resample is None:
        resample = defaults.resample
    rescale_factor = d.get("rescale_factor")
    if rescale_factor is None:
        rescale_factor = defaults.rescale_factor

    if _parse_bool(d, "do_pad", False, source):
        raise ConfigError(f"{source}: field 'do_pad' is true; padding is not supported for ViT/DeiT classifiers")

    fields = dict(
        do_resize=_parse_bool(d, "do_resize", defaults.do_resize, source),
        size=size,
        shortest_edge=shortest_edge,
        resample=resample,
        do_center_crop=_parse_bool(d, "do_center_crop", defaults.do_center_crop, source),
        crop_size=crop_size,
        do_rescale=_parse_bool(d, "do_rescale", defaults.do_rescale, source),
        rescale_factor=rescale_factor,
        do_normalize=_parse_bool(d, "do_normalize", defaults.do_normalize, source),
        image_mean=_parse_triplet(d, "image_mean", defaults.image_mean, source),
        image_std=_parse_triplet(d, "image_std", defaults.image_std, source),
    )
    # Validate here so the error names the file rather than "PreprocessorConfig".
    _validate_fields(source, fields)
    return PreprocessorConfig(**fields)


def _validate_fields(source: str, f: dict) -> None:
    """Every field's type and range; the checks PreprocessorConfig(...) and the file parser share.

    Fields are checked whether or not their do_* flag uses them, so a file is valid or not as a whole.
    """
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(f[name], (bool, np.bool_)):
            raise _field_error(source, name, f[name], "true or false")
    if f["size"] is not None and not _is_hw(f["size"]):
        raise _field_error(source, "size", f["size"], f"(height, width), each an int in {_SIDE}")
    if f["shortest_edge"] is not None and not _is_side(f["shortest_edge"]):
        raise _field_error(source, "shortest_edge", f["shortest_edge"], f"an int in {_SIDE}")
    if f["do_resize"] and (f["size"] is None) == (f["shortest_edge"] is None):
        raise ConfigError(f"{source}: do_resize needs exactly one of 'size' (height, width) and 'shortest_edge'")
    if not _is_int(f["resample"]) or f["resample"] not in PIL_RESAMPLE_NAMES:
        raise _field_error(source, "resample", f["resample"], "a PIL resampling filter number 0-5 ("
                           + ", ".join(f"{k}={v}" for k, v in PIL_RESAMPLE_NAMES.items()) + ")")
    if f["crop_size"] is not None and not _is_hw(f["crop_size"]):
        raise _field_error(source, "crop_size", f["crop_size"], f"(height, width), each an int in {_SIDE}")
    if f["do_center_crop"] and f["crop_size"] is None:
        raise ConfigError(f"{source}: field 'crop_size' is required when do_center_crop is true")
    if not (_is_number(f["rescale_factor"]) and f["rescale_factor"] > 0):
        raise _field_error(source, "rescale_factor", f["rescale_factor"], "a positive finite number (usually 1/255)")
    for name in ("image_mean", "image_std"):
        v = f[name]
        if not (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(x) for x in v)):
            raise _field_error(source, name, v, "3 finite numbers (one per RGB channel)")
    if not all(s > 0 for s in f["image_std"]):
        raise _field_error(source, "image_std", f["image_std"], "3 positive numbers (they divide the pixel values)")
    largest = _largest_pixel_magnitude(f)
    if largest > MAX_PIXEL_MAGNITUDE:
        raise ConfigError(
            f"{source}: 'rescale_factor' {f['rescale_factor']!r}, 'image_mean' {list(f['image_mean'])} and "
            f"'image_std' {list(f['image_std'])} turn pixel values into numbers up to {largest:.3g} (more than "
            f"{MAX_PIXEL_MAGNITUDE:.0e}); a ViT expects values within a few units of zero (usually rescale_factor "
            f"1/255 and ImageNet's mean and std)")


def _largest_pixel_magnitude(f: dict) -> float:
    """The largest |value| the rescale and normalize steps (as their do_* flags say) give a 0-255 pixel."""
    scale = f["rescale_factor"] if f["do_rescale"] else 1.0
    mean, std = (f["image_mean"], f["image_std"]) if f["do_normalize"] else ((0.0,) * 3, (1.0,) * 3)
    return max(max(abs(m), abs(255.0 * scale - m)) / s for m, s in zip(mean, std))
