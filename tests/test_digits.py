"""The bundled digit classifier: shipped weights, held-out accuracy, parity with transformers, examples.

The held-out digits come from scikit-learn's copy of the dataset, rendered by the training
script's own render_digit, so nothing here retrains or reads files produced by vitnp.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import sklearn  # noqa: F401  (the test extra has it: a missing one must fail, not skip)
import transformers

import vitnp

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "vitnp" / "bundled" / "digits"
EXAMPLE_DIGITS = ROOT / "examples" / "digits"
LABELS = [str(d) for d in range(10)]
MIN_ACCURACY = 0.95


def _training_script():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heldout_pngs(tmp_path_factory) -> tuple[list[str], np.ndarray]:
    """Every held-out digit written as a PNG file, with its true label."""
    script = _training_script()
    images, labels, indices = script.heldout_split()
    out = tmp_path_factory.mktemp("heldout-digits")
    paths = []
    for image, index in zip(images, indices):
        path = out / f"idx{int(index):04d}.png"
        script.render_digit(image).save(path)
        paths.append(str(path))
    return paths, np.asarray(labels)


@pytest.fixture(scope="module")
def hf_classifier():
    processor = transformers.ViTImageProcessorPil.from_pretrained(BUNDLED)
    return transformers.pipeline("image-classification", model=str(BUNDLED), image_processor=processor,
                                 device="cpu")


@pytest.fixture(scope="module")
def digits():
    return vitnp.load("bundled:digits")


def _top1(result) -> str:
    return max(result, key=lambda r: r["score"])["label"]


def _hub_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hub-format ViTForImageClassification checkpoint, from its config."""
    hidden, inter, patch = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    tokens = (config["image_size"] // patch) ** 2 + 1
    shapes = {
        "vit.embeddings.cls_token": (1, 1, hidden),
        "vit.embeddings.position_embeddings": (1, tokens, hidden),
        "vit.embeddings.patch_embeddings.projection.weight": (hidden, config["num_channels"], patch, patch),
        "vit.embeddings.patch_embeddings.projection.bias": (hidden,),
        "vit.layernorm.weight": (hidden,),
        "vit.layernorm.bias": (hidden,),
        "classifier.weight": (len(config["id2label"]), hidden),
        "classifier.bias": (len(config["id2label"]),),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"vit.encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            shapes[layer + name + ".weight"] = (hidden, hidden)
            shapes[layer + name + ".bias"] = (hidden,)
        shapes[layer + "intermediate.dense.weight"] = (inter, hidden)
        shapes[layer + "intermediate.dense.bias"] = (inter,)
        shapes[layer + "output.dense.weight"] = (hidden, inter)
        shapes[layer + "output.dense.bias"] = (hidden,)
        for norm in ("layernorm_before", "layernorm_after"):
            shapes[layer + norm + ".weight"] = (hidden,)
            shapes[layer + norm + ".bias"] = (hidden,)
    return shapes


def test_shipped_weights_load_in_transformers_and_match_config(tmp_path):
    from safetensors.numpy import load_file

    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["model_type"] == "vit"
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config["id2label"] == {label: label for label in LABELS}
    assert config["label2id"] == {label: int(label) for label in LABELS}

    on_disk = load_file(BUNDLED / "model.safetensors")
    assert {name: t.shape for name, t in on_disk.items()} == _hub_tensor_shapes(config)
    assert all(t.dtype in (np.float32, np.float16) for t in on_disk.values())
    assert (BUNDLED / "model.safetensors").stat().st_size < 1024 * 1024

    model, info = transformers.ViTForImageClassification.from_pretrained(BUNDLED, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.num_labels == 10
    assert [model.config.id2label[i] for i in range(10)] == LABELS
    # transformers renames modules internally; saving what it loaded must give back the shipped tensors.
    model.save_pretrained(tmp_path)
    resaved = load_file(tmp_path / "model.safetensors")
    assert set(resaved) == set(on_disk)
    for name, tensor in on_disk.items():
        np.testing.assert_array_equal(resaved[name].astype(np.float32), tensor.astype(np.float32), err_msg=name)

    preprocessor = json.loads((BUNDLED / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "ViTImageProcessor"
    assert preprocessor["size"] == {"height": config["image_size"], "width": config["image_size"]}


def test_heldout_accuracy_through_vitnp(digits, heldout_pngs):
    paths, labels = heldout_pngs
    assert len(paths) == 360  # 20% of 1,797, stratified
    results = digits.classify(paths, top_k=1)
    predicted = np.array([int(_top1(r)) for r in results])
    accuracy = float((predicted == labels).mean())
    assert accuracy >= MIN_ACCURACY, f"held-out accuracy {accuracy:.4f}"


def test_vitnp_top1_matches_transformers_pipeline(digits, hf_classifier, heldout_pngs):
    paths, _ = heldout_pngs
    ours = [_top1(r) for r in digits.classify(paths, top_k=3)]
    theirs = [_top1(r) for r in hf_classifier(paths, top_k=3)]
    mismatched = [(p, a, b) for p, a, b in zip(paths, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} files differ, first: {mismatched[:3]}"


def test_transformers_heldout_accuracy(hf_classifier, heldout_pngs):
    paths, labels = heldout_pngs
    predicted = np.array([int(_top1(r)) for r in hf_classifier(paths, top_k=1)])
    assert float((predicted == labels).mean()) >= MIN_ACCURACY


def test_shipped_examples_are_classified_as_their_digit(digits):
    files = sorted(EXAMPLE_DIGITS.glob("digit-*-idx*.png"))
    assert sorted(int(re.match(r"digit-(\d)-", f.name).group(1)) for f in files) == list(range(10))
    results = digits.classify([str(f) for f in files], top_k=1)
    for path, result in zip(files, results):
        assert _top1(result) == re.match(r"digit-(\d)-", path.name).group(1), path.name


def test_shipped_examples_are_heldout_digits_rendered_by_the_script():
    """The PNGs in examples/digits are the held-out scans they claim to be (by dataset index)."""
    from PIL import Image

    script = _training_script()
    images, labels, indices = script.heldout_split()
    by_index = {int(i): (image, int(label)) for image, label, i in zip(images, labels, indices)}
    for path in sorted(EXAMPLE_DIGITS.glob("digit-*-idx*.png")):
        digit, index = map(int, re.match(r"digit-(\d)-idx(\d+)\.png", path.name).groups())
        assert index in by_index, f"{path.name} is not in the held-out split"
        image, label = by_index[index]
        assert label == digit, path.name
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                              np.asarray(script.render_digit(image))), path.name
