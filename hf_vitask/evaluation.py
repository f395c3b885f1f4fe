"""Turning a trained VLM into class predictions: option log-likelihood scoring and generate-then-parse.

Scoring teacher-forces every class's response after the prompt and sums its token
log-probabilities: one number per class, so there is always an answer and there are
per-class scores for AUC. Generation answers freely and the text is mapped back to a class
with :meth:`TaskSpec.parse`; answers naming no class count as parse failures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_vitask.data.collator import VITaskCollator, build_prompts
from hf_vitask.losses import response_row_ids, token_ce
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.task import TaskSpec


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
) -> torch.Tensor:
    """Log-likelihood of each class's response for each image: a ``(N, num_classes)`` tensor."""
    _check_tsm(model, use_tsm)
    collator = VITaskCollator(
        processor, task, tsm=model.tsm if use_tsm else None, complete_instruction=complete_instruction
    )
    was_training = model.training
    model.eval()
    scores = []
    try:
        for chunk in _batches(list(images), batch_size):
            rows = [{"image": img, "label": c} for img in chunk for c in range(task.num_classes)]
            batch = {k: v.to(model.device) for k, v in collator(rows).items()}
            batch.pop("class_ids")
            out = model(**batch)
            token_logp = -token_ce(out.response_logits, out.response_targets)
            per_row = torch.zeros(len(rows), device=token_logp.device).index_add_(
                0, response_row_ids(batch["labels"]), token_logp
            )
            scores.append(per_row.view(len(chunk), task.num_classes).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


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
        for chunk in _batches(list(images), batch_size):
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
) -> list[int | None]:
    """Class id per image (``None`` when a generated answer names no class)."""
    if method == "likelihood":
        scores = score_options(
            model, processor, task, images, use_tsm=use_tsm, complete_instruction=complete_instruction,
            batch_size=batch_size,
        )
        return scores.argmax(-1).tolist()
    if method == "generate":
        texts = generate_answers(
            model, processor, task, images, use_tsm=use_tsm, complete_instruction=complete_instruction,
            batch_size=batch_size,
        )
        return [task.parse(t) for t in texts]
    raise ValueError(f"method must be 'likelihood' or 'generate', got {method!r}")
