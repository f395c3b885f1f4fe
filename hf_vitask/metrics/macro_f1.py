"""Macro-F1: the unweighted mean of the per-class F1 scores, as scikit-learn computes it.

A metric script for :func:`evaluate.load` by path (shipped with hf_vitask so evaluation works
offline). It is ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` over the classes
present in the references or the predictions, the common convention: a class nobody predicted
and nobody has (possible in a small test split) does not enter the average, a class that is
predicted but never true scores 0, a class that is true but never predicted scores 0.

Rules:
- a negative prediction (hf_vitask passes ``-1`` for a generated answer that named no class)
  belongs to no class: it is a false negative for its reference class and a false positive
  for none;
- ``labels`` fixes the label set instead (every class of a task, say); a listed class with no
  references and no predictions then scores ``zero_division``.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = (
    "Macro-averaged F1 over the classes present (sklearn f1_score, average='macro', zero_division=0)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids; a negative id means "no class".
    references (list of int): true class ids.
    num_classes (int, optional): the classes are 0 .. num_classes-1; ids outside raise an error.
    labels (list of int, optional): explicit label set. Default: the classes present in
        references or (non-negative) predictions.
    zero_division (float): F1 of a listed class with no references and no predictions. Default 0.0.
Returns:
    macro_f1 (float): in [0, 1].
Example:
    >>> metric = evaluate.load("hf_vitask/metrics/macro_f1.py")
    >>> metric.compute(predictions=[0, 0, 1], references=[0, 1, 1], num_classes=3)["macro_f1"]  # (2/3 + 2/3) / 2
    0.6666666666666666
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
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
        )

    def _compute(self, predictions, references, num_classes=None, labels=None, zero_division=0.0):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("macro_f1 needs at least one prediction")
        if (references < 0).any():
            raise ValueError("references must be class ids >= 0")
        if num_classes is not None:
            outside = sorted({int(i) for i in np.concatenate([references, predictions]) if i >= num_classes})
            if outside:
                raise ValueError(f"class ids {outside} are outside [0, {num_classes})")
        if labels is None:
            labels = sorted(set(references.tolist()) | {int(p) for p in predictions if p >= 0})
        labels = [int(label) for label in labels]
        outside = sorted(set(references.tolist()) - set(labels))
        if outside:
            raise ValueError(f"references contain class ids {outside} outside the label set {labels}")
        # "No class" predictions get an id outside the label set: counted, but for no class.
        predictions = np.where(predictions < 0, -1, predictions)
        score = f1_score(references, predictions, labels=labels, average="macro", zero_division=zero_division)
        return {"macro_f1": float(score)}
