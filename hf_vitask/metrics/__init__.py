"""Classification metrics shipped as :mod:`evaluate` scripts and loaded by path (works offline).

``evaluate.load("accuracy")`` looks the metric up on the Hub, which fails without internet.
The scripts in this folder (``accuracy.py``, ``macro_f1.py``, ``roc_auc.py``) are ordinary
``evaluate.Metric`` subclasses; :func:`load_metric` loads them from their file path, never
touching the network, and caches the loaded objects.

:func:`classification_metrics` is the one call the rest of hf_vitask uses::

    classification_metrics(predictions=[0, 2, None], references=[0, 1, 1], scores=probs, num_classes=3)
    # {"accuracy": ..., "macro_f1": ..., "auc": ..., "parse_failure_rate": 0.333...}
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "macro_f1", "roc_auc")


def metric_path(name: str) -> str:
    """The file path of a shipped metric script (``"accuracy"``, ``"macro_f1"`` or ``"roc_auc"``)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; hf_vitask ships {list(METRIC_NAMES)}")
    return os.fspath(METRICS_DIR / f"{name}.py")


@cache
def load_metric(name: str):
    """Load a shipped metric script by path with :func:`evaluate.load` (cached: one object per name).

    The metric keeps its inputs in memory (no Arrow cache files) and is reusable: every
    ``compute`` call starts afresh.
    """
    import evaluate  # imported lazily: ``import hf_vitask`` should not pay for it

    return evaluate.load(metric_path(name), keep_in_memory=True)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation over seeds (0 for a single seed)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def softmax(scores, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (log-likelihoods -> probabilities), as float64 numpy."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = scores - scores.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def classification_metrics(
    predictions: Sequence[int | None],
    references: Sequence[int],
    scores=None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of class-id predictions, plus one-vs-rest macro AUC when ``scores`` are given.

    Args:
        predictions: predicted class ids; ``None`` marks an answer that named no class. It counts
            as wrong (for accuracy, and as a false negative of its reference class for F1), and the
            result then also has ``"parse_failure_rate"``, the fraction of ``None`` predictions.
        references: true class ids.
        scores: optional ``(N, num_classes)`` per-class probabilities (or a flat list of
            positive-class scores for a binary task) for ``"auc"``. See ``roc_auc.py`` for the rule on
            classes absent from the references (skipped; ``nan`` when fewer than two classes occur).
        num_classes: the classes are ``0 .. num_classes - 1`` (ids outside raise); default: the
            number of score columns, else 1 + the largest class id seen.

    Macro-F1 is ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` over the classes
    present in the references or the predictions; AUC averages the classes present in the
    references (a class without positives has no AUC). A class absent from a small test split
    thus moves neither number.
    """
    predictions = list(predictions)
    references = [int(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("classification_metrics needs at least one prediction")
    failures = sum(p is None for p in predictions)
    ids = [-1 if p is None else int(p) for p in predictions]
    if num_classes is None and scores is not None:
        shape = np.shape(scores)
        num_classes = shape[1] if len(shape) == 2 else 2
    if num_classes is None:
        num_classes = max(max(references), max(ids)) + 1
    bad = sorted({i for i in ids + references if i >= num_classes} | {r for r in references if r < 0})
    if bad:
        raise ValueError(f"class ids {bad} are outside [0, {num_classes})")

    result = {
        "accuracy": load_metric("accuracy").compute(predictions=ids, references=references)["accuracy"],
        "macro_f1": load_metric("macro_f1").compute(predictions=ids, references=references)["macro_f1"],
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) != len(references):
            raise ValueError(f"{len(scores)} score rows for {len(references)} references")
        result["auc"] = load_metric("roc_auc").compute(
            prediction_scores=scores.tolist(), references=references
        )["roc_auc"]
    if failures:
        result["parse_failure_rate"] = failures / len(references)
    return result


__all__ = ["METRIC_NAMES", "classification_metrics", "load_metric", "metric_path", "softmax"]
