"""Image loading and preprocessing, bit-identical to transformers' PIL image processor.

What transformers 5.x does (ViTImageProcessorPil / DeiTImageProcessorPil, i.e.
`image_processing_backends.PilBackend` + `image_transforms`), and so what we do:

1. `image_utils.load_image`: `ImageOps.exif_transpose(img).convert("RGB")` (the
   image-classification pipeline applies it to every input, PIL images included).
   Transparency is dropped by `convert`, not composited.
2. resize: uint8 RGB -> `PIL.Image.resize((w, h), resample)`, reducing_gap=None.
   `{"height","width"}` is the exact target; `{"shortest_edge": s}` keeps the
   aspect ratio with `long = int(s * long / short)`.
3. center crop on the uint8 array: top = (H - ch) // 2, left = (W - cw) // 2;
   where the crop is larger than the image the missing pixels are 0 (uint8 zero
   padding *before* rescale/normalize).
4. rescale: `(x.astype(float64) * rescale_factor).astype(float32)`.
5. normalize: `(x - float32(mean)) / float32(std)` in float32 (two roundings).
   Without rescale, uint8 is first cast to float32.

Steps 4-5 map each uint8 value v of channel c to one float32; we compute that
map once per config with the very same numpy operations (a (3, 256) table)
and apply it with `np.take`, which yields the same bits without any float work
per pixel.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError, ImageError, ParameterError

__all__ = [
    "PreprocessorConfig",
    "default_preprocessor_config",
    "load_preprocessor_config",
    "load_image",
    "preprocess",
    "target_size",
]

# transformers.utils.constants.IMAGENET_STANDARD_MEAN / _STD: the defaults of both
# ViTImageProcessor and DeiTImageProcessor (DeiT does *not* default to IMAGENET_DEFAULT_*).
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

PIL_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

# image_processor_type / feature_extractor_type values whose defaults we know.
_PROCESSOR_TYPE_TO_MODEL = {
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
        _validate_config(self, source="PreprocessorConfig")
        # tuples keep the config hashable (it keys the value-table cache)
        for name in ("size", "crop_size", "image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                cast = float if name.startswith("image_") else int
                object.__setattr__(self, name, tuple(cast(v) for v in value))
        if _is_number(self.rescale_factor):
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


# --------------------------------------------------------------------------- config parsing


def _model_kind(model_type: str, source: str) -> str:
    if model_type in ("vit", "deit"):
        return model_type
    raise ConfigError(f"{source}: unsupported model type {model_type!r} (expected 'vit' or 'deit')")


def _processor_kind(d: dict, model_type: str | None, source: str) -> str:
    for field in ("image_processor_type", "feature_extractor_type"):
        name = d.get(field)
        if name is None:
            continue
        if not isinstance(name, str) or name not in _PROCESSOR_TYPE_TO_MODEL:
            known = ", ".join(sorted(_PROCESSOR_TYPE_TO_MODEL))
            raise ConfigError(f"{source}: field '{field}' is {name!r}; supported processors are {known}")
        return _PROCESSOR_TYPE_TO_MODEL[name]
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


def _positive_int(x: Any) -> bool:
    return _is_int(x) and x > 0


def _parse_hw(value: Any, field: str, source: str, default_to_square: bool = True) -> tuple[tuple[int, int] | None, int | None]:
    """Mirror transformers' get_size_dict: int -> square (or shortest edge), [h, w], or a dict."""
    expected = ('a positive int, [height, width], {"height": h, "width": w} or {"shortest_edge": s}'
                if field == "size" else 'a positive int, [height, width] or {"height": h, "width": w}')
    if _positive_int(value):
        return ((value, value), None) if default_to_square else (None, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive_int(v) for v in value):
        return (value[0], value[1]), None
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"height", "width"} and all(_positive_int(value[k]) for k in keys):
            return (value["height"], value["width"]), None
        if field == "size" and keys == {"shortest_edge"} and _positive_int(value["shortest_edge"]):
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
    elif not _is_int(resample) or resample not in PIL_RESAMPLE_NAMES:
        raise _field_error(source, "resample", resample,
                           "a PIL resampling filter number 0-5 (" + ", ".join(f"{k}={v}" for k, v in PIL_RESAMPLE_NAMES.items()) + ")")

    rescale_factor = d.get("rescale_factor")
    if rescale_factor is None:
        rescale_factor = defaults.rescale_factor
    elif not _is_number(rescale_factor) or rescale_factor <= 0:
        raise _field_error(source, "rescale_factor", rescale_factor, "a positive finite number (usually 1/255)")

    if _parse_bool(d, "do_pad", False, source):
        raise ConfigError(f"{source}: field 'do_pad' is true; padding is not supported for ViT/DeiT classifiers")

    return _build_config(
        source,
        do_resize=_parse_bool(d, "do_resize", defaults.do_resize, source),
        size=size,
        shortest_edge=shortest_edge,
        resample=resample,
        do_center_crop=_parse_bool(d, "do_center_crop", defaults.do_center_crop, source),
        crop_size=crop_size,
        do_rescale=_parse_bool(d, "do_rescale", defaults.do_rescale, source),
        rescale_factor=float(rescale_factor),
        do_normalize=_parse_bool(d, "do_normalize", defaults.do_normalize, source),
        image_mean=_parse_triplet(d, "image_mean", defaults.image_mean, source),
        image_std=_parse_triplet(d, "image_std", defaults.image_std, source),
    )


def _build_config(source: str, **fields: Any) -> PreprocessorConfig:
    # Validate first so the error names the file rather than "PreprocessorConfig".
    _validate_fields(source, fields)
    return PreprocessorConfig(**fields)


def _validate_config(cfg: PreprocessorConfig, source: str) -> None:
    _validate_fields(source, {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


def _validate_fields(source: str, f: dict) -> None:
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(f[name], (bool, np.bool_)):
            raise _field_error(source, name, f[name], "true or false")
    if f["do_resize"]:
        if (f["size"] is None) == (f["shortest_edge"] is None):
            raise ConfigError(f"{source}: do_resize needs exactly one of 'size' (height, width) and 'shortest_edge'")
        if f["size"] is not None and not (isinstance(f["size"], (tuple, list)) and len(f["size"]) == 2 and all(_positive_int(v) for v in f["size"])):
            raise _field_error(source, "size", f["size"], "(height, width) positive ints")
        if f["shortest_edge"] is not None and not _positive_int(f["shortest_edge"]):
            raise _field_error(source, "shortest_edge", f["shortest_edge"], "a positive int")
        if not _is_int(f["resample"]) or f["resample"] not in PIL_RESAMPLE_NAMES:
            raise _field_error(source, "resample", f["resample"], "a PIL resampling filter number 0-5")
    if f["do_center_crop"]:
        crop = f["crop_size"]
        if crop is None:
            raise ConfigError(f"{source}: field 'crop_size' is required when do_center_crop is true")
        if not (isinstance(crop, (tuple, list)) and len(crop) == 2 and all(_positive_int(v) for v in crop)):
            raise _field_error(source, "crop_size", crop, "(height, width) positive ints")
    if f["do_rescale"] and not (_is_number(f["rescale_factor"]) and f["rescale_factor"] > 0):
        raise _field_error(source, "rescale_factor", f["rescale_factor"], "a positive finite number")
    if f["do_normalize"]:
        for name in ("image_mean", "image_std"):
            v = f[name]
            if not (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(x) for x in v)):
                raise _field_error(source, name, v, "3 finite numbers (one per RGB channel)")
        if any(s == 0 for s in f["image_std"]):
            raise _field_error(source, "image_std", f["image_std"], "non-zero (it divides the pixel values)")


# --------------------------------------------------------------------------- image loading


_BOMB_CHECK_LOCK = threading.Lock()


def _bomb_message(size: tuple[int, int] | None, pixels: int | None) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    what = f"{size[0]} x {size[1]} pixels" if size else f"{pixels} pixels"
    return f"image too large: {what} exceeds the limit {limit}"


def _size_from_bomb_traceback(exc: BaseException) -> tuple[int, int] | None:
    # PIL raises from inside Image.open, before returning the image; its frame
    # still holds the opened image (`im`), the only place W x H is known.
    tb = exc.__traceback__
    size = None
    while tb is not None:
        im = tb.tb_frame.f_locals.get("im")
        if isinstance(im, Image.Image):
            size = im.size
        tb = tb.tb_next
    return size


def _decode_to_rgb(fp: Any, name: str) -> Image.Image:
    """Image.open + full decode + load_image's RGB conversion; every failure -> one ImageError."""
    try:
        # catch_warnings swaps the process-wide filter list, which is not thread-safe; the
        # lock keeps our threads from interleaving it. Only the (cheap) header parse in
        # Image.open checks the size, so decoding stays outside the lock.
        with _BOMB_CHECK_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
        img.load()  # decode now, so truncated/corrupt data fails here and not later
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        digits = [int(t) for t in str(e).replace("(", " ").split() if t.isdigit()]
        pixels = digits[0] if digits else None
        raise ImageError(f"{name}: {_bomb_message(_size_from_bomb_traceback(e), pixels)}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or an image format PIL cannot read") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL decoders raise OSError/SyntaxError/ValueError/struct.error/...
        detail = str(e) or type(e).__name__
        if "truncated" in detail or isinstance(e, EOFError):
            raise ImageError(f"{name}: truncated or corrupt image file ({detail})") from None
        raise ImageError(f"{name}: cannot decode image ({detail})") from None
    return _to_rgb(img, name)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """transformers.image_utils.load_image's last two lines."""
    try:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"{name}: cannot read {img.mode} image as RGB ({e})") from None


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"image array must have dtype uint8 (0-255), got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image array is empty, shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


def load_image(x: Any) -> Image.Image:
    """Any supported input -> fully decoded, EXIF-upright PIL image in mode RGB.

    Accepts a path (str / os.PathLike), bytes / bytearray / memoryview of an
    encoded image, a binary file object, a PIL image, or a uint8 numpy array
    (H, W), (H, W, 3) or (H, W, 4). Raises ImageError with one clear message.
    """
    if isinstance(x, Image.Image):
        return _to_rgb(x, "image")
    if isinstance(x, np.ndarray):
        return _to_rgb(_array_to_pil(x), "image array")
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if not isinstance(path, str):
            path = os.fsdecode(path)
        name = f"'{path}'"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a directory, not an image file") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot open file ({e.strerror or e})") from None
        with f:
            return _decode_to_rgb(f, name)
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
        if not data:
            raise ImageError("image bytes are empty")
        return _decode_to_rgb(io.BytesIO(data), "image bytes")
    if isinstance(x, io.TextIOBase):
        raise ImageError("image file object is open in text mode; open it with 'rb'")
    if hasattr(x, "read"):
        name = f"'{x.name}'" if isinstance(getattr(x, "name", None), str) else "image file object"
        return _decode_to_rgb(x, name)
    raise ImageError(
        f"unsupported image input of type {type(x).__name__}: pass a file path, bytes, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )


# --------------------------------------------------------------------------- preprocessing


@lru_cache(maxsize=32)
def _value_table(cfg: PreprocessorConfig) -> np.ndarray:
    """(3, 256) float32: channel c, uint8 value v -> transformers' rescale+normalize output, same ops."""
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    if cfg.do_rescale:
        # image_transforms.rescale: upcast to float64, multiply, downcast to float32
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        # image_transforms.normalize: non-float -> float32; mean/std as arrays of the image dtype
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean = np.array(cfg.image_mean, dtype=x.dtype)[:, None]
        std = np.array(cfg.image_std, dtype=x.dtype)[:, None]
        x = (x - mean) / std
    table = np.ascontiguousarray(x, dtype=np.float32)
    table.setflags(write=False)
    return table


def _resize_shape(height: int, width: int, cfg: PreprocessorConfig) -> tuple[int, int]:
    """image_transforms.get_resize_output_image_size, as PilBackend.resize calls it."""
    if cfg.size is not None:
        return cfg.size
    s = cfg.shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = s, int(s * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _output_shape(height: int, width: int, cfg: PreprocessorConfig) -> tuple[int, int]:
    if cfg.do_resize:
        height, width = _resize_shape(height, width, cfg)
    if cfg.do_center_crop:
        height, width = cfg.crop_size
    return height, width


def _write_one(img: Image.Image, cfg: PreprocessorConfig, table: np.ndarray, dst: np.ndarray) -> None:
    """Resize, crop, rescale+normalize one RGB image into dst (3, H, W) float32."""
    if cfg.do_resize:
        h, w = _resize_shape(img.height, img.width, cfg)
        img = img.resize((w, h), resample=cfg.resample)
    pixels = np.asarray(img)  # (H, W, 3) uint8
    src_h, src_w = pixels.shape[:2]
    out_h, out_w = dst.shape[1:]
    # image_transforms.center_crop: output row r is source row r + (H - ch) // 2, zero outside.
    top, left = (src_h - out_h) // 2, (src_w - out_w) // 2
    r0, r1 = max(0, -top), min(out_h, src_h - top)
    c0, c1 = max(0, -left), min(out_w, src_w - left)
    padded = r0 > 0 or c0 > 0 or r1 < out_h or c1 < out_w
    for c in range(3):
        if padded:
            dst[c].fill(table[c, 0])
        np.take(table[c], pixels[top + r0: top + r1, left + c0: left + c1, c], out=dst[c, r0:r1, c0:c1], mode="clip")


def preprocess(images: Any, cfg: PreprocessorConfig, out: np.ndarray | None = None) -> np.ndarray:
    """One image or a list of images -> float32 (B, 3, H, W) pixel_values, as transformers computes them.

    `out`, if given, must be a C-contiguous float32 array of the result's shape; it
    is filled and returned (no allocation for the batch).
    """
    items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
    if len(items) == 0:
        raise ParameterError("no images given (empty list)")
    rgb = [load_image(x) for x in items]
    shapes = {_output_shape(im.height, im.width, cfg) for im in rgb}
    if len(shapes) > 1:
        raise ParameterError(
            f"the images have different sizes after preprocessing ({sorted(shapes)}); "
            "with this preprocessor config pass them one at a time"
        )
    h, w = shapes.pop()
    expected = (len(rgb), 3, h, w)
    if out is None:
        out = np.empty(expected, dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == expected
              and out.flags.c_contiguous and out.flags.writeable):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ParameterError(f"out must be a writable C-contiguous float32 array of shape {expected}, got {got}")
    table = _value_table(cfg)
    for i, img in enumerate(rgb):
        _write_one(img, cfg, table, out[i])
    return out
