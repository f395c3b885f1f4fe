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
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_vitask.config import DEFAULT_OPTION_SCORE, OPTION_SCORES
from hf_vitask.data.collator import VITaskCollator
from hf_vitask.data.images import load_image
from hf_vitask.distributed import gather, gather_rows, my_block
from hf_vitask.losses import IGNORE_INDEX, response_logits, response_row_ids, token_ce
from hf_vitask.metrics import classification_metrics, softmax
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.passes import candidate_logprobs
from hf_vitask.models.tsm import TaskSpecificModel, tsm_predict
from hf_vitask.processing import VITaskProcessor
from hf_vitask.task import TaskSpec


def _decoded_batches(images: Sequence, size: int):
    """Batches of RGB PIL images, each input (PIL, path, datasets dict) decoded once."""
    for start in range(0, len(images), size):
        yield [
            load_image(img, f" at index {start + i}") for i, img in enumerate(images[start : start + size])
        ]


def row_batches(dataset, rows: range, column: str | None, batch_size: int, num_workers: int = 0):
    """A DataLoader of the ``column`` values of ``rows`` of ``dataset`` (a list of images when ``column``
    is None), ``batch_size`` rows at a time, in order (``num_workers`` processes read and decode ahead)."""
    from torch.utils.data import DataLoader

    def collate(ids: list[int]) -> list:
        if column is None:
            return list(dataset[ids[0] : ids[-1] + 1])
        return _column(dataset, ids[0], ids[-1] + 1, column)

    return DataLoader(
        list(rows), batch_size=max(batch_size, 1), shuffle=False, collate_fn=collate, num_workers=num_workers
    )


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
                prompts = {
                    k: _to(v, model.device)
                    for k, v in collator([{"image": img, "label": 0} for img in chunk]).items()
                }
                if candidates is None:  # the C responses after the prompt: tokenised once per call
                    rows = [{"image": chunk[0], "label": c} for c in range(task.num_classes)]
                    candidates = {k: _to(v, model.device) for k, v in collator(rows).items()}
                exemplar = model.exemplar_embeds(prompts["tsm_pixel_values"]) if use_tsm else None
                per_image = candidate_logprobs(model, prompts, candidates, exemplar)
            if per_image is None:  # every class as its own full sequence
                rows = [{"image": img, "label": c} for img in chunk for c in range(task.num_classes)]
                batch = {k: _to(v, model.device) for k, v in collator(rows).items()}
                batch.pop("class_ids")
                per_image = response_logprobs(model, batch).view(len(chunk), task.num_classes)
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
    instruction = task.instruction(complete_instruction)
    return generate_texts(
        model,
        processor,
        images,
        [instruction] * len(images),
        use_tsm=use_tsm,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )


# -- the two loops every evaluation runs: teacher-forced scoring and greedy generation ---------


def response_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's response tokens (``labels != -100``), shape ``(B,)``.

    ``model``: a :class:`VITaskModel` (TSM input in ``batch`` adds the exemplar), a peft model or a
    plain VLM (its own loss is not used: the logits are read at the response positions).
    """
    labels = batch["labels"]
    if isinstance(model, VITaskModel):
        out = model(**batch)
        logits, targets = out.response_logits, out.response_targets
    else:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits, targets = response_logits(logits, labels)
    token_logp = -token_ce(logits, targets)
    return torch.zeros(labels.shape[0], device=token_logp.device).index_add_(
        0, response_row_ids(labels), token_logp
    )


@torch.no_grad()
def generate_texts(
    model,
    processor,
    images: Sequence,
    instructions: Sequence[str],
    *,
    use_tsm: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers to ``instructions[i]`` about ``images[i]`` (left-padded batches), decoded
    without special tokens. ``model``: a :class:`VITaskModel` (``use_tsm`` adds the exemplar), a
    peft model or a plain VLM."""
    tokenizer = processor.tokenizer
    renderer = VITaskProcessor.wrap(processor)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [
                load_image(img, f" at index {start + i}")
                for i, img in enumerate(images[start : start + batch_size])
            ]
            batch = renderer.encode_prompts(chunk, instructions[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            if use_tsm:
                batch["tsm_pixel_values"] = model.tsm.preprocess(chunk).to(device)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            if not isinstance(model, VITaskModel):  # VITaskModel.generate returns the new tokens only
                out = out[:, batch["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts


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
            model,
            processor,
            task,
            images,
            use_tsm=use_tsm,
            complete_instruction=complete_instruction,
            batch_size=batch_size,
            option_score=option_score,
        )
        return scores.argmax(-1).tolist()
    if method == "generate":
        texts = generate_answers(
            model,
            processor,
            task,
            images,
            use_tsm=use_tsm,
            complete_instruction=complete_instruction,
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
        raise ValueError(
            f"the plug-in TSM gives {tsm.feature_dim}-dim features but the connector expects {expected}"
        )
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
    references = [
        task.check_label(y, f" at row {i}") for i, y in enumerate(_column(dataset, 0, n, label_column))
    ]
    rows = my_block(n) if split_between_processes else range(n)
    outputs = vlm_outputs(
        model,
        processor,
        task,
        dataset,
        rows,
        use_tsm=use_tsm,
        tsm=tsm,
        methods=methods,
        complete_instruction=complete_instruction,
        batch_size=batch_size,
        image_column=image_column,
        max_new_tokens=max_new_tokens,
        option_score=option_score,
        progress=progress,
        num_workers=num_workers,
    )
    if split_between_processes:
        outputs = {k: gather_rows(v) if torch.is_tensor(v) else gather(v) for k, v in outputs.items()}
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
        for images in tqdm(
            row_batches(dataset, rows, image_column, batch_size, num_workers),
            total=-(-len(rows) // batch_size),
            desc="evaluate",
            unit="batch",
            disable=not progress,
        ):
            if "likelihood" in methods:
                scores.append(
                    score_options(model, processor, task, images, option_score=option_score, **kwargs)
                )
            if "generate" in methods:
                texts += generate_answers(
                    model, processor, task, images, max_new_tokens=max_new_tokens, **kwargs
                )
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
            log_likelihoods.argmax(-1).tolist(),
            references,
            scores=softmax(log_likelihoods.double().numpy()),
            num_classes=task.num_classes,
        )
    if "generate" in outputs:
        metrics = classification_metrics(
            [task.parse(t) for t in outputs["generate"]], references, num_classes=task.num_classes
        )
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
        probs = (
            tsm_predict(
                tsm, dataset.select(block), batch_size=batch_size, device=device, image_column=image_column
            )
            if len(block)
            else torch.zeros(0, tsm.num_classes)
        )
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


# -- multiple-choice questions answered with a letter (instruction-free evaluation) -------------------

LETTERS = "ABCDEFGHIJ"
ANSWER_INSTRUCTION = "Answer with the letter."


def mc_prompt(question: str, options: Sequence[str], answer_instruction: str = ANSWER_INSTRUCTION) -> str:
    """``question``, one ``"A. option"`` line per option, then ``answer_instruction``."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question.strip(), *(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))]
    if answer_instruction:
        lines.append(answer_instruction)
    return "\n".join(lines)


def parse_letter(text: str, num_options: int) -> int | None:
    """Index of the first stand-alone option letter (``A``.. for ``num_options``) in ``text``, or None.

    A letter counts when no other letter touches it ("B", "B.", "(C)", "Answer: D"), so the
    capital starting a word ("Because") is not an answer. Case-sensitive: "a" is not "A".
    """
    valid = LETTERS[:num_options]
    for match in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
        if match.group(1) in valid:
            return valid.index(match.group(1))
    return None


def check_question(q: dict, i: int) -> None:
    """Fail naming the question when a key is missing or the answer is out of range."""
    missing = [k for k in ("image", "question", "options", "answer") if k not in q]
    if missing:
        raise KeyError(f"Question {i} lacks {missing}; a question is {{image, question, options, answer}}")
    n = len(q["options"])
    if not 2 <= n <= len(LETTERS):
        raise ValueError(f"Question {i} has {n} options; 2 to {len(LETTERS)} are supported")
    if not isinstance(q["answer"], int) or not 0 <= q["answer"] < n:
        raise ValueError(f"Question {i}: answer must be an option index in [0, {n}), got {q['answer']!r}")


def _mc_examples(questions: Sequence[dict], answer_instruction: str) -> list[tuple[dict, str]]:
    out = []
    for i, q in enumerate(questions):
        check_question(q, i)
        out.append((q, mc_prompt(q["question"], q["options"], answer_instruction)))
    return out


def _drop_common_suffix(labels: torch.Tensor, n_options: Sequence[int]) -> torch.Tensor:
    """Per question (consecutive rows, one per option), mask the response tokens all its options
    end with (the end-of-turn token), so each option is scored by its letter tokens only."""
    labels = labels.clone()
    start = 0
    for n in n_options:
        rows = range(start, start + n)
        positions = [(labels[r] != IGNORE_INDEX).nonzero().flatten() for r in rows]
        tokens = [labels[r, pos].tolist() for r, pos in zip(rows, positions)]
        common = 0
        shortest = min(len(t) for t in tokens)
        while common < shortest - 1 and len({tuple(t[len(t) - common - 1 :]) for t in tokens}) == 1:
            common += 1
        if common:
            for r, pos in zip(rows, positions):
                labels[r, pos[-common:]] = IGNORE_INDEX
        start += n
    return labels


@torch.no_grad()
def _mc_likelihood(model, processor, items, batch_size: int, device) -> list[int]:
    renderer = VITaskProcessor.wrap(processor)
    predictions: list[int] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        examples, n_options = [], []
        for q, prompt in chunk:
            image = load_image(q["image"], f" in question {s + len(n_options)}")
            n_options.append(len(q["options"]))
            examples += [renderer.chat_example(image, prompt, LETTERS[j]) for j in range(len(q["options"]))]
        batch = {k: v.to(device) for k, v in renderer.encode_examples(examples).items()}
        batch["labels"] = _drop_common_suffix(batch["labels"], n_options)
        for scores in response_logprobs(model, batch).cpu().split(n_options):
            predictions.append(int(scores.argmax()))
    return predictions


def mc_evaluate(
    model,
    processor,
    questions: Sequence[dict],
    *,
    method: str = "likelihood",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    answer_instruction: str = "Answer with the letter.",
) -> dict:
    """Accuracy on multiple-choice questions ``{image, question, options, answer}`` answered with a letter.

    The prompt is the question, one ``"A. option"`` line per option and ``answer_instruction``
    (:func:`mc_prompt`); no proxy is involved (real instructions).

    * ``"likelihood"``: every option letter is teacher-forced as the answer and scored by the
      summed log-probability of its tokens (the end-of-turn token all options share is left
      out); the best-scoring letter is the prediction. Never fails to answer.
    * ``"generate"``: greedy decoding, then the first stand-alone option letter of the text
      (:func:`parse_letter`); no letter = a parse failure, counted wrong.

    ``model`` is a :class:`VITaskModel`, a peft model or a plain VLM. Returns ``{"accuracy",
    "num_questions", "parse_failures", "parse_failure_rate", "predictions"}`` (option index or
    ``None`` per question), ``"answers"`` (the generated texts, ``"generate"`` only) and, when
    questions carry an ``"attribute"``, ``"by_attribute"``: ``{attribute: accuracy}``.
    """
    if method not in ("likelihood", "generate"):
        raise ValueError(f"method must be 'likelihood' or 'generate', got {method!r}")
    if not questions:
        raise ValueError("no questions to evaluate")
    items = _mc_examples(questions, answer_instruction)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    result: dict = {}
    try:
        if method == "likelihood":
            predictions: list[int | None] = _mc_likelihood(model, processor, items, batch_size, device)
        else:
            texts = generate_texts(
                model,
                processor,
                [q["image"] for q, _ in items],
                [p for _, p in items],
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )
            predictions = [parse_letter(t, len(q["options"])) for t, (q, _) in zip(texts, items)]
            result["answers"] = texts
    finally:
        model.train(was_training)
    correct = [p == q["answer"] for p, q in zip(predictions, questions)]
    failures = sum(p is None for p in predictions)
    result.update(
        accuracy=sum(correct) / len(questions),
        num_questions=len(questions),
        parse_failures=failures,
        parse_failure_rate=failures / len(questions),
        predictions=predictions,
    )
    if any("attribute" in q for q in questions):
        groups: dict[str, list[bool]] = defaultdict(list)
        for ok, q in zip(correct, questions):
            groups[str(q.get("attribute"))].append(ok)
        result["by_attribute"] = {k: sum(v) / len(v) for k, v in groups.items()}
    return result
