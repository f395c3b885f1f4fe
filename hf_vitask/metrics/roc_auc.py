"""One-vs-rest macro ROC AUC from per-class scores.

A metric script for :func:`evaluate.load` by path (shipped with hf_vitask so evaluation works
offline). For each class ``c`` the binary AUC of "reference == c" against the score column
``c`` is computed (``sklearn.metrics.roc_auc_score``, ties count one half); the result is the
unweighted mean over classes. When every class occurs in the references this is exactly
``roc_auc_score(references, scores, multi_class="ovr", average="macro")``. Each column is
ranked on its own, so the scores need not sum to one (sklearn insists they do).

Binary tasks (two score columns, or one column holding the positive-class score) give the
usual binary AUC of the positive class (class 1) score.

Edge cases (documented rule, never an exception on valid input):
- a class absent from the references has no positives, so its one-vs-rest AUC is undefined:
  it is skipped, the mean is over the classes present, and the skipped ids are returned in
  ``skipped_classes``;
- with fewer than two classes present in the references no AUC is defined at all: the
  result is ``nan`` and ``skipped_classes`` lists every absent class.
"""

import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_DESCRIPTION = "One-vs-rest macro ROC AUC (sklearn roc_auc_score, multi_class='ovr', average='macro')."

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (list of list of float, or list of float): per-class scores, one row per
        sample (probabilities or any monotone per-class score); for a binary task a flat list of
        positive-class scores is accepted too.
    references (list of int): true class ids.
Returns:
    roc_auc (float): in [0, 1], or nan when fewer than two classes occur in the references.
    skipped_classes (list of int): classes absent from the references, left out of the mean.
Example:
    >>> metric = evaluate.load("hf_vitask/metrics/roc_auc.py")
    >>> metric.compute(prediction_scores=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])["roc_auc"]
    0.75
"""


class RocAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features(
                    {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int64")}
                ),
            ],
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"
            ],
        )

    def _compute(self, prediction_scores, references):
        references = np.asarray(references, dtype=np.int64)
        scores = np.asarray(prediction_scores, dtype=np.float64)
        if scores.ndim == 1:  # binary: positive-class scores
            scores = np.stack([1.0 - scores, scores], axis=1)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(
                f"prediction_scores must be (num_samples, num_classes), got {scores.shape} for "
                f"{references.shape[0]} references"
            )
        num_classes = scores.shape[1]
        if num_classes < 2:
            raise ValueError("ROC AUC needs scores for at least two classes")
        if ((references < 0) | (references >= num_classes)).any():
            raise ValueError(f"references must be class ids in [0, {num_classes})")
        if not np.isfinite(scores).all():
            raise ValueError("prediction_scores contain nan or inf")
        present = set(np.unique(references).tolist())
        skipped = [c for c in range(num_classes) if c not in present]
        if len(present) < 2:
            warnings.warn(
                f"ROC AUC is undefined: the references contain only class(es) {sorted(present)}; returning nan",
                stacklevel=2,
            )
            return {"roc_auc": float("nan"), "skipped_classes": skipped}
        if num_classes == 2:
            return {"roc_auc": float(roc_auc_score(references, scores[:, 1])), "skipped_classes": []}
        per_class = [roc_auc_score(references == c, scores[:, c]) for c in sorted(present)]
        return {"roc_auc": float(np.mean(per_class)), "skipped_classes": skipped}
