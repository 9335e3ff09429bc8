"""Decoding with bounded memory: the header size check, reduced-scale JPEG decoding, one image at a time.

Memory is measured as the peak resident set (VmHWM) of a fresh Python process, before and after the
call, so what Pillow allocates in C counts too (tracemalloc sees only Python's allocator).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

import vitnp.preprocess as preprocess_module
from vitnp.errors import ImageError
from vitnp.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EXACT_DECODE_MAX_PIXELS,
    MAX_IMAGE_SIDE,
    PreprocessorConfig,
    default_preprocessor_config,
    image_pixels,
    load_image,
    load_preprocessor_config,
    preprocess,
)


def flat_gray_png(width: int, height: int) -> bytes:
    """An 8-bit grayscale PNG of zeros, compressed as it goes (a 1 x 80,000,000 one is 156 KB)."""
    row = b"\x00" * (1 + width)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, (1 << 20) // len(row))
    pieces, left = [], height
    while left:
        n = min(rows_per_piece, left)
        pieces.append(compressor.compress(row * n))
        left -= n
    pieces.append(compressor.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(pieces)) + chunk(b"IEND", b"")


def peak_rss_growth_mb(tmp_path, setup: str, call: str) -> tuple[float, str]:
    """Run `setup`, then `call` in a fresh interpreter; (growth of peak RSS across `call` in MB, call's outcome)."""
    script = "\n".join([
        "import json",
        # VmHWM is this process's own peak; ru_maxrss would start at the parent's (Linux keeps it across exec)
        "def peak_kb(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])",
        textwrap.dedent(setup),
        "before = peak_kb()",
        "try:",
        f"    {call}",
        "    outcome = 'ok'",
        "except Exception as e:",
        "    outcome = f'{type(e).__name__}: {e}'",
        "after = peak_kb()",
        "print(json.dumps([(after - before) / 1024, outcome]))",
    ])
    (tmp_path / "measure.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "measure.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    growth, outcome = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[memory] {call.strip()}: peak RSS +{growth:.1f} MB, {outcome}")
    return growth, outcome


# --------------------------------------------------------------------------- refused from the header


@pytest.fixture(scope="module")
def thin_png(tmp_path_factory):
    """1 x 80,000,000 pixels (under Pillow's 89 MP default) in 156 KB; > 2 GB to decode and preprocess."""
    path = tmp_path_factory.mktemp("thin") / "thin.png"
    path.write_bytes(flat_gray_png(1, 80_000_000))
    assert path.stat().st_size < 200_000
    return path


def test_thin_png_refused_before_decoding(thin_png):
    cfg = default_preprocessor_config("vit")
    with pytest.raises(ImageError, match=rf"1 x 80000000 pixels \(80000000\) exceeds the limit of {DEFAULT_MAX_IMAGE_PIXELS}"):
        image_pixels(thin_png, cfg)
    # under a raised pixel limit the side limit still refuses it
    with pytest.raises(ImageError, match=rf"1 x 80000000 pixels; a side longer than {MAX_IMAGE_SIDE}"):
        load_image(thin_png.read_bytes(), max_pixels=10**9)


@pytest.mark.parametrize("max_pixels", [None, 10**9])
def test_thin_png_refusal_allocates_nothing(tmp_path, thin_png, max_pixels):
    """Decoding it would take > 2 GB; refusing it from the header takes next to nothing."""
    kwargs = "" if max_pixels is None else f", max_pixels={max_pixels}"
    growth, outcome = peak_rss_growth_mb(
        tmp_path,
        setup=f"import vitnp.preprocess as p; cfg = p.default_preprocessor_config('vit'); "
              f"data = open({str(thin_png)!r}, 'rb').read()",
        call=f"p.preprocess(data, cfg{kwargs})")
    assert outcome.startswith("ImageError") and "too large" in outcome
    assert growth < 20


def test_a_refused_image_is_not_read_past_its_header(thin_png):
    """The check runs on Image.open's header parse: the PNG's 156 KB of pixel data is never consumed."""
    with open(thin_png, "rb") as f:
        with pytest.raises(ImageError, match="too large"):
            load_image(f)
        assert f.tell() < 1_000


def test_side_limit_is_inclusive():
    assert load_image(flat_gray_png(MAX_IMAGE_SIDE, 1)).size == (MAX_IMAGE_SIDE, 1)
    with pytest.raises(ImageError, match="side longer than"):
        load_image(flat_gray_png(1, MAX_IMAGE_SIDE + 1))


def test_shortest_edge_resize_of_a_long_image_is_refused():
    """shortest_edge 224 on a 65535 x 10 image would be 224 x 1.4 million pixels; refused before resizing."""
    cfg = PreprocessorConfig(size=None, shortest_edge=224)
    with pytest.raises(ImageError, match="preprocessing would make it"):
        image_pixels(flat_gray_png(MAX_IMAGE_SIDE, 10), cfg)


# --------------------------------------------------------------------------- one image at a time


def test_batch_holds_one_full_size_image_at_a_time(tmp_path):
    """Peak memory of a batch of 6 large images is that of 1, not 6 (each is 36 MB decoded)."""
    gradient = np.add.outer(np.arange(3000), np.arange(3000)).astype(np.uint8)
    Image.fromarray(np.dstack([gradient] * 3)).save(tmp_path / "large.png", compress_level=1)
    setup = (f"import numpy as np, vitnp.preprocess as p; cfg = p.default_preprocessor_config('deit'); "
             f"data = open({str(tmp_path / 'large.png')!r}, 'rb').read(); "
             "p.preprocess(np.zeros((8, 8, 3), np.uint8), cfg)")
    one, outcome1 = peak_rss_growth_mb(tmp_path, setup, "p.preprocess(data, cfg)")
    six, outcome6 = peak_rss_growth_mb(tmp_path, setup, "p.preprocess([data] * 6, cfg)")
    assert outcome1 == outcome6 == "ok"
    assert one > 30  # it did decode a 36 MB image
    assert six < one + 20


def test_memory_is_returned_after_decoding_in_a_thread(tmp_path):
    """A decode thread (as the server's) gives a large decode back to the system: glibc would keep it in the
    thread's arena, so resident memory would stay at the largest image seen."""
    gradient = np.add.outer(np.arange(4000), np.arange(5000)).astype(np.uint8)
    Image.fromarray(np.dstack([gradient] * 3)).save(tmp_path / "large.png", compress_level=1)
    script = "\n".join([
        "import threading, numpy as np, vitnp.preprocess as p",
        "def rss_kb(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])",
        "cfg = p.default_preprocessor_config('vit')",
        f"data = open({str(tmp_path / 'large.png')!r}, 'rb').read()",
        # glibc serves blocks this large with mmap until one is freed, then raises its mmap threshold
        "p.preprocess(data, cfg)",
        "before = rss_kb()",
        "t = threading.Thread(target=p.preprocess, args=(data, cfg)); t.start(); t.join()",
        "print((rss_kb() - before) / 1024)",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    held = float(done.stdout.strip().splitlines()[-1])
    print(f"[memory] after decoding a 20 MP PNG in a thread: RSS +{held:.1f} MB")
    assert held < 8  # the decode itself is 80 MB; without malloc_trim 10-110 MB stay


def test_image_pixels_equals_preprocess(examples_dir, tmp_path):
    configs = [default_preprocessor_config("vit"), default_preprocessor_config("deit"),
               PreprocessorConfig(size=None, shortest_edge=40, do_center_crop=True, crop_size=(32, 30), resample=3),
               PreprocessorConfig(size=None, shortest_edge=50)]
    inputs = [examples_dir / "cats.jpg", (examples_dir / "coffee.jpg").read_bytes(),
              np.asarray(Image.open(examples_dir / "cats.jpg").convert("L"))]
    for cfg in configs:
        for x in inputs:
            one = image_pixels(x, cfg)
            assert one.ndim == 3 and one.dtype == np.float32
            assert np.array_equal(one, preprocess(x, cfg)[0])
    out = np.full((3, 224, 224), np.nan, np.float32)
    assert image_pixels(examples_dir / "cats.jpg", configs[0], out=out) is out
    assert np.array_equal(out, preprocess(examples_dir / "cats.jpg", configs[0])[0])


def test_caller_pil_image_is_left_as_it_was(examples_dir):
    """EXIF rotation works in place only on images we opened; a caller's PIL image keeps its orientation."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(examples_dir / "cats.jpg").save(buf, format="JPEG", exif=exif.tobytes())
    theirs = Image.open(io.BytesIO(buf.getvalue()))
    a = image_pixels(theirs, default_preprocessor_config("vit"))
    assert theirs.size == (451, 300) and theirs.getexif().get(0x0112) == 6
    assert np.array_equal(a, image_pixels(buf.getvalue(), default_preprocessor_config("vit")))


# --------------------------------------------------------------------------- reduced-scale JPEG decoding

# do_resize false and no crop: the pixel values have the decoded image's own size, which shows the scale.
AS_DECODED = PreprocessorConfig(do_resize=False, size=None)


@pytest.mark.parametrize("exact_limit, scale", [(135_300, 1), (135_299, 2), (33_900, 2), (33_899, 4),
                                                (8_475, 4), (8_474, 8), (100, 8)])
def test_jpeg_draft_scale_rule(monkeypatch, examples_dir, exact_limit, scale):
    """cats.jpg (451 x 300 = 135300 pixels) above the exact limit decodes at the smallest 1/2, 1/4, 1/8
    scale that leaves at most that many pixels (1/8 at most): 226 x 150 = 33900, 113 x 75 = 8475."""
    monkeypatch.setattr(preprocess_module, "EXACT_DECODE_MAX_PIXELS", exact_limit)
    pixels = image_pixels(examples_dir / "cats.jpg", AS_DECODED)
    assert pixels.shape == (3, -(-300 // scale), -(-451 // scale))
    assert load_image(examples_dir / "cats.jpg").size == (451, 300)  # load_image always decodes in full


def test_jpeg_above_the_exact_limit_stays_close_to_transformers(monkeypatch, tmp_path, examples_dir):
    """Parity is promised up to EXACT_DECODE_MAX_PIXELS only; above it the values stay close."""
    from transformers import AutoImageProcessor

    pre = {"image_processor_type": "DeiTImageProcessor", "size": {"height": 128, "width": 128},
           "crop_size": {"height": 112, "width": 112}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    ref = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")(
        str(examples_dir / "coffee.jpg"), return_tensors="np")["pixel_values"]
    cfg = load_preprocessor_config(tmp_path / "preprocessor_config.json")
    assert np.array_equal(preprocess(examples_dir / "coffee.jpg", cfg), ref)
    monkeypatch.setattr(preprocess_module, "EXACT_DECODE_MAX_PIXELS", 600 * 400 // 4)
    reduced = preprocess(examples_dir / "coffee.jpg", cfg)
    difference = np.abs(reduced - ref)
    print(f"[draft] coffee.jpg at 1/2 scale vs transformers: mean |diff| {difference.mean():.4f}, max {difference.max():.3f}")
    assert not np.array_equal(reduced, ref)  # the reduced decode did happen
    assert difference.mean() < 0.05  # of a [-1, 1] range


def test_png_above_the_exact_limit_is_decoded_in_full(monkeypatch, examples_dir):
    buf = io.BytesIO()
    Image.open(examples_dir / "cats.jpg").save(buf, format="PNG")
    exact = image_pixels(buf.getvalue(), default_preprocessor_config("deit"))
    monkeypatch.setattr(preprocess_module, "EXACT_DECODE_MAX_PIXELS", 100)
    assert np.array_equal(image_pixels(buf.getvalue(), default_preprocessor_config("deit")), exact)
    assert image_pixels(buf.getvalue(), AS_DECODED).shape == (3, 300, 451)


def test_constants_are_consistent():
    assert EXACT_DECODE_MAX_PIXELS < DEFAULT_MAX_IMAGE_PIXELS <= 4 * EXACT_DECODE_MAX_PIXELS  # one halving suffices
