"""The shipped metric scripts: hand-computed values, parse failures, offline loading by path."""

import math
import os
import socket
import warnings
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from hf_vitask.metrics import METRIC_NAMES, classification_metrics, load_metric, metric_path, softmax

# Six samples, three classes. Per-class one-vs-rest AUC, counted from ranked (positive, negative) pairs
# (a win is 1, a tie 1/2, out of 2 positives x 4 negatives = 8 pairs):
#   class 0: positives 0.6, 0.3 vs negatives 0.2 0.5 0.1 0.3 -> 4 + (1 + 0 + 1 + 1/2) = 6.5 -> 13/16
#   class 1: positives 0.5, 0.3 vs negatives 0.3 0.4 0.2 0.3 -> 4 + (1/2 + 0 + 1 + 1/2) = 6 -> 12/16
#   class 2: positives 0.7, 0.4 vs negatives 0.1 0.3 0.3 0.2 -> 8 -> 16/16
# macro AUC = (13 + 12 + 16) / 48 = 41/48.
REFS = [0, 0, 1, 1, 2, 2]
PROBS = [
    [0.6, 0.3, 0.1],
    [0.3, 0.4, 0.3],
    [0.2, 0.5, 0.3],
    [0.5, 0.3, 0.2],
    [0.1, 0.2, 0.7],
    [0.3, 0.3, 0.4],
]


def test_accuracy_and_macro_f1_by_hand():
    refs = [0, 0, 1, 2, 2]
    preds = [0, 1, 1, 2, 0]
    # class 0: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3
    # class 2: TP 1, FP 0, FN 1 -> P 1,   R 1/2, F1 2/3
    f1 = [Fraction(1, 2), Fraction(2, 3), Fraction(2, 3)]
    out = classification_metrics(preds, refs)
    assert out == pytest.approx({"accuracy": 3 / 5, "macro_f1": float(sum(f1) / 3)})  # 11/18
    assert out["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
    # A fourth class nobody predicted and nobody has does not enter the average (sklearn's convention).
    assert classification_metrics(preds, refs, num_classes=4)["macro_f1"] == pytest.approx(float(sum(f1) / 3))
    # A class present in the references but never predicted scores 0 rather than dropping out.
    assert classification_metrics([0, 0, 0], [0, 1, 0])["macro_f1"] == pytest.approx((0.8 + 0) / 2)
    # An explicit label set brings an absent class back, scored zero_division.
    assert load_metric("macro_f1").compute(predictions=[0, 1], references=[0, 1], labels=[0, 1, 2])[
        "macro_f1"
    ] == pytest.approx(2 / 3)
    perfect = load_metric("macro_f1").compute(
        predictions=[0, 1], references=[0, 1], labels=[0, 1, 2], zero_division=1.0
    )
    assert perfect["macro_f1"] == pytest.approx(1.0)
    assert "parse_failure_rate" not in out and "auc" not in out


def test_a_perfect_answer_on_a_split_missing_classes_is_perfect_by_every_metric():
    out = classification_metrics([0, 0, 1], [0, 0, 1], scores=[[0.9, 0.1, 0], [0.8, 0.2, 0], [0.1, 0.9, 0]])
    assert out == pytest.approx({"accuracy": 1.0, "macro_f1": 1.0, "auc": 1.0})


@pytest.mark.parametrize("seed", range(40))
def test_macro_f1_equals_sklearn_on_random_cases(seed):
    """sklearn's f1_score(average="macro", zero_division=0) over the classes present; a None answer
    is wrong for its reference and a false positive for no class."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 7))
    n = int(rng.integers(1, 12))  # small splits miss classes
    refs = rng.integers(0, num_classes, n).tolist()
    preds = [None if rng.random() < 0.15 else int(p) for p in rng.integers(0, num_classes, n)]
    present = sorted(set(refs) | {p for p in preds if p is not None})
    expected = f1_score(
        refs, [-1 if p is None else p for p in preds], labels=present, average="macro", zero_division=0
    )
    assert classification_metrics(preds, refs, num_classes=num_classes)["macro_f1"] == pytest.approx(expected)
    if None not in preds:
        assert classification_metrics(preds, refs)["macro_f1"] == pytest.approx(
            f1_score(refs, preds, average="macro", zero_division=0)
        )


def test_none_predictions_are_wrong_and_reported():
    refs = [0, 1, 2, 1]
    out = classification_metrics([0, None, 2, None], refs, num_classes=3)
    # class 0: F1 1; class 1: TP 0, FN 2 -> 0; class 2: F1 1. A None is no class's false positive.
    assert out == pytest.approx({"accuracy": 2 / 4, "macro_f1": 2 / 3, "parse_failure_rate": 2 / 4})
    # Guessing class 0 instead of answering nothing would also cost class 0's precision.
    assert classification_metrics([0, 0, 2, 0], refs, num_classes=3)["macro_f1"] < out["macro_f1"]
    all_failed = classification_metrics([None, None], [0, 1], num_classes=2)
    assert all_failed == pytest.approx({"accuracy": 0.0, "macro_f1": 0.0, "parse_failure_rate": 1.0})


def test_binary_auc_from_ranked_pairs():
    refs = [0, 0, 1, 1, 0, 1]
    pos_scores = [0.1, 0.4, 0.35, 0.8, 0.6, 0.6]
    # positives 0.35, 0.8, 0.6 vs negatives 0.1, 0.4, 0.6: (1 + 0 + 0) + 3 + (1 + 1 + 1/2) = 6.5 of 9 pairs
    expected = 6.5 / 9
    assert load_metric("roc_auc").compute(prediction_scores=pos_scores, references=refs)[
        "roc_auc"
    ] == pytest.approx(expected)
    two_columns = [[1 - s, s] for s in pos_scores]
    out = classification_metrics([int(s > 0.5) for s in pos_scores], refs, scores=two_columns)
    assert out["auc"] == pytest.approx(expected) == pytest.approx(roc_auc_score(refs, pos_scores))
    # The binary AUC is the positive-class (column 1) score's, whatever column 0 holds.
    odd = [[0.0, s] for s in pos_scores]
    assert classification_metrics([0] * 6, refs, scores=odd)["auc"] == pytest.approx(expected)


def test_multiclass_auc_from_ranked_pairs():
    preds = list(np.argmax(PROBS, axis=1))
    out = classification_metrics(preds, REFS, scores=PROBS)
    assert out["auc"] == pytest.approx(41 / 48)
    assert out["auc"] == pytest.approx(roc_auc_score(REFS, PROBS, multi_class="ovr", average="macro"))
    # Columns are ranked on their own, so unnormalised scores work (sklearn would refuse them).
    assert classification_metrics(preds, REFS, scores=np.array(PROBS) * 7)["auc"] == pytest.approx(41 / 48)


def test_auc_skips_classes_absent_from_references():
    # Only classes 0 and 1 occur (rows 0-3). Pairs: class 0: 0.6 -> 2, 0.3 -> 1 => 3/4;
    # class 1: 0.5 -> 2, 0.3 -> 1/2 (tie with 0.3) + 0 => 5/8. Class 2 has no positives: skipped.
    out = load_metric("roc_auc").compute(prediction_scores=PROBS[:4], references=REFS[:4])
    assert out["roc_auc"] == pytest.approx((3 / 4 + 5 / 8) / 2)
    assert out["skipped_classes"] == [2]


def test_auc_is_nan_with_a_reason_when_only_one_class_occurs():
    with pytest.warns(UserWarning, match="undefined"):
        out = classification_metrics([0, 0], [0, 0], scores=[[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    assert math.isnan(out["auc"]) and out["accuracy"] == 1.0


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="predictions for"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="score rows"):
        classification_metrics([0, 1], [0, 1], scores=[[0.5, 0.5]])
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


def test_softmax_is_stable():
    probs = softmax([[-1000.0, -1001.0], [0.0, 0.0]])
    assert np.allclose(probs, [[1 / (1 + math.exp(-1)), 1 / (1 + math.e)], [0.5, 0.5]])


def test_loads_by_path_offline_without_network(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"

    def no_network(*args, **kwargs):
        raise AssertionError(f"metric loading tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_metric.cache_clear()
    try:
        metrics = {name: load_metric(name) for name in METRIC_NAMES}
        assert all(load_metric(name) is metrics[name] for name in METRIC_NAMES)  # cached
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no hub lookups, no fallbacks
            out = classification_metrics([0, 2, 1, 1, 2, 2], REFS, scores=PROBS)
        # class 0: P 1, R 1/2 -> 2/3; class 1: 1; class 2: P 2/3, R 1 -> 4/5
        assert out == pytest.approx({"accuracy": 5 / 6, "macro_f1": (2 / 3 + 1 + 4 / 5) / 3, "auc": 41 / 48})
    finally:
        load_metric.cache_clear()


def test_scripts_ship_next_to_the_package():
    for name in METRIC_NAMES:
        path = metric_path(name)
        assert os.path.isfile(path)
        with open(path) as f:
            lines = f.read().splitlines()
        # evaluate's dependency check trips over a combined "import datasets, evaluate" line.
        assert "import datasets" in lines and "import evaluate" in lines
