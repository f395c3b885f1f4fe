"""evaluate_vlm / evaluate_tsm / compute_classification_metrics on tiny models and hand-made scores."""

import contextlib

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_vitask import evaluation
from hf_vitask.evaluation import (
    compute_classification_metrics,
    evaluate_tsm,
    evaluate_vlm,
    plugged_tsm,
    predict_classes,
    score_options,
)
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tsm import TaskSpecificModel, tsm_predict
from tests.conftest import sklearn_metrics

N = 4  # the first 4 test digits are classes 5, 6, 0, 9: enough classes for a defined AUC


def _spy(monkeypatch, name):
    """Record what ``hf_vitask.evaluation.<name>`` returns while it keeps working."""
    real, returned = getattr(evaluation, name), []

    def spy(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(evaluation, name, spy)
    return returned


@contextlib.contextmanager
def _count_calls(tsm):
    """Count forward passes through the TSM's feature extractor (its first layer)."""
    calls = []
    handle = next(tsm.model.children()).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_evaluate_vlm_metrics_are_those_of_its_scores_and_answers(tiny, task, digits, tsm, monkeypatch):
    """Each method's metrics, recomputed with scikit-learn from the option scores and the generated
    texts evaluate_vlm produced; the TSM and the instruction reach both methods."""
    vlm, processor = tiny
    model = VITaskModel.from_vlm(vlm, processor, tsm=tsm).train()
    test = digits["test"]
    references = test["label"][:N]
    scores, texts = _spy(monkeypatch, "score_options"), _spy(monkeypatch, "generate_answers")
    seen = {}
    for use_tsm in (False, True):
        for complete in (True, False):
            scores.clear()
            texts.clear()
            with _count_calls(tsm) as calls:
                out = evaluate_vlm(
                    model,
                    processor,
                    task,
                    test,
                    use_tsm=use_tsm,
                    complete_instruction=complete,
                    batch_size=N,
                    max_samples=N,
                )
            assert bool(calls) == use_tsm
            assert out.keys() == {"num_samples", "likelihood", "generate"} and out["num_samples"] == N
            assert out["likelihood"].keys() == {"accuracy", "macro_f1", "auc"}
            assert out["generate"].keys() == {"accuracy", "macro_f1", "parse_failure_rate"}
            (option_scores,), (generated,) = scores, texts
            answers = [task.parse(t) for t in generated]
            assert option_scores.shape == (N, task.num_classes) and len(answers) == N
            expected = sklearn_metrics(option_scores.argmax(-1).tolist(), references, option_scores)
            assert out["likelihood"] == pytest.approx(expected, abs=1e-9), (out, expected)
            expected = {"parse_failure_rate": 0.0, **sklearn_metrics(answers, references)}
            assert out["generate"] == pytest.approx(expected, abs=1e-9), (out, expected)
            seen[use_tsm, complete] = option_scores
    # the exemplar and the instruction change what the model is asked, so its scores
    for a, b in (
        ((False, True), (True, True)),
        ((False, True), (False, False)),
        ((True, True), (True, False)),
    ):
        assert (seen[a] - seen[b]).abs().max() > 1e-3, (a, b)
    # The likelihood accuracy is exactly that of predict_classes.
    preds = predict_classes(
        model, processor, task, test["image"][:N], use_tsm=True, complete_instruction=False
    )
    expected = np.mean(np.array(preds) == np.array(test["label"][:N]))
    assert out["likelihood"]["accuracy"] == pytest.approx(expected)
    assert model.training  # the mode is restored after evaluation


def test_plug_in_tsm_is_used_and_restored(tiny, task, digits, tsm):
    vlm, processor = tiny
    model = VITaskModel.from_vlm(vlm, processor, tsm=tsm)
    other = TaskSpecificModel(
        "test_resnet", num_classes=10, img_size=32
    ).eval()  # same size, different features
    images = digits["test"]["image"][:2]

    own = score_options(model, processor, task, images, use_tsm=True)
    with plugged_tsm(model, other):
        assert model.tsm is other
        plugged = score_options(model, processor, task, images, use_tsm=True)
    assert model.tsm is tsm
    assert not torch.allclose(own, plugged, atol=1e-4)  # other exemplar features -> other EP scores

    with _count_calls(tsm) as own_calls, _count_calls(other) as other_calls:
        out = evaluate_vlm(
            model,
            processor,
            task,
            digits["test"],
            use_tsm=True,
            tsm=other,
            methods=("likelihood",),
            max_samples=N,
            batch_size=N,
        )
    assert other_calls and not own_calls and model.tsm is tsm
    assert out.keys() == {"num_samples", "likelihood"}
    with plugged_tsm(model, other):  # the metrics of the plug-in TSM's scores, not of the model's own TSM
        plugged = score_options(model, processor, task, digits["test"]["image"][:N], use_tsm=True)
    expected = sklearn_metrics(plugged.argmax(-1).tolist(), digits["test"]["label"][:N], plugged)
    assert out["likelihood"] == pytest.approx(expected, abs=1e-6)

    # Restored after an error too; a TSM of the wrong feature size is refused before anything runs.
    with pytest.raises(RuntimeError), plugged_tsm(model, other):
        raise RuntimeError("boom")
    assert model.tsm is tsm
    wrong = TaskSpecificModel("test_vit", num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="connector expects"):
        evaluate_vlm(model, processor, task, digits["test"], use_tsm=True, tsm=wrong, max_samples=N)
    assert model.tsm is tsm
    with _count_calls(other) as other_calls:  # without use_tsm no TSM runs, plug-in or not
        evaluate_vlm(
            model, processor, task, digits["test"], tsm=other, methods=("likelihood",), max_samples=N
        )
    assert not other_calls and model.tsm is tsm
    with pytest.raises(ValueError, match="methods"):
        evaluate_vlm(model, processor, task, digits["test"], methods=("beam",), max_samples=N)


def test_evaluate_tsm_matches_its_predictions(tsm, digits):
    test = digits["test"]
    out = evaluate_tsm(tsm, test, max_samples=12)
    assert out.keys() == {"num_samples", "accuracy", "macro_f1", "auc"} and out["num_samples"] == 12
    probs = tsm_predict(tsm, test.select(range(12)))
    assert out["accuracy"] == pytest.approx(
        (probs.argmax(-1) == torch.tensor(test["label"][:12])).float().mean()
    )
    # AUC ranks the probabilities themselves: the softmax of their logs gives them back
    expected = sklearn_metrics(probs.argmax(-1).tolist(), test["label"][:12], probs.double().log())
    assert {k: v for k, v in out.items() if k != "num_samples"} == pytest.approx(expected, abs=1e-6)
    assert out["accuracy"] > 0.3  # well above chance (0.1): 0.75 to 0.92 over five initialisations of the TSM
    assert evaluate_tsm(tsm, test)["num_samples"] == len(test)


def test_compute_classification_metrics_on_log_likelihoods():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.35, 0.45, 0.2],
            [0.2, 0.5, 0.3],
            [0.5, 0.25, 0.25],
            [0.1, 0.2, 0.7],
            [0.25, 0.15, 0.6],
        ]
    )
    labels = np.array([0, 0, 1, 1, 2, 2])
    # argmax 0, 1, 1, 0, 2, 2 -> 4 of 6 right; F1: class 0 1/2, class 1 1/2, class 2 1.
    # AUC by ranked pairs (no ties, so float round-off cannot flip one), 8 pairs per class:
    #   class 0: 0.6 beats all 4 negatives (0.2 0.5 0.1 0.25), 0.35 beats 3 -> 7/8
    #   class 1: 0.5 beats all 4 (0.3 0.45 0.2 0.15), 0.25 beats 2 -> 6/8;  class 2: 8/8  => 7/8.
    # The softmax of log-probabilities gives back probs; a per-row shift (unnormalised
    # log-likelihoods) changes nothing.
    expected = {"accuracy": 4 / 6, "macro_f1": 2 / 3, "auc": 7 / 8}
    log_likelihoods = np.log(probs) - np.arange(6)[:, None] * 3.0
    assert compute_classification_metrics(EvalPrediction(predictions=log_likelihoods, label_ids=labels)) == (
        pytest.approx(expected)
    )
    as_tuple = EvalPrediction(predictions=(log_likelihoods, np.zeros(6)), label_ids=labels)
    assert compute_classification_metrics(as_tuple) == pytest.approx(expected)
    with pytest.raises(ValueError, match="expects"):
        compute_classification_metrics(EvalPrediction(predictions=log_likelihoods[:, 0], label_ids=labels))


@pytest.mark.parametrize("use_tsm", [False, True])
def test_shared_prompt_scoring_equals_full_sequences(tiny, task, digits, tsm, use_tsm):
    vlm, processor = tiny
    with torch.no_grad():  # a non-trivial output layer, so the class scores differ
        vlm.get_output_embeddings().weight.normal_(0, 0.5)
    model = VITaskModel.from_vlm(vlm, processor, tsm=tsm)
    images = digits["test"]["image"][:3]
    calls = []
    handle = model.vlm.register_forward_pre_hook(lambda *_: calls.append(1))
    shared = score_options(model, processor, task, images, use_tsm=use_tsm, batch_size=3)
    assert len(calls) == 2  # one prompt forward, one batched forward of every class's response
    full = score_options(model, processor, task, images, use_tsm=use_tsm, batch_size=3, shared_prompt=False)
    handle.remove()
    assert shared.shape == (3, task.num_classes) and shared.std() > 0.1
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)


def test_summed_option_scores_prefer_short_class_names_and_the_mean_does_not(tiny, digits):
    """Class names of 1 to 20 tokens on an untrained model: a sum of log-probs falls with every
    token, so 'sum' picks the shortest name; 'mean' (per token) does not, and is sum / length."""
    from hf_vitask.task import TaskSpec

    vlm, processor = tiny
    model = VITaskModel.from_vlm(vlm, processor, with_connector=False)
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    names = [" ".join(words[(k + j) % 10] for j in range(k)) for k in (1, 3, 6, 10, 14, 20)]
    task = TaskSpec(class_names=names, response_template="{label}")
    images = digits["test"]["image"][:12]
    summed = score_options(model, processor, task, images, option_score="sum")
    mean = score_options(model, processor, task, images, option_score="mean")
    from hf_vitask.data.collator import VITaskCollator

    labels = VITaskCollator(processor, task)([{"image": images[0], "label": c} for c in range(6)])["labels"]
    lengths = (labels != -100).sum(1)  # the response tokens (name, eos, and what the template adds)
    assert lengths.tolist() == sorted(lengths.tolist()) and lengths[-1] >= 4 * lengths[0]
    torch.testing.assert_close(mean, summed / lengths)
    # sum: every image ranks the classes exactly by length (shortest first) ...
    assert (summed.diff(dim=-1) < 0).all() and (summed.argmax(-1) == 0).all()
    # ... mean: the per-token scores of an untrained model are about ln(1/V) whatever the length
    assert (mean.diff(dim=-1) < 0).all(-1).float().mean() <= 0.25
    assert (summed.max(-1).values - summed.min(-1).values).min() > 10 * (
        mean.max(-1).values - mean.min(-1).values
    ).max()
    assert predict_classes(model, processor, task, images, option_score="mean") == mean.argmax(-1).tolist()
    with pytest.raises(ValueError, match="option_score"):
        score_options(model, processor, task, images, option_score="max")
