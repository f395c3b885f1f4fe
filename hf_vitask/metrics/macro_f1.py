"""Macro-F1 over a fixed label set: the unweighted mean of the per-class F1 scores.

A metric script for :func:`evaluate.load` by path (shipped with hf_vitask so evaluation works
offline). It is ``sklearn.metrics.f1_score(average="macro", labels=...)`` with ``labels``
covering every class, so a class the model never predicts scores 0 instead of dropping out
of the average (sklearn's default label set is only the classes seen in the inputs).

Rules:
- a negative prediction (hf_vitask passes ``-1`` for a generated answer that named no class)
  belongs to no class: it is a false negative for its reference class and a false positive
  for none;
- a class with no references and no predictions (F1 = 0/0) scores ``zero_division``
  (default 0.0, as sklearn does with explicit labels); pass ``zero_division=1.0`` to count
  such a class as perfect instead.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "Macro-averaged F1 over all classes (sklearn f1_score, average='macro', explicit labels)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids; a negative id means "no class".
    references (list of int): true class ids.
    num_classes (int, optional): the classes are 0 .. num_classes-1. Default: 1 + the largest id seen.
    labels (list of int, optional): explicit label set (overrides num_classes).
    zero_division (float): F1 of a class with no references and no predictions. Default 0.0.
Returns:
    macro_f1 (float): in [0, 1].
Example:
    >>> metric = evaluate.load("hf_vitask/metrics/macro_f1.py")
    >>> metric.compute(predictions=[0, 0, 1], references=[0, 1, 1], num_classes=3)["macro_f1"]  # (2/3 + 2/3 + 0) / 3
    0.4444444444444444
"""


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, num_classes=None, labels=None, zero_division=0.0):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("macro_f1 needs at least one prediction")
        if (references < 0).any():
            raise ValueError("references must be class ids >= 0")
        if labels is None:
            if num_classes is None:
                num_classes = int(max(references.max(), predictions.max())) + 1
            labels = list(range(int(num_classes)))
        labels = [int(label) for label in labels]
        outside = sorted(set(references.tolist()) - set(labels))
        if outside:
            raise ValueError(f"references contain class ids {outside} outside the label set {labels}")
        # "No class" predictions get an id outside the label set: counted, but for no class.
        predictions = np.where(predictions < 0, -1, predictions)
        score = f1_score(
            references, predictions, labels=labels, average="macro", zero_division=zero_division
        )
        return {"macro_f1": float(score)}
