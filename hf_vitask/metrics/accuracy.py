"""Accuracy: the fraction of predictions equal to their reference class id.

A metric script for :func:`evaluate.load` by path (shipped with hf_vitask so evaluation works
offline). A negative prediction (hf_vitask passes ``-1`` for a generated answer that named no
class) never equals a reference, so it counts as wrong.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: (number of predictions equal to the reference) / (number of predictions)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids; a negative id means "no class" and is always wrong.
    references (list of int): true class ids.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    accuracy (float): in [0, 1].
Example:
    >>> metric = evaluate.load("hf_vitask/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, -1], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("accuracy needs at least one prediction")
        correct = (predictions == references).astype(np.float64)
        weights = (
            np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        )
        return {"accuracy": float((correct * weights).sum() / weights.sum())}
