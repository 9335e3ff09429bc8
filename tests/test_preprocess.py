"""vitnp.preprocess against transformers' PIL image processor, run in this process.

Reference: `AutoImageProcessor.from_pretrained(dir, backend="pil")` (transformers 5.x;
`use_fast=False` is the deprecated spelling of the same switch), fed the image *path*,
so transformers' own `image_utils.load_image` (exif_transpose + convert("RGB")) decodes it.

Every parity test asserts bit-identical float32 output (max |diff| == 0, compared on
the raw bits), which is what the implementation is built to give; none needs the 1-ulp
allowance. Max diffs are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import io
import json
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from checkpoints import DEIT_BASE_PREPROCESSOR, VIT_BASE_PREPROCESSOR, tiny_preprocessor
from vitnp.errors import ConfigError, ImageError, ParameterError
from vitnp.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    PreprocessorConfig,
    default_preprocessor_config,
    image_pixels,
    load_image,
    load_preprocessor_config,
    preprocess,
    target_size,
)

PHOTOS = ["cats.jpg", "coffee.jpg"]


# --------------------------------------------------------------------------- helpers


def hf_processor(directory: pathlib.Path):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(directory), backend="pil")
    assert type(proc).__name__.endswith("ImageProcessorPil"), type(proc).__name__  # the PIL path, not torchvision
    return proc


def write_processor_dir(root: pathlib.Path, name: str, pre: dict, model_type: str) -> pathlib.Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


def hf_pixels(proc, image) -> np.ndarray:
    out = proc(image, return_tensors="np")["pixel_values"]
    assert out.dtype == np.float32
    return out


def assert_bit_identical(ours: np.ndarray, ref: np.ndarray, label: str) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (label, ours.dtype, ours.shape, ref.shape)
    max_diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    differing_bits = int((ours.view(np.uint32) != ref.view(np.uint32)).sum())
    print(f"[parity] {label}: shape {ours.shape} max|diff| = {max_diff:.3g}, elements with differing bits = {differing_bits}")
    assert differing_bits == 0 and max_diff == 0.0, f"{label}: max|diff| {max_diff}, {differing_bits} elements differ"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def processor_dirs(tmp_path_factory, tiny_vit, tiny_deit) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (directory with preprocessor_config.json + config.json, model_type)."""
    root = tmp_path_factory.mktemp("preprocessors")
    return {
        "vit-base-old-format": (write_processor_dir(root, "vit", VIT_BASE_PREPROCESSOR, "vit"), "vit"),
        "deit-base-old-format": (write_processor_dir(root, "deit", DEIT_BASE_PREPROCESSOR, "deit"), "deit"),
        "tiny-vit-checkpoint": (tiny_vit, "vit"),
        "tiny-deit-checkpoint": (tiny_deit, "deit"),
        "vit-defaults-empty-file": (write_processor_dir(root, "vit-empty", {}, "vit"), "vit"),
        "deit-defaults-type-only": (
            write_processor_dir(root, "deit-empty", {"image_processor_type": "DeiTImageProcessor"}, "deit"), "deit"),
        "shortest-edge+crop": (write_processor_dir(root, "short", {
            "image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 45}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": 32, "width": 30}}, "vit"), "vit"),
        "crop-larger-than-resize (zero padding)": (write_processor_dir(root, "pad", {
            "image_processor_type": "DeiTImageProcessor", "size": {"height": 21, "width": 26},
            "crop_size": {"height": 32, "width": 31}}, "deit"), "deit"),
        "no-resize, crop only": (write_processor_dir(root, "croponly", {
            "image_processor_type": "DeiTImageProcessor", "do_resize": False,
            "crop_size": {"height": 64, "width": 48}}, "deit"), "deit"),
        "rescale without normalize": (write_processor_dir(root, "rescale-only", {
            "image_processor_type": "ViTImageProcessor", "size": {"height": 24, "width": 24},
            "do_normalize": False}, "vit"), "vit"),
        "normalize without rescale": (write_processor_dir(root, "norm-only", {
            "image_processor_type": "ViTImageProcessor", "size": {"height": 24, "width": 24},
            "do_rescale": False, "image_mean": [120.5, 110.25, 99.0], "image_std": [58.0, 57.5, 57.0]}, "vit"), "vit"),
        "odd rescale_factor, int size, scalar mean/std": (write_processor_dir(root, "odd", {
            "feature_extractor_type": "ViTFeatureExtractor", "size": 33, "rescale_factor": 0.0037,
            "image_mean": 0.45, "image_std": 0.27}, "vit"), "vit"),
    }


@pytest.fixture(scope="session")
def mode_images(tmp_path_factory, examples_dir) -> dict[str, pathlib.Path]:
    """Files in the PIL modes transformers' load_image has to cope with, made from cats.jpg."""
    root = tmp_path_factory.mktemp("mode-images")
    cats = Image.open(examples_dir / "cats.jpg").convert("RGB")
    h, w = cats.height, cats.width
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = Image.fromarray(((xx * 255) // (w - 1)).astype(np.uint8))  # transparent left -> opaque right
    gray = cats.convert("L")
    files: dict[str, pathlib.Path] = {}

    def save(name: str, img: Image.Image, expect_mode: str, **kw) -> None:
        path = root / name
        img.save(path, **kw)
        with Image.open(path) as check:
            assert check.mode == expect_mode, (name, check.mode)
        files[name] = path

    rgba = cats.copy()
    rgba.putalpha(alpha)
    save("rgba.png", rgba, "RGBA")
    la = gray.copy()
    la.putalpha(alpha)
    save("la.png", la, "LA")
    save("l.png", gray, "L")
    save("p.png", cats.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "P")
    p_t = cats.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("p-transparency.png", p_t, "P", transparency=int(np.asarray(p_t)[0, 0]))
    save("cmyk.jpg", cats.convert("CMYK"), "CMYK", quality=92)
    # 16-bit: spread over 0..1023 so PIL's I;16 -> RGB clipping affects part of the image only
    save("i16.png", Image.fromarray((np.asarray(gray).astype(np.uint16) * 4)), "I;16")
    save("1bit.png", gray.convert("1"), "1")
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif{orientation}.jpg", cats, "RGB", exif=exif.tobytes(), quality=95)
    save("rgb.png", cats, "RGB")
    return files


# --------------------------------------------------------------------------- parity: photos x configs


PROCESSOR_CASES = [
    "vit-base-old-format", "deit-base-old-format", "tiny-vit-checkpoint", "tiny-deit-checkpoint",
    "vit-defaults-empty-file", "deit-defaults-type-only", "shortest-edge+crop",
    "crop-larger-than-resize (zero padding)", "no-resize, crop only", "rescale without normalize",
    "normalize without rescale", "odd rescale_factor, int size, scalar mean/std",
]


@pytest.mark.parametrize("case", PROCESSOR_CASES)
@pytest.mark.parametrize("photo", PHOTOS)
def test_photo_pixel_values_bit_identical_to_transformers(processor_dirs, examples_dir, case, photo):
    """max|diff| == 0 exactly (bit-identical float32) for every config form."""
    directory, model_type = processor_dirs[case]
    cfg = load_preprocessor_config(directory / "preprocessor_config.json", model_type=model_type)
    path = str(examples_dir / photo)
    ref = hf_pixels(hf_processor(directory), path)
    ours = preprocess(path, cfg)
    assert_bit_identical(ours, ref, f"{case} / {photo}")
    assert ours.shape[2:] == target_size(cfg)


@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
def test_every_resample_filter_bit_identical(tmp_path, examples_dir, resample):
    """max|diff| == 0 for NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING (down- and upsampling)."""
    for size in ({"height": 37, "width": 29}, {"height": 520, "width": 700}):
        pre = {"image_processor_type": "ViTImageProcessor", "size": size, "resample": resample}
        d = write_processor_dir(tmp_path, f"r{resample}-{size['height']}", pre, "vit")
        path = str(examples_dir / "coffee.jpg")
        ours = preprocess(path, load_preprocessor_config(d / "preprocessor_config.json"))
        assert_bit_identical(ours, hf_pixels(hf_processor(d), path), f"resample={resample} size={size}")


def test_shortest_edge_without_crop_keeps_aspect_ratio_like_transformers(tmp_path, examples_dir):
    """max|diff| == 0; output shape depends on the image, so target_size refuses this config."""
    pre = {"image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 50}}
    d = write_processor_dir(tmp_path, "se", pre, "vit")
    cfg = load_preprocessor_config(d / "preprocessor_config.json")
    for photo in PHOTOS:
        path = str(examples_dir / photo)
        assert_bit_identical(preprocess(path, cfg), hf_pixels(hf_processor(d), path), f"shortest_edge=50 / {photo}")
    with pytest.raises(ConfigError, match="depends on each input image"):
        target_size(cfg)


# --------------------------------------------------------------------------- parity: image modes, EXIF

MODE_FILES = ["rgba.png", "la.png", "l.png", "p.png", "p-transparency.png", "cmyk.jpg", "i16.png", "1bit.png",
              "exif3.jpg", "exif6.jpg", "exif8.jpg", "rgb.png"]


@pytest.mark.parametrize("case", ["vit-base-old-format", "deit-base-old-format", "tiny-deit-checkpoint"])
@pytest.mark.parametrize("name", MODE_FILES)
def test_image_modes_and_exif_bit_identical_to_transformers(processor_dirs, mode_images, case, name):
    """RGBA, LA, L, P, P+transparency, CMYK, I;16, 1-bit, EXIF orientation 3/6/8: max|diff| == 0."""
    directory, model_type = processor_dirs[case]
    cfg = load_preprocessor_config(directory / "preprocessor_config.json", model_type=model_type)
    path = str(mode_images[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL: "Palette images with Transparency expressed in bytes..."
        ref = hf_pixels(hf_processor(directory), path)
        ours = preprocess(path, cfg)
    assert_bit_identical(ours, ref, f"{case} / {name}")


@pytest.mark.parametrize("orientation, expect_transpose", [(3, Image.Transpose.ROTATE_180),
                                                           (6, Image.Transpose.ROTATE_270),
                                                           (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(mode_images, orientation, expect_transpose):
    """The rotated file must decode upright: equal to the un-tagged pixels rotated by hand, not to them as stored."""
    upright = load_image(mode_images[f"exif{orientation}.jpg"])
    with Image.open(mode_images[f"exif{orientation}.jpg"]) as raw:
        stored = raw.convert("RGB")
    assert upright.size == stored.transpose(expect_transpose).size
    assert np.array_equal(np.asarray(upright), np.asarray(stored.transpose(expect_transpose)))
    if orientation != 3:
        assert upright.size == (stored.height, stored.width)


def test_modes_match_manual_exif_transpose_and_convert(mode_images):
    """load_image == ImageOps.exif_transpose(Image.open(p)).convert('RGB') (transformers' load_image body)."""
    from PIL import ImageOps

    for name, path in mode_images.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            got = load_image(path)
        assert got.mode == "RGB", name
        assert np.array_equal(np.asarray(got), expected), name


# --------------------------------------------------------------------------- input kinds


@pytest.fixture(scope="module")
def deit_cfg() -> PreprocessorConfig:
    return PreprocessorConfig.from_dict(DEIT_BASE_PREPROCESSOR)


def test_every_input_kind_gives_the_same_array(examples_dir, deit_cfg, processor_dirs):
    path = examples_dir / "cats.jpg"
    data = path.read_bytes()
    pil = Image.open(path)
    reference = preprocess(str(path), deit_cfg)
    with open(path, "rb") as f:
        from_file = preprocess(f, deit_cfg)
    kinds = {
        "str path": reference,
        "pathlib.Path": preprocess(path, deit_cfg),
        "bytes": preprocess(data, deit_cfg),
        "bytearray": preprocess(bytearray(data), deit_cfg),
        "memoryview": preprocess(memoryview(data), deit_cfg),
        "file object": from_file,
        "BytesIO": preprocess(io.BytesIO(data), deit_cfg),
        "PIL image (lazy, unloaded)": preprocess(pil, deit_cfg),
        "uint8 HWC array": preprocess(np.asarray(pil.convert("RGB")), deit_cfg),
        "non-contiguous uint8 array": preprocess(np.asarray(pil.convert("RGB"))[:, ::-1][:, ::-1], deit_cfg),
        "tuple of one": preprocess((data,), deit_cfg),
    }
    for kind, arr in kinds.items():
        assert arr.shape == (1, 3, 224, 224), kind
        assert np.array_equal(arr, reference), kind
    # and all of them equal transformers (fed the path)
    directory, _ = processor_dirs["deit-base-old-format"]
    assert_bit_identical(reference, hf_pixels(hf_processor(directory), str(path)), "deit / str path")


def test_array_inputs_match_transformers_on_the_same_array(processor_dirs, examples_dir):
    """transformers given the uint8 HWC array itself (no load_image) agrees too: max|diff| == 0."""
    directory, _ = processor_dirs["deit-base-old-format"]
    cfg = load_preprocessor_config(directory / "preprocessor_config.json")
    arr = np.asarray(Image.open(examples_dir / "coffee.jpg").convert("RGB"))
    assert_bit_identical(preprocess(arr, cfg), hf_pixels(hf_processor(directory), arr), "deit / uint8 HWC array")


def test_gray_and_rgba_arrays_equal_the_pil_modes(examples_dir, deit_cfg):
    rgb = Image.open(examples_dir / "cats.jpg").convert("RGB")
    gray = np.asarray(rgb.convert("L"))
    assert np.array_equal(preprocess(gray, deit_cfg), preprocess(Image.fromarray(gray, "L"), deit_cfg))
    assert np.array_equal(preprocess(gray[:, :, None], deit_cfg), preprocess(gray, deit_cfg))
    rgba = np.dstack([np.asarray(rgb), np.full(gray.shape, 7, np.uint8)])
    assert np.array_equal(preprocess(rgba, deit_cfg), preprocess(Image.fromarray(rgba, "RGBA"), deit_cfg))
    # convert("RGB") drops alpha (it does not composite), exactly like transformers' load_image
    assert np.array_equal(preprocess(rgba, deit_cfg), preprocess(np.asarray(rgb), deit_cfg))


def test_batch_equals_single_images_and_transformers(processor_dirs, examples_dir):
    directory, _ = processor_dirs["deit-base-old-format"]
    cfg = load_preprocessor_config(directory / "preprocessor_config.json")
    paths = [str(examples_dir / p) for p in PHOTOS] + [str(examples_dir / PHOTOS[0])]
    batch = preprocess(paths, cfg)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for i, p in enumerate(paths):
        assert np.array_equal(batch[i], preprocess(p, cfg)[0])
    assert_bit_identical(batch, hf_pixels(hf_processor(directory), paths), "deit / batch of 3 paths")


def test_out_buffer_is_filled_and_returned(examples_dir, deit_cfg):
    out = np.full((2, 3, 224, 224), np.nan, dtype=np.float32)
    paths = [examples_dir / p for p in PHOTOS]
    result = preprocess(paths, deit_cfg, out=out)
    assert result is out
    assert np.array_equal(out, preprocess(paths, deit_cfg))


def test_zero_padding_region_equals_normalized_zero(tmp_path, examples_dir):
    """Where the crop is larger than the image transformers pads uint8 zeros before rescale/normalize."""
    cfg = PreprocessorConfig(do_resize=True, size=(10, 12), resample=2, do_center_crop=True, crop_size=(15, 16),
                             image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    x = preprocess(examples_dir / "cats.jpg", cfg)[0]
    # (10 - 15) // 2 = -3 -> 3 rows of padding on top, 2 below; (12 - 16) // 2 = -2 -> 2 columns each side
    zero = (np.float32(0.0) - np.float32(cfg.image_mean[0])) / np.float32(cfg.image_std[0])
    assert np.all(x[0, :3] == zero) and np.all(x[0, 13:] == zero)
    assert np.all(x[0, :, :2] == zero) and np.all(x[0, :, 14:] == zero)
    assert not np.any(x[0, 3:13, 2:14] == zero)


# --------------------------------------------------------------------------- config parsing vs transformers' defaults


@pytest.mark.parametrize("pre, model_type", [
    ({}, "vit"),
    ({}, "deit"),
    ({"feature_extractor_type": "ViTFeatureExtractor", "size": 224}, "vit"),
    ({"feature_extractor_type": "DeiTFeatureExtractor", "size": 256, "crop_size": 224}, "deit"),
    (VIT_BASE_PREPROCESSOR, "vit"),
    (DEIT_BASE_PREPROCESSOR, "deit"),
    (tiny_preprocessor("vit"), "vit"),
    (tiny_preprocessor("deit"), "deit"),
    ({"image_processor_type": "ViTImageProcessor", "do_center_crop": True, "crop_size": {"height": 20, "width": 30},
      "size": [40, 50], "do_rescale": False}, "vit"),
    ({"image_processor_type": "DeiTImageProcessor", "size": {"shortest_edge": 300}, "resample": 0}, "deit"),
    ({"image_processor_type": "ViTImageProcessor", "size": 64, "default_to_square": False}, "vit"),
])
def test_parsed_config_equals_transformers_attributes(tmp_path, pre, model_type):
    """Every field (defaults included) equals the attribute transformers' PIL processor ends up with."""
    d = write_processor_dir(tmp_path, "p", pre, model_type)
    proc = hf_processor(d)
    cfg = load_preprocessor_config(d / "preprocessor_config.json", model_type=model_type)
    assert cfg.do_resize == bool(proc.do_resize)
    assert cfg.do_center_crop == bool(proc.do_center_crop)
    assert cfg.do_rescale == bool(proc.do_rescale)
    assert cfg.do_normalize == bool(proc.do_normalize)
    assert cfg.resample == int(proc.resample)
    assert cfg.rescale_factor == proc.rescale_factor
    assert cfg.image_mean == tuple(proc.image_mean) and cfg.image_std == tuple(proc.image_std)
    if proc.size.shortest_edge is not None:
        assert (cfg.size, cfg.shortest_edge) == (None, proc.size.shortest_edge)
    else:
        assert (cfg.size, cfg.shortest_edge) == ((proc.size.height, proc.size.width), None)
    if proc.do_center_crop:
        assert cfg.crop_size == (proc.crop_size.height, proc.crop_size.width)


@pytest.mark.parametrize("model_type, cls_name", [("vit", "ViTImageProcessorPil"), ("deit", "DeiTImageProcessorPil")])
def test_default_config_equals_transformers_class_defaults(model_type, cls_name):
    import transformers

    proc = getattr(transformers, cls_name)()
    cfg = default_preprocessor_config(model_type)
    assert cfg.size == (proc.size.height, proc.size.width) and cfg.shortest_edge is None
    assert cfg.resample == int(proc.resample)
    assert cfg.do_center_crop == bool(proc.do_center_crop)
    if proc.do_center_crop:
        assert cfg.crop_size == (proc.crop_size.height, proc.crop_size.width)
    assert (cfg.do_resize, cfg.do_rescale, cfg.do_normalize) == (proc.do_resize, proc.do_rescale, proc.do_normalize)
    assert cfg.rescale_factor == proc.rescale_factor
    assert cfg.image_mean == tuple(proc.image_mean) and cfg.image_std == tuple(proc.image_std)


def test_target_size():
    assert target_size(PreprocessorConfig.from_dict(VIT_BASE_PREPROCESSOR)) == (224, 224)
    assert target_size(PreprocessorConfig.from_dict(DEIT_BASE_PREPROCESSOR)) == (224, 224)
    assert target_size(PreprocessorConfig.from_dict(tiny_preprocessor("deit"))) == (32, 32)
    assert target_size(PreprocessorConfig.from_dict({"size": {"height": 48, "width": 64}})) == (48, 64)
    with pytest.raises(ConfigError):
        target_size(PreprocessorConfig.from_dict({"do_resize": False}))


def test_config_is_hashable_and_frozen():
    cfg = PreprocessorConfig(size=[32, 32], image_mean=[0.1, 0.2, 0.3], image_std=[1, 2, 3])
    assert cfg.size == (32, 32) and cfg.image_std == (1.0, 2.0, 3.0)
    hash(cfg)
    with pytest.raises(Exception):
        cfg.size = (1, 1)  # type: ignore[misc]


# --------------------------------------------------------------------------- errors: images


def test_missing_file(tmp_path, deit_cfg):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg.*no such file"):
        load_image(missing)
    with pytest.raises(ImageError, match="no such file"):
        preprocess(str(missing), deit_cfg)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_non_image_bytes_and_files(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, this is not a picture at all")
    text = tmp_path / "notes.jpg"
    text.write_text("plain text pretending to be a JPEG")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt, keep", [("JPEG", 0.5), ("JPEG", 0.05), ("PNG", 0.5), ("PNG", 0.9), ("GIF", 0.5)])
def test_truncated_files(tmp_path, examples_dir, fmt, keep):
    buf = io.BytesIO()
    Image.open(examples_dir / "cats.jpg").save(buf, format=fmt)
    data = buf.getvalue()[: int(len(buf.getvalue()) * keep)]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"cut\.\w+.*(truncated|corrupt|decode)") as info:
        load_image(path)
    print(f"[error] truncated {fmt} at {keep:.0%}: {info.value}")
    with pytest.raises(ImageError, match="image bytes"):
        load_image(data)


def test_pixel_limit_refuses_from_the_header(examples_dir):
    """cats.jpg is 451 x 300 = 135300 pixels: refused under a lower max_pixels, by every entry point."""
    cats = examples_dir / "cats.jpg"
    cfg = default_preprocessor_config("vit")
    message = r"image too large: 451 x 300 pixels \(135300\) exceeds the limit of 135299 pixels"
    with pytest.raises(ImageError, match=r"cats\.jpg.*" + message):
        load_image(cats, max_pixels=135_299)
    with pytest.raises(ImageError, match=message):
        image_pixels(cats.read_bytes(), cfg, max_pixels=135_299)
    with pytest.raises(ImageError, match=message):
        preprocess([cats, cats], cfg, max_pixels=135_299)
    assert load_image(cats, max_pixels=135_300).size == (451, 300)
    assert preprocess(cats, cfg, max_pixels=135_300).shape == (1, 3, 224, 224)
    assert Image.MAX_IMAGE_PIXELS != 135_299  # the limit is a parameter, not Pillow's global


def test_pixel_limit_default_and_parameter_checks(examples_dir):
    assert 16_000_000 <= DEFAULT_MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS  # lower than Pillow's 89 MP
    for bad in (0, -5, 2.5, True, None, "40000000"):
        with pytest.raises(ParameterError, match="max_pixels"):
            load_image(examples_dir / "cats.jpg", max_pixels=bad)


def test_pillow_limit_stays_a_second_line(monkeypatch, examples_dir):
    """Code that lowers PIL.Image.MAX_IMAGE_PIXELS gets a refusal, where Pillow itself only warns (up to 2x)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageError, match=r"image too large: 451 x 300 pixels \(135300\) exceeds Pillow's limit of 100000"):
            load_image(examples_dir / "cats.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow raises DecompressionBombError above 2x
    with pytest.raises(ImageError, match=r"image bytes: image too large.*135300 pixels"):
        load_image((examples_dir / "cats.jpg").read_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(examples_dir / "cats.jpg").size == (451, 300)


@pytest.mark.parametrize("array, message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint16), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "shape"),
    (np.zeros((2, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((8,), np.uint8), "shape"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


@pytest.mark.parametrize("value", [42, None, 3.5, {"image": "x"}, [[1, 2], [3, 4]], object()])
def test_unsupported_types(value):
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(value)


def test_text_mode_file_object(examples_dir):
    with open(examples_dir / "cats.jpg", encoding="latin-1") as f:
        with pytest.raises(ImageError, match="text mode"):
            load_image(f)


def test_batch_errors(examples_dir, deit_cfg, tmp_path):
    with pytest.raises(ParameterError, match="empty"):
        preprocess([], deit_cfg)
    with pytest.raises(ParameterError, match="out must be"):
        preprocess(examples_dir / "cats.jpg", deit_cfg, out=np.zeros((1, 3, 224, 224), np.float64))
    with pytest.raises(ParameterError, match="out must be"):
        preprocess(examples_dir / "cats.jpg", deit_cfg, out=np.zeros((2, 3, 224, 224), np.float32))
    shortest = PreprocessorConfig.from_dict({"size": {"shortest_edge": 40}})
    with pytest.raises(ParameterError, match="different sizes"):
        preprocess([examples_dir / "cats.jpg", np.zeros((40, 40, 3), np.uint8)], shortest)
    with pytest.raises(ImageError, match="no such file"):
        preprocess([examples_dir / "cats.jpg", tmp_path / "missing.png"], deit_cfg)


# --------------------------------------------------------------------------- errors: config


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text('{"size": 224,, }')
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*malformed JSON.*line 1"):
        load_preprocessor_config(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*JSON object"):
        load_preprocessor_config(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json"):
        load_preprocessor_config(path)
    with pytest.raises(ConfigError, match=r"missing\.json.*not found"):
        load_preprocessor_config(tmp_path / "missing.json")


@pytest.mark.parametrize("field, value", [
    ("size", -3),
    ("size", 0),
    ("size", "224"),
    ("size", {"height": 224}),
    ("size", {"longest_edge": 224}),
    ("size", {"height": 224, "width": 22.5}),
    ("crop_size", {"shortest_edge": 224}),
    ("crop_size", [224]),
    ("resample", 9),
    ("resample", "bilinear"),
    ("resample", True),
    ("image_mean", [0.5, 0.5]),
    ("image_mean", ["a", "b", "c"]),
    ("image_std", [0.5, 0.0, 0.5]),
    ("image_std", [0.5, float("nan"), 0.5]),
    ("do_resize", "yes"),
    ("do_normalize", 1),
    ("rescale_factor", "1/255"),
    ("rescale_factor", -1.0),
    ("image_processor_type", "ConvNextImageProcessor"),
    ("feature_extractor_type", 7),
    ("do_pad", True),
    ("size", 30000),
    ("size", {"height": 30000, "width": 30000}),
    ("size", {"shortest_edge": 5000}),
    ("size", {"shortest_edge": 0}),
    ("size", [224, 224, 3]),
    ("size", True),
    ("size", [224.0, 224.0]),
    ("crop_size", 4097),
    ("crop_size", {"height": 0, "width": 224}),
    ("crop_size", "224"),
    ("resample", 2.0),
    ("resample", -1),
    ("image_mean", [0.5, float("inf"), 0.5]),
    ("image_mean", "0.5"),
    ("image_mean", [0.5, 0.5, 0.5, 0.5]),
    ("image_mean", [0.5, None, 0.5]),
    ("image_std", [0.5, -0.2, 0.5]),
    ("image_std", -1.0),
    ("image_std", [0.5, float("-inf"), 0.5]),
    ("image_std", {"r": 0.5}),
    ("rescale_factor", 0),
    ("rescale_factor", float("nan")),
    ("rescale_factor", float("inf")),
    ("rescale_factor", True),
    ("rescale_factor", [1 / 255]),
    ("rescale_factor", 6.672203074112425e+35),  # pixel values near 1e38: NaN scores
    ("image_std", [0.5, 1e-30, 0.5]),
    ("image_mean", [0.5, -1e30, 0.5]),
    ("do_center_crop", "true"),
    ("do_rescale", 0),
    ("default_to_square", "no"),
    ("do_pad", "no"),
    ("image_processor_type", ["ViTImageProcessor"]),
])
def test_bad_field_is_named(tmp_path, field, value):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**VIT_BASE_PREPROCESSOR, "do_center_crop": True, "crop_size": 200, field: value}))
    with pytest.raises(ConfigError) as info:
        load_preprocessor_config(path)
    message = str(info.value)
    print(f"[error] {field}={value!r}: {message}")
    assert str(path) in message and f"'{field}'" in message


@pytest.mark.parametrize("field, value", [
    ("size", {"height": 30000, "width": 30000}),
    ("crop_size", {"height": 224, "width": 5000}),
    ("rescale_factor", -0.5),
    ("image_std", [0.5, 0.5, 0.0]),
])
def test_bad_field_is_named_even_when_its_step_is_off(tmp_path, field, value):
    """A file is valid or not as a whole: do_resize/do_center_crop/do_rescale/do_normalize false does not hide a bad value."""
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"do_resize": False, "do_center_crop": False, "do_rescale": False,
                                "do_normalize": False, field: value}))
    with pytest.raises(ConfigError) as info:
        load_preprocessor_config(path)
    assert str(path) in str(info.value) and f"'{field}'" in str(info.value)


def test_size_bound_is_inclusive(tmp_path):
    from vitnp.processor_config import MAX_PROCESSOR_SIDE

    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"size": MAX_PROCESSOR_SIDE, "do_center_crop": True,
                                "crop_size": {"height": MAX_PROCESSOR_SIDE, "width": 1}}))
    cfg = load_preprocessor_config(path)
    assert cfg.size == (MAX_PROCESSOR_SIDE, MAX_PROCESSOR_SIDE) and cfg.crop_size == (MAX_PROCESSOR_SIDE, 1)
    path.write_text(json.dumps({"size": {"shortest_edge": MAX_PROCESSOR_SIDE}}))
    assert load_preprocessor_config(path).shortest_edge == MAX_PROCESSOR_SIDE


def test_center_crop_without_crop_size(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**VIT_BASE_PREPROCESSOR, "do_center_crop": True}))
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*'crop_size'"):
        load_preprocessor_config(path)


def test_bad_model_type_and_direct_construction():
    with pytest.raises(ConfigError, match="model type"):
        default_preprocessor_config("resnet")
    with pytest.raises(ConfigError, match="image_std"):
        PreprocessorConfig(image_std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="crop_size"):
        PreprocessorConfig(do_center_crop=True)
    with pytest.raises(ConfigError, match="'size'"):
        PreprocessorConfig(size=(30000, 30000), do_center_crop=True, crop_size=(32, 32))
    with pytest.raises(ConfigError, match="'image_std'"):
        PreprocessorConfig(image_std=(1.0, -1.0, 1.0))
    with pytest.raises(ConfigError, match="'rescale_factor'"):
        PreprocessorConfig(rescale_factor=float("nan"))
    with pytest.raises(ConfigError, match="'resample'"):
        PreprocessorConfig(resample=7)


def test_concurrent_loads_leave_warning_filters_untouched(examples_dir):
    """Decoding in threads must not leave the process-wide warning filters changed."""
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    data = (examples_dir / "coffee.jpg").read_bytes()
    with ThreadPoolExecutor(max_workers=6) as pool:
        sizes = set(pool.map(lambda _: load_image(data).size, range(60)))
    assert sizes == {(600, 400)}
    assert warnings.filters == before
