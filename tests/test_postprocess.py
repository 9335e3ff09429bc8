"""Postprocessing parity with transformers' ImageClassificationPipeline.postprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTConfig
from transformers.pipelines.image_classification import ImageClassificationPipeline

from vitnp.errors import ParameterError
from vitnp.postprocess import postprocess, validate_parameters


class _Model:
    def __init__(self, config):
        self.config = config


def pipeline_postprocess(logits: np.ndarray, config, **kwargs):
    # The pipeline's own postprocess method, unbound, on a minimal stand-in carrying the real config.
    fake = type("P", (), {"model": _Model(config)})()
    return ImageClassificationPipeline.postprocess(fake, {"logits": torch.from_numpy(logits[None])}, **kwargs)


def make_config(num_labels, problem_type=None):
    return ViTConfig(id2label={i: f"L{i}" for i in range(num_labels)},
                     label2id={f"L{i}": i for i in range(num_labels)}, problem_type=problem_type)


# transformers refuses single_label_classification with one label, so that pair is not a real config.
CONFIGS = [(n, p) for n in (1, 2, 7)
           for p in (None, "single_label_classification", "multi_label_classification", "regression")
           if not (n == 1 and p == "single_label_classification")]


@pytest.mark.parametrize("num_labels,problem_type", CONFIGS)
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": 3}, {"top_k": 50},
                                    {"function_to_apply": "sigmoid"}, {"function_to_apply": "softmax"},
                                    {"function_to_apply": "none", "top_k": 2}])
def test_matches_pipeline(num_labels, problem_type, kwargs):
    config = make_config(num_labels, problem_type)
    logits = np.random.default_rng(num_labels).standard_normal(num_labels).astype(np.float32) * 3
    theirs = pipeline_postprocess(logits, config, **kwargs)
    ours = postprocess(logits[None], config.id2label, problem_type, **kwargs)[0]
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert [o["score"] for o in ours] == [t["score"] for t in theirs]  # same float32 formulas, bit for bit


def test_ties_keep_class_order():
    config = make_config(6)
    logits = np.array([0.5, 2.0, 0.5, 2.0, 2.0, -1.0], np.float32)
    theirs = pipeline_postprocess(logits, config, top_k=6)
    ours = postprocess(logits[None], config.id2label, None, top_k=6)[0]
    assert [o["label"] for o in ours] == [t["label"] for t in theirs] == ["L1", "L3", "L4", "L0", "L2", "L5"]


@pytest.mark.parametrize("top_k", [0, -1, 1.5, "3", True, [1]])
def test_invalid_top_k(top_k):
    with pytest.raises(ParameterError, match="top_k must be a positive integer"):
        validate_parameters(top_k, None, 10)


@pytest.mark.parametrize("fn", ["relu", "", 3, "soft max"])
def test_invalid_function_to_apply(fn):
    with pytest.raises(ParameterError, match="function_to_apply must be one of softmax, sigmoid, none"):
        validate_parameters(5, fn, 10)


def test_valid_parameters_are_normalised():
    assert validate_parameters(None, None, 10) == (5, None)
    assert validate_parameters(20, "SIGMOID", 10) == (10, "sigmoid")
    assert validate_parameters(np.int64(2), "default", 10) == (2, None)
