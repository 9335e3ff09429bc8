"""Forward-pass parity with transformers on checkpoints transformers itself wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import vitnp

TOLERANCE = 1e-4  # absolute, on unit-scale logits


def reference_model(model_dir):
    model = transformers.AutoModelForImageClassification.from_pretrained(model_dir)
    return model.eval()


def reference_logits(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixel_values)).logits.numpy()


def random_pixels(clf, batch: int, seed: int = 0) -> np.ndarray:
    c = clf.config
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, c.num_channels, c.image_size, c.image_size)).astype(np.float32)


CHECKPOINTS = ["tiny_vit", "tiny_deit", "tiny_deit_distilled"]


@pytest.mark.parametrize("fixture", CHECKPOINTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_logits_match_transformers(request, fixture, batch):
    model_dir = request.getfixturevalue(fixture)
    clf = vitnp.load(model_dir)
    ref = reference_model(model_dir)
    x = random_pixels(clf, batch, seed=batch)
    ours, theirs = clf.logits(x), reference_logits(ref, x)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    diff = np.abs(ours - theirs).max()
    print(f"{fixture} batch={batch}: max|logit diff|={diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("fixture", ["base_vit", "base_deit_distilled"])
def test_base_logits_and_top5_match_transformers(request, fixture, examples_dir):
    """Full vit-base / deit-base-distilled shapes, real photos through each side's own preprocessing."""
    model_dir = request.getfixturevalue(fixture)
    clf = vitnp.load(model_dir)
    ref = reference_model(model_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    from PIL import Image

    photos = [Image.open(examples_dir / "cats.jpg"), Image.open(examples_dir / "coffee.jpg")]
    theirs_px = processor(images=photos, return_tensors="np")["pixel_values"]
    ours_px = clf.preprocess(photos)
    assert np.abs(ours_px - theirs_px).max() <= 1e-6
    for batch in (1, 2):
        ours, theirs = clf.logits(ours_px[:batch]), reference_logits(ref, theirs_px[:batch])
        diff = np.abs(ours - theirs).max()
        print(f"{fixture} batch={batch}: max|logit diff|={diff:.3g} logit scale={np.abs(theirs).max():.3g}")
        assert diff <= TOLERANCE
        for o, t in zip(ours, theirs):
            assert list(np.argsort(-o, kind="stable")[:5]) == list(np.argsort(-t, kind="stable")[:5])


def test_batch_results_equal_single_results(tiny_vit):
    clf = vitnp.load(tiny_vit)
    x = random_pixels(clf, 9, seed=3)
    batched = clf.logits(x)
    for i in range(9):
        np.testing.assert_allclose(clf.logits(x[i:i + 1])[0], batched[i], atol=1e-5)


def test_large_batch_is_chunked_and_matches(tiny_deit_distilled):
    clf = vitnp.load(tiny_deit_distilled)
    ref = reference_model(tiny_deit_distilled)
    x = random_pixels(clf, 37, seed=5)
    assert np.abs(clf.logits(x) - reference_logits(ref, x)).max() <= TOLERANCE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_compute_in_float32(tmp_path, dtype):
    from checkpoints import make_checkpoint

    model_dir = make_checkpoint(tmp_path / dtype, "vit", "tiny", dtype=dtype)
    clf = vitnp.load(model_dir)
    # The reference: the same half-precision weights, upcast to float32 by transformers.
    ref = transformers.AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = random_pixels(clf, 2)
    assert clf.logits(x).dtype == np.float32
    assert np.abs(clf.logits(x) - reference_logits(ref, x)).max() <= TOLERANCE


def test_sharded_checkpoint_loads(tmp_path, tiny_vit):
    model = reference_model(tiny_vit)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="50KB")
    (out / "preprocessor_config.json").write_bytes((tiny_vit / "preprocessor_config.json").read_bytes())
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    x = random_pixels(vitnp.load(tiny_vit), 2)
    np.testing.assert_array_equal(vitnp.load(out).logits(x), vitnp.load(tiny_vit).logits(x))


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_classify_matches_pipeline(request, fixture, examples_dir):
    model_dir = request.getfixturevalue(fixture)
    clf = vitnp.load(model_dir)
    pipe = transformers.pipeline(
        "image-classification", model=str(model_dir),
        image_processor=transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil"),
    )
    photo = str(examples_dir / "cats.jpg")
    for kwargs in ({}, {"top_k": 3}, {"top_k": 100}, {"function_to_apply": "sigmoid"},
                   {"function_to_apply": "none", "top_k": 2}, {"function_to_apply": "softmax", "top_k": 1}):
        ours, theirs = clf.classify(photo, **kwargs), pipe(photo, **kwargs)
        assert [o["label"] for o in ours] == [t["label"] for t in theirs], kwargs
        np.testing.assert_allclose([o["score"] for o in ours], [t["score"] for t in theirs], atol=1e-5)


def test_classify_list_returns_list_of_lists(tiny_vit, examples_dir):
    clf = vitnp.load(tiny_vit)
    photos = [examples_dir / "cats.jpg", examples_dir / "coffee.jpg"]
    both = clf.classify(photos, top_k=2)
    assert len(both) == 2 and all(len(r) == 2 for r in both)
    alone = clf.classify(photos[1], top_k=2)
    # GEMMs of different row counts may sum in another order: equal labels, scores within float32 rounding.
    assert [p["label"] for p in both[1]] == [p["label"] for p in alone]
    np.testing.assert_allclose([p["score"] for p in both[1]], [p["score"] for p in alone], rtol=1e-5)


def test_module_level_classify_caches_the_model(tiny_vit, examples_dir):
    first = vitnp.classify(examples_dir / "cats.jpg", model=str(tiny_vit), top_k=3)
    from vitnp.classifier import _loaded

    cached = [c for key, c in _loaded.items() if key[0] == str(tiny_vit)]
    assert len(cached) == 1
    assert vitnp.classify(examples_dir / "cats.jpg", model=str(tiny_vit), top_k=3) == first
    assert len([c for key, c in _loaded.items() if key[0] == str(tiny_vit)]) == 1


def test_logits_rejects_wrong_shape(tiny_vit):
    clf = vitnp.load(tiny_vit)
    with pytest.raises(vitnp.ParameterError, match=r"pixel_values must have shape \(B, 3, 32, 32\)"):
        clf.logits(np.zeros((1, 3, 224, 224), np.float32))
