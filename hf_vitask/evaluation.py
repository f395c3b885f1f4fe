"""Turning a trained VLM into class predictions: option log-likelihood scoring and generate-then-parse.

Scoring teacher-forces every class's response after the prompt and averages (``option_score=
"mean"``, the default) or sums its token log-probabilities: one number per class, so there is
always an answer and there are per-class scores for AUC. Generation answers freely and the text is mapped back to a class
with :meth:`TaskSpec.parse`; answers naming no class count as parse failures.

:func:`evaluate_vlm` and :func:`evaluate_tsm` turn either into accuracy / macro-F1 / AUC on a
labelled dataset, and :func:`compute_classification_metrics` does the same for
``Trainer(compute_metrics=...)``; the metrics are the offline scripts in :mod:`hf_vitask.metrics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_vitask.config import DEFAULT_OPTION_SCORE, OPTION_SCORES
from hf_vitask.data.collator import VITaskCollator, build_prompts, load_image
from hf_vitask.distributed import gather, gather_rows, my_block
from hf_vitask.losses import IGNORE_INDEX, response_row_ids, token_ce
from hf_vitask.metrics import classification_metrics, softmax
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.passes import candidate_logprobs
from hf_vitask.models.tsm import TaskSpecificModel, tsm_predict
from hf_vitask.task import TaskSpec


def _decoded_batches(images: Sequence, size: int):
    """Batches of RGB PIL images, each input (PIL, path, datasets dict) decoded once."""
    for start in range(0, len(images), size):
        yield [load_image(img, f" at index {start + i}") for i, img in enumerate(images[start : start + size])]


def row_batches(dataset, rows: range, column: str | None, batch_size: int, num_workers: int = 0):
    """A DataLoader of the ``column`` values of ``rows`` of ``dataset`` (a list of images when ``column``
    is None), ``batch_size`` rows at a time, in order (``num_workers`` processes read and decode ahead)."""
    from torch.utils.data import DataLoader

    def collate(ids: list[int]) -> list:
        if column is None:
            return list(dataset[ids[0] : ids[-1] + 1])
        return _column(dataset, ids[0], ids[-1] + 1, column)

    return DataLoader(list(rows), batch_size=max(batch_size, 1), shuffle=False, collate_fn=collate,
                      num_workers=num_workers)


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


def _check_tsm(model: VITaskModel, use_tsm: bool) -> None:
    if use_tsm and (model.tsm is None or model.connector is None):
        raise ValueError("use_tsm=True needs a model with a TSM and an exemplar connector")


@torch.no_grad()
def score_options(
    model: VITaskModel,
    processor,
    task: TaskSpec,
    images: Sequence,
    *,
    use_tsm: bool = False,
    complete_instruction: bool = True,
    batch_size: int = 8,
    shared_prompt: bool = True,
    option_score: str = DEFAULT_OPTION_SCORE,
) -> torch.Tensor:
    """Log-likelihood of each class's response for each image: a ``(N, num_classes)`` tensor.

    ``option_score``: ``"sum"`` of the response's token log-probs (its log-likelihood) or their
    ``"mean"`` (per token). A sum falls with every token, so an untrained or weakly trained model
    prefers short class names; the mean does not (see docs/cli.md, "Evaluate").
    ``shared_prompt``: run each image's prompt once into a KV cache and score all class responses
    on it (:func:`~hf_vitask.models.passes.candidate_logprobs`); False scores every class as
    a full sequence (the reference; same numbers up to float rounding, tested).
    """
    _check_tsm(model, use_tsm)
    if option_score not in OPTION_SCORES:
        raise ValueError(f"option_score must be one of {OPTION_SCORES}, got {option_score!r}")
    collator = VITaskCollator(
        processor, task, tsm=model.tsm if use_tsm else None, complete_instruction=complete_instruction
    )
    was_training = model.training
    model.eval()
    scores = []
    try:
        candidates = None
        for chunk in _decoded_batches(images, batch_size):
            per_image = None
            if shared_prompt:
                prompts = {k: _to(v, model.device) for k, v in collator([{"image": img, "label": 0} for img in chunk]).items()}
                if candidates is None:  # the C responses after the prompt: tokenised once per call
                    rows = [{"image": chunk[0], "label": c} for c in range(task.num_classes)]
                    candidates = {k: _to(v, model.device) for k, v in collator(rows).items()}
                exemplar = model.exemplar_embeds(prompts["tsm_pixel_values"]) if use_tsm else None
                per_image = candidate_logprobs(model, prompts, candidates, exemplar)
            if per_image is None:  # every class as its own full sequence
                rows = [{"image": img, "label": c} for img in chunk for c in range(task.num_classes)]
                batch = {k: _to(v, model.device) for k, v in collator(rows).items()}
                batch.pop("class_ids")
                out = model(**batch)
                token_logp = -token_ce(out.response_logits, out.response_targets)
                per_image = torch.zeros(len(rows), device=token_logp.device).index_add_(
                    0, response_row_ids(batch["labels"]), token_logp
                ).view(len(chunk), task.num_classes)
            scores.append(per_image.cpu())
    finally:
        model.train(was_training)
    scores = torch.cat(scores)
    if option_score == "mean":
        lengths = response_lengths(collator, task, images[0])
        scores = scores / lengths.to(scores.dtype)
    return scores


def response_lengths(collator, task: TaskSpec, image) -> torch.Tensor:
    """Tokens in each class's response (the same after any image): what ``option_score="mean"`` divides by."""
    labels = collator([{"image": image, "label": c} for c in range(task.num_classes)])["labels"]
    return (labels != IGNORE_INDEX).sum(1)


@torch.no_grad()
def generate_answers(
    model: VITaskModel,
    processor,
    task: TaskSpec,
    images: Sequence,
    *,
    use_tsm: bool = False,
    complete_instruction: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers (left-padded batches), decoded without special tokens."""
    _check_tsm(model, use_tsm)
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for chunk in _decoded_batches(images, batch_size):
            batch = {k: v.to(model.device) for k, v in build_prompts(processor, task, chunk, complete_instruction).items()}
            if use_tsm:
                batch["tsm_pixel_values"] = model.tsm.preprocess(list(chunk)).to(model.device)
            new_tokens = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def predict_classes(
    model: VITaskModel,
    processor,
    task: TaskSpec,
    images: Sequence,
    *,
    use_tsm: bool = False,
    method: str = "likelihood",
    complete_instruction: bool = True,
    batch_size: int = 8,
    option_score: str = DEFAULT_OPTION_SCORE,
) -> list[int | None]:
    """Class id per image (``None`` when a generated answer names no class)."""
    if method == "likelihood":
        scores = score_options(
            model, processor, task, images, use_tsm=use_tsm, complete_instruction=complete_instruction,
            batch_size=batch_size, option_score=option_score,
        )
        return scores.argmax(-1).tolist()
    if method == "generate":
        texts = generate_answers(
            model, processor, task, images, use_tsm=use_tsm, complete_instruction=complete_instruction,
            batch_size=batch_size,
        )
        return [task.parse(t) for t in texts]
    raise ValueError(f"method must be 'likelihood' or 'generate', got {method!r}")


# -- metrics on a labelled dataset ---------------------------------------------------------------


def _num_rows(dataset, max_samples: int | None) -> int:
    n = len(dataset)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        n = min(n, max_samples)
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    return n


def _column(dataset, start: int, stop: int, column: str) -> list:
    """Rows ``start:stop`` of one column (a ``datasets.Dataset`` or anything sliced the same way)."""
    rows = dataset[start:stop]
    if column not in rows:
        raise ValueError(f"the dataset has no column {column!r}; its columns are {list(rows)}")
    return list(rows[column])


@contextlib.contextmanager
def plugged_tsm(model: VITaskModel, tsm: TaskSpecificModel | None):
    """Temporarily run ``model`` with another task-specific model (the paper's VITask_plug).

    The exemplar connector is kept; only the TSM that feeds it changes, so the plug-in TSM must
    give features of the size the connector was trained on. ``tsm=None`` changes nothing. The
    original ``model.tsm`` is restored on exit, also after an error.
    """
    if tsm is None:
        yield model
        return
    if model.connector is None:
        raise ValueError("a plug-in TSM needs a model with an exemplar connector (trained with EP)")
    expected = model.connector.config.tsm_dim
    if tsm.feature_dim != expected:
        raise ValueError(f"the plug-in TSM gives {tsm.feature_dim}-dim features but the connector expects {expected}")
    original = model.tsm
    model.tsm = tsm
    try:
        yield model
    finally:
        model.tsm = original


def evaluate_vlm(
    model: VITaskModel,
    processor,
    task: TaskSpec,
    dataset,
    *,
    use_tsm: bool = False,
    tsm: TaskSpecificModel | None = None,
    complete_instruction: bool = True,
    methods: Sequence[str] = ("likelihood", "generate"),
    batch_size: int = 8,
    image_column: str = "image",
    label_column: str = "label",
    max_samples: int | None = None,
    max_new_tokens: int = 16,
    option_score: str = DEFAULT_OPTION_SCORE,
    split_between_processes: bool = False,
    progress: bool = True,
    num_workers: int = 0,
) -> dict:
    """Accuracy / macro-F1 (/ AUC) of the VLM on a labelled dataset, for each prediction method.

    ``"likelihood"``: every class's response is scored (:func:`score_options`, by ``option_score``),
    the argmax is the prediction and the softmax of the per-class scores gives the probabilities
    for the one-vs-rest macro AUC. ``"generate"``: greedy answers parsed back to classes
    (:meth:`TaskSpec.parse`); an answer naming no class counts as wrong, and their share is
    ``parse_failure_rate``.

    ``tsm`` plugs in a different task-specific model for this call only (VITask_plug, e.g. a
    stronger TSM trained after the VLM); ``model.tsm`` is restored afterwards. Without
    ``use_tsm`` no TSM runs, so ``tsm`` is ignored (a loop over the with/without-TSM variants
    can pass the same arguments).
    ``dataset`` is a ``datasets.Dataset`` (labels as class ids or class names); the first
    ``max_samples`` rows are used, ``batch_size`` at a time (a progress bar unless ``progress=False``).
    ``split_between_processes``: under several processes (``torchrun``), each one scores its own
    block of rows and the outputs are gathered, so every process returns the single-process
    metrics; every process must make the call.

    Returns ``{"num_samples": N, "likelihood": {"accuracy", "macro_f1", "auc"},
    "generate": {"accuracy", "macro_f1", "parse_failure_rate"}}`` with the requested methods.
    """
    methods = tuple(methods)
    if not methods or any(m not in ("likelihood", "generate") for m in methods):
        raise ValueError(f"methods must be a non-empty subset of ('likelihood', 'generate'), got {methods}")
    if option_score not in OPTION_SCORES:
        raise ValueError(f"option_score must be one of {OPTION_SCORES}, got {option_score!r}")
    n = _num_rows(dataset, max_samples)
    references = [task.check_label(y, f" at row {i}") for i, y in enumerate(_column(dataset, 0, n, label_column))]
    rows = my_block(n) if split_between_processes else range(n)
    outputs = vlm_outputs(model, processor, task, dataset, rows, use_tsm=use_tsm, tsm=tsm, methods=methods,
                          complete_instruction=complete_instruction, batch_size=batch_size, image_column=image_column,
                          max_new_tokens=max_new_tokens, option_score=option_score, progress=progress,
                          num_workers=num_workers)
    if split_between_processes:
        outputs = {k: gather_rows(v) if torch.is_tensor(v) else gather(v)
                   for k, v in outputs.items()}
    return {"num_samples": n, **vlm_metrics(outputs, references, task)}


def vlm_outputs(
    model: VITaskModel,
    processor,
    task: TaskSpec,
    dataset,
    rows: range,
    *,
    methods: Sequence[str],
    use_tsm: bool = False,
    tsm: TaskSpecificModel | None = None,
    complete_instruction: bool = True,
    batch_size: int = 8,
    image_column: str = "image",
    max_new_tokens: int = 16,
    option_score: str = DEFAULT_OPTION_SCORE,
    progress: bool = True,
    num_workers: int = 0,
) -> dict:
    """What :func:`evaluate_vlm` computes per row, for ``rows`` of ``dataset``: ``{"likelihood": (N, C)
    option scores, "generate": [N answers]}`` (the requested methods). Batches of ``batch_size`` rows
    come from a DataLoader (``num_workers`` decode images ahead), with a progress bar."""
    kwargs = dict(use_tsm=use_tsm, complete_instruction=complete_instruction, batch_size=batch_size)
    scores: list[torch.Tensor] = []
    texts: list[str] = []
    with plugged_tsm(model, tsm if use_tsm else None):
        _check_tsm(model, use_tsm)
        for images in tqdm(row_batches(dataset, rows, image_column, batch_size, num_workers), total=-(-len(rows) // batch_size),
                           desc="evaluate", unit="batch", disable=not progress):
            if "likelihood" in methods:
                scores.append(score_options(model, processor, task, images, option_score=option_score, **kwargs))
            if "generate" in methods:
                texts += generate_answers(model, processor, task, images, max_new_tokens=max_new_tokens, **kwargs)
    outputs: dict = {}
    if "likelihood" in methods:
        outputs["likelihood"] = torch.cat(scores) if scores else torch.zeros(0, task.num_classes)
    if "generate" in methods:
        outputs["generate"] = texts
    return outputs


def vlm_metrics(outputs: dict, references: list[int], task: TaskSpec) -> dict:
    """Metrics of :func:`vlm_outputs` against the class ids ``references``, per method."""
    result: dict = {}
    if "likelihood" in outputs:
        log_likelihoods = outputs["likelihood"]
        result["likelihood"] = classification_metrics(
            log_likelihoods.argmax(-1).tolist(), references,
            scores=softmax(log_likelihoods.double().numpy()), num_classes=task.num_classes,
        )
    if "generate" in outputs:
        metrics = classification_metrics([task.parse(t) for t in outputs["generate"]], references,
                                          num_classes=task.num_classes)
        metrics.setdefault("parse_failure_rate", 0.0)
        result["generate"] = metrics
    return result


def evaluate_tsm(
    tsm: TaskSpecificModel,
    dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    image_column: str = "image",
    label_column: str = "label",
    max_samples: int | None = None,
    split_between_processes: bool = False,
) -> dict:
    """Accuracy, macro-F1 and one-vs-rest macro AUC of the task-specific model alone (argmax and
    softmax of its logits, via :func:`tsm_predict`), plus ``num_samples``.
    ``split_between_processes``: as in :func:`evaluate_vlm`."""
    n = _num_rows(dataset, max_samples)
    if n < len(dataset):
        dataset = dataset.select(range(n))
    references = [int(y) for y in _column(dataset, 0, n, label_column)]
    if split_between_processes:
        block = my_block(n)
        probs = tsm_predict(tsm, dataset.select(block), batch_size=batch_size, device=device,
                            image_column=image_column) if len(block) else torch.zeros(0, tsm.num_classes)
        probs = gather_rows(probs)
    else:
        probs = tsm_predict(tsm, dataset, batch_size=batch_size, device=device, image_column=image_column)
    metrics = classification_metrics(
        probs.argmax(-1).tolist(), references, scores=probs.double().numpy(), num_classes=tsm.num_classes
    )
    return {"num_samples": n, **metrics}


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """``Trainer(compute_metrics=...)``: per-class scores -> accuracy, macro-F1, AUC.

    ``eval_pred.predictions`` is the ``(N, num_classes)`` array of per-class log-likelihoods
    (or logits; a tuple takes its first element) and ``eval_pred.label_ids`` the ``(N,)`` class
    ids. The prediction is the argmax; AUC uses the softmax over classes.
    """
    scores = eval_pred.predictions
    if isinstance(scores, (tuple, list)):
        scores = scores[0]
    scores = np.asarray(scores, dtype=np.float64)
    labels = eval_pred.label_ids
    if isinstance(labels, (tuple, list)) and labels and not np.isscalar(labels[0]):
        labels = labels[0]
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"compute_classification_metrics expects (N, num_classes) scores and (N,) class ids, "
            f"got {scores.shape} and {labels.shape}"
        )
    return classification_metrics(
        scores.argmax(-1).tolist(), labels.tolist(), scores=softmax(scores), num_classes=scores.shape[1]
    )
