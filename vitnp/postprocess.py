"""Logits -> [{"label", "score"}], exactly as transformers' ImageClassificationPipeline does it."""

from __future__ import annotations

import math

import numpy as np

from .errors import NonFiniteScoresError, ParameterError

FUNCTIONS = ("softmax", "sigmoid", "none")
DEFAULT_TOP_K = 5


def validate_parameters(top_k, function_to_apply, num_labels: int) -> tuple[int, str | None]:
    """Check the two pipeline parameters; returns (top_k clamped to num_labels, function or None for default)."""
    if top_k is None:
        top_k = DEFAULT_TOP_K
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ParameterError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k < 1:
        raise ParameterError(f"top_k must be a positive integer, got {top_k!r}")
    if function_to_apply is not None:
        if not isinstance(function_to_apply, str) or function_to_apply.lower() not in FUNCTIONS + ("default",):
            raise ParameterError(
                f"function_to_apply must be one of {', '.join(FUNCTIONS)} (or omitted for the model's default), "
                f"got {function_to_apply!r}"
            )
        function_to_apply = function_to_apply.lower()
        if function_to_apply == "default":
            function_to_apply = None
    return min(int(top_k), num_labels), function_to_apply


def default_function(problem_type: str | None, num_labels: int) -> str:
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def scores(logits: np.ndarray, function_to_apply: str) -> np.ndarray:
    """Row-wise scores in float32, with the pipeline's formulas."""
    logits = np.asarray(logits, dtype=np.float32)
    if function_to_apply == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if function_to_apply == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return logits


def top_labels(row_scores: np.ndarray, id2label, top_k: int) -> list[dict]:
    # A stable sort on descending score keeps class order among ties, as the pipeline's list.sort does.
    order = np.argsort(-row_scores, kind="stable")[:top_k]
    return [{"label": id2label[i], "score": float(row_scores[i])} for i in order]


def check_finite(predictions: list[dict]) -> list[dict]:
    """One image's predictions, or NonFiniteScoresError when a score is NaN or infinite (JSON cannot carry it,
    and no label can be read from it)."""
    if not all(math.isfinite(p["score"]) for p in predictions):
        raise NonFiniteScoresError()
    return predictions


def postprocess(logits: np.ndarray, id2label, problem_type=None, top_k=DEFAULT_TOP_K,
                function_to_apply=None) -> list[list[dict]]:
    """(B, num_labels) logits -> one list of {"label", "score"} per row."""
    top_k, function_to_apply = validate_parameters(top_k, function_to_apply, len(id2label))
    fn = function_to_apply or default_function(problem_type, len(id2label))
    s = scores(logits, fn)
    return [top_labels(row, id2label, top_k) for row in s]
