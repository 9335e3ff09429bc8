"""Image decoding and preprocessing, bit-identical to transformers' PIL image processor.

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

Memory: an encoded image's width x height is read from its header (Image.open
decodes nothing) and checked against a pixel limit before any pixel is decoded.
`image_pixels` turns one image into its (3, H, W) values and lets go of the
full-size image before it returns, so a batch holds one full-size image per
decoding thread, never one per image. The parity above holds for every image of
at most EXACT_DECODE_MAX_PIXELS; larger JPEGs are decoded at reduced scale
(see there).

The preprocessor config (parsing, validation) lives in vitnp.processor_config;
its public names are re-exported here.
"""

from __future__ import annotations

import ctypes
import io
import os
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, ParameterError
from .processor_config import (
    MAX_PROCESSOR_SIDE,
    PreprocessorConfig,
    default_preprocessor_config,
    load_preprocessor_config,
    target_size,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EXACT_DECODE_MAX_PIXELS",
    "MAX_IMAGE_SIDE",
    "PreprocessorConfig",
    "default_preprocessor_config",
    "image_pixels",
    "load_image",
    "load_preprocessor_config",
    "preprocess",
    "release_memory",
    "target_size",
]

# Largest width x height decoded unless the caller passes its own limit. 40 MP (e.g. 7300 x 5475) is
# above what phone cameras save by default (12-24 MP; their 48-200 MP sensors bin down) and what
# most camera bodies save; a 224-pixel classifier gains nothing from more. It bounds one decode:
# Pillow holds RGB at 4 bytes a pixel, so 160 MB for the largest RGB PNG allowed (200 MB for a
# grayscale or RGBA one, decoded and then converted), and JPEGs this large are decoded at half
# scale (EXACT_DECODE_MAX_PIXELS), 40 MB. Pillow's own default is 89 MP.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

# Longest side accepted, whatever the pixel limit. Pillow keeps an 8-byte pointer per image row in
# every copy of an image, so memory follows the height as well as the pixel count: a 1 x 80,000,000
# PNG (156 KB of zeros) takes 2.3 GB to preprocess, a 1 x 40,000,000 one 1.1 GB. 65,535 is the
# largest side a JPEG can have; camera and phone panorama images stay well below it.
MAX_IMAGE_SIDE = 65_535

# Images of up to this many pixels are decoded in full and preprocessed bit-identically to
# transformers. Larger JPEGs are decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself
# (Pillow's draft(): the smallest such reduction that leaves at most this many pixels, at least 4 MP
# and so still 80x the pixels of a 224 x 224 input), which keeps their decode to <= 64 MB. That
# changes their pixel values slightly (DCT scaling is not PIL's resize), so parity is not promised
# for them. 16 MP covers the full-size output of 12 MP and 16 MP phone cameras exactly.
EXACT_DECODE_MAX_PIXELS = 16_000_000

# After decoding at least this many pixels glibc is asked to give freed memory back to the system
# (malloc_trim): Pillow frees a large decode in 16 MB blocks that glibc otherwise keeps in the
# decoding thread's arena, so a server's resident memory would stay at its largest image.
TRIM_AFTER_PIXELS = 4_000_000


# --------------------------------------------------------------------------- opening (header only)


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    """ImageError unless width x height is within max_pixels, each side within MAX_IMAGE_SIDE, and the
    pixel count within Pillow's own limit: Pillow only warns between its limit and twice it, and
    code that lowers Image.MAX_IMAGE_PIXELS means it as a limit, so it refuses here too."""
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(f"{name}: image too large: {width} x {height} pixels ({pixels}) "
                         f"exceeds the limit of {max_pixels} pixels")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(f"{name}: image too large: {width} x {height} pixels; "
                         f"a side longer than {MAX_IMAGE_SIDE} is not accepted")
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image too large: {width} x {height} pixels ({pixels}) "
                         f"exceeds Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)")


def _decode_error(name: str, e: BaseException) -> ImageError:
    """Any exception of Image.open / Image.load -> one ImageError for people."""
    if isinstance(e, FileNotFoundError):
        return ImageError(f"{name}: no such file")
    if isinstance(e, IsADirectoryError):
        return ImageError(f"{name}: is a directory, not an image file")
    if isinstance(e, PermissionError):
        return ImageError(f"{name}: permission denied")
    if isinstance(e, Image.DecompressionBombError):
        # Pillow's own check inside Image.open, before ours, where a caller set Image.MAX_IMAGE_PIXELS
        # below half our limit; its message says how many pixels.
        return ImageError(f"{name}: image too large ({e})")
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageError(f"{name}: not an image, or an image format PIL cannot read")
    detail = str(e) or type(e).__name__  # PIL decoders raise OSError/SyntaxError/ValueError/struct.error/...
    if "truncated" in detail or isinstance(e, EOFError):
        return ImageError(f"{name}: truncated or corrupt image file ({detail})")
    return ImageError(f"{name}: cannot decode image ({detail})")


def _open_encoded(fp: Any, name: str, max_pixels: int) -> Image.Image:
    """Image.open (reads the header only) and the size check; nothing is decoded yet."""
    try:
        img = Image.open(fp)
    except MemoryError:
        raise
    except Exception as e:
        raise _decode_error(name, e) from None
    _check_size(name, img.width, img.height, max_pixels)
    return img


def _decode(img: Image.Image, name: str) -> None:
    """Decode now, so truncated/corrupt data fails here (as an ImageError) and not later."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:
        raise _decode_error(name, e) from None


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


# --------------------------------------------------------------------------- decoding


def _draft_scale(img: Image.Image) -> int:
    """1, or the JPEG decoder's reduction (2, 4, 8) for a JPEG above EXACT_DECODE_MAX_PIXELS."""
    if img.format != "JPEG" or img.width * img.height <= EXACT_DECODE_MAX_PIXELS:
        return 1
    for scale in (2, 4, 8):
        if -(-img.width // scale) * -(-img.height // scale) <= EXACT_DECODE_MAX_PIXELS:  # the decoder rounds up
            return scale
    return 8


def _upright_rgb(img: Image.Image, name: str, owned: bool) -> Image.Image:
    """transformers.image_utils.load_image's last two lines: exif_transpose, then convert("RGB").

    On an image we own, exif_transpose works in place and an RGB image is not copied by
    convert (Pillow's convert to the same mode is a copy), so at most two full-size images
    exist at once.
    """
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
        return img if img.mode == "RGB" else img.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"{name}: cannot read {img.mode} image as RGB ({e})") from None


def _decoded_file(fp: Any, name: str, max_pixels: int, reduce: bool) -> Image.Image:
    """Open (header only), check the size, decode (JPEGs above EXACT_DECODE_MAX_PIXELS at reduced scale
    if `reduce`), then EXIF-upright RGB."""
    img = _open_encoded(fp, name, max_pixels)
    if reduce:
        scale = _draft_scale(img)
        if scale > 1:
            # draft picks the largest of 8, 4, 2 that is <= min(W // w, H // h): exactly `scale` here
            img.draft(None, (max(1, img.width // scale), max(1, img.height // scale)))
    _decode(img, name)
    return _upright_rgb(img, name, owned=True)


def _decoded(x: Any, max_pixels: int, reduce: bool) -> tuple[Image.Image, str]:
    """Any supported input -> (decoded EXIF-upright RGB image, the input's name for messages).

    Encoded inputs (path, bytes, file object) are size-checked from their header before
    decoding. Only the returned image is still referenced when this returns.
    """
    if not (isinstance(max_pixels, int) and not isinstance(max_pixels, bool) and max_pixels > 0):
        raise ParameterError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(x, Image.Image):
        return _upright_rgb(x, "image", owned=False), "image"
    if isinstance(x, np.ndarray):
        return _upright_rgb(_array_to_pil(x), "image array", owned=True), "image array"
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
            return _decoded_file(f, name, max_pixels, reduce), name
    if isinstance(x, (bytes, bytearray, memoryview)):
        if not len(x):
            raise ImageError("image bytes are empty")
        return _decoded_file(io.BytesIO(x), "image bytes", max_pixels, reduce), "image bytes"
    if isinstance(x, io.TextIOBase):
        raise ImageError("image file object is open in text mode; open it with 'rb'")
    if hasattr(x, "read"):
        name = f"'{x.name}'" if isinstance(getattr(x, "name", None), str) else "image file object"
        return _decoded_file(x, name, max_pixels, reduce), name
    raise ImageError(
        f"unsupported image input of type {type(x).__name__}: pass a file path, bytes, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )


def release_memory() -> None:
    """Hand memory freed by a large decode back to the system (glibc only; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl and non-Linux systems have no malloc_trim)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def load_image(x: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Any supported input -> fully decoded, EXIF-upright PIL image in mode RGB, at full size.

    Accepts a path (str / os.PathLike), bytes / bytearray / memoryview of an
    encoded image, a binary file object, a PIL image, or a uint8 numpy array
    (H, W), (H, W, 3) or (H, W, 4). An encoded image whose width x height exceeds
    `max_pixels`, or whose side exceeds MAX_IMAGE_SIDE, is refused from its header,
    before decoding. Raises ImageError with one clear message.
    """
    return _decoded(x, max_pixels, reduce=False)[0]


# --------------------------------------------------------------------------- pixel values


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


def _output_shape(height: int, width: int, cfg: PreprocessorConfig, name: str) -> tuple[int, int]:
    """(H, W) of the pixel values; ImageError where they would be more than a config may ask for.

    Only configs whose output follows the image (shortest_edge without a crop, or no resize and no
    crop) can get there, e.g. a shortest_edge resize of a very long image."""
    if cfg.do_resize:
        height, width = _resize_shape(height, width, cfg)
    if cfg.do_center_crop:
        height, width = cfg.crop_size
    if height * width > MAX_PROCESSOR_SIDE ** 2:
        raise ImageError(f"{name}: preprocessing would make it {width} x {height} pixels, more than "
                         f"{MAX_PROCESSOR_SIDE} x {MAX_PROCESSOR_SIDE} with this preprocessor config")
    return height, width


def _check_out(out: Any, expected: tuple[int, ...]) -> None:
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == expected
            and out.flags.c_contiguous and out.flags.writeable):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ParameterError(f"out must be a writable C-contiguous float32 array of shape {expected}, got {got}")


def image_pixels(x: Any, cfg: PreprocessorConfig, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 out: np.ndarray | None = None) -> np.ndarray:
    """One image -> its float32 (3, H, W) pixel values, as transformers computes them.

    Decodes, converts, resizes, crops and normalises, and lets go of the full-size image
    before returning, so a caller working through a batch holds at most one full-size image
    per thread. `x` is any input load_image accepts; encoded images above `max_pixels` (or
    with a side above MAX_IMAGE_SIDE) are refused from their header with an ImageError.
    `out`, if given, must be a writable C-contiguous float32 (3, H, W) array; it is filled
    and returned.
    """
    img, name = _decoded(x, max_pixels, reduce=True)
    decoded_pixels = img.width * img.height
    h, w = _output_shape(img.height, img.width, cfg, name)
    if out is None:
        out = np.empty((3, h, w), dtype=np.float32)
    else:
        _check_out(out, (3, h, w))
    if cfg.do_resize:
        rh, rw = _resize_shape(img.height, img.width, cfg)
        img = img.resize((rw, rh), resample=cfg.resample)  # the last reference to the full-size image goes
    pixels = np.asarray(img)  # (H, W, 3) uint8, a copy
    del img
    if decoded_pixels >= TRIM_AFTER_PIXELS:
        release_memory()
    table = _value_table(cfg)
    src_h, src_w = pixels.shape[:2]
    # image_transforms.center_crop: output row r is source row r + (H - ch) // 2, zero outside.
    top, left = (src_h - h) // 2, (src_w - w) // 2
    r0, r1 = max(0, -top), min(h, src_h - top)
    c0, c1 = max(0, -left), min(w, src_w - left)
    padded = r0 > 0 or c0 > 0 or r1 < h or c1 < w
    for c in range(3):
        if padded:
            out[c].fill(table[c, 0])
        np.take(table[c], pixels[top + r0: top + r1, left + c0: left + c1, c], out=out[c, r0:r1, c0:c1], mode="clip")
    return out


def preprocess(images: Any, cfg: PreprocessorConfig, out: np.ndarray | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image or a list of images -> float32 (B, 3, H, W) pixel_values, as transformers computes them.

    Each image goes through image_pixels, one at a time. `out`, if given, must be a
    C-contiguous float32 array of the result's shape; it is filled and returned (no
    allocation for the batch).
    """
    items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
    if len(items) == 0:
        raise ParameterError("no images given (empty list)")
    fixed = cfg.do_center_crop or (cfg.do_resize and cfg.size is not None)
    if fixed:  # every image's (H, W) is known up front: write straight into the batch
        expected = (len(items), 3, *target_size(cfg))
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        else:
            _check_out(out, expected)
        for i, x in enumerate(items):
            image_pixels(x, cfg, max_pixels, out=out[i])
        return out
    each = [image_pixels(x, cfg, max_pixels) for x in items]
    shapes = {a.shape[1:] for a in each}
    if len(shapes) > 1:
        raise ParameterError(
            f"the images have different sizes after preprocessing ({sorted(shapes)}); "
            "with this preprocessor config pass them one at a time"
        )
    expected = (len(each), *each[0].shape)
    if out is None:
        out = np.empty(expected, dtype=np.float32)
    else:
        _check_out(out, expected)
    for i, a in enumerate(each):
        out[i] = a
    return out
