"""Data side of instruction-free tuning: rows ``{image, description}`` with no instruction text.

* :class:`InstructionFreeCollator` renders the user turn as the image followed by ``K`` *slot
  tokens* (where an instruction would go; the trainer writes the learnt proxy vectors there)
  or, for the fixed-instruction baseline, by a constant text. The assistant turn is the
  description, whose segments are randomly permuted each time a row is seen (*response
  shuffling*). Tokenisation and masking are trl's VLM collator, as in
  :class:`~hf_vitask.VITaskCollator`: labels are -100 on the prompt, the slots and padding.

Multiple-choice evaluation lives in :mod:`hf_vitask.evaluation`, the digits demo task in
:mod:`hf_vitask.data.digits`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_vitask.data.images import load_image
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.processing import VITaskProcessor, image_token_id_of, validate_batch

PROXY_SLOT_MASK = "proxy_slot_mask"
"""Batch key of the ``(B, L)`` boolean mask of the proxy slots."""


# -- response shuffling ----------------------------------------------------------------------------


def shuffle_segments(text: str, separator: str, rng: random.Random, prob: float = 1.0) -> str:
    """Split ``text`` at ``separator`` and permute the segments with probability ``prob``.

    One ``rng.random()`` draw decides whether to shuffle, whatever the text, so the random
    stream does not depend on the data. A closing mark equal to the separator's non-blank
    part (the final ``"."`` of ``"A. B. C."`` with separator ``". "``) is kept at the end of
    the text instead of travelling with the last segment. A permutation may be the identity.
    """
    if not separator:
        raise ValueError("the shuffle separator must not be empty")
    draw = rng.random()
    if draw >= prob:
        return text
    end = separator.strip()
    tail = end if end and text.endswith(end) and not text.endswith(separator) else ""
    body = text[: len(text) - len(tail)]
    parts = body.split(separator)
    if len(parts) < 2:
        return text
    rng.shuffle(parts)
    return separator.join(parts) + tail


# -- proxy slots -----------------------------------------------------------------------------------


def slot_token_of(processor, slot_token: str | None = None) -> tuple[str, int]:
    """The placeholder token of the proxy slots and its id: ``slot_token`` or the pad token.

    The token must be a single entry of the vocabulary (an added/special token is best: it
    never merges with neighbouring text); its embedding is overwritten, so which one it is does
    not matter to the model.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    token = slot_token if slot_token is not None else tokenizer.pad_token
    if token is None:
        raise ValueError("The tokenizer has no pad token to use as proxy slot; set proxy_slot_token")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"The proxy slot token {token!r} tokenizes to {len(ids)} tokens; it must be exactly one"
        )
    return token, int(ids[0])


def find_proxy_slots(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    slot_token_id: int,
    num_slots: int,
) -> torch.Tensor:
    """``(B, L)`` mask of the proxy slots: ``slot_token_id`` on attended prompt positions.

    Checks that every row holds exactly ``num_slots`` of them, consecutive, and names the rows
    that do not (the chat template dropped or split the placeholder, or the prompt text itself
    contains the slot token).
    """
    mask = (input_ids == slot_token_id) & (attention_mask == 1) & (labels == IGNORE_INDEX)
    counts = mask.sum(1)
    bad = (counts != num_slots).nonzero().flatten().tolist()
    if not bad and num_slots > 1:
        first = mask.int().argmax(1)
        span = mask.shape[1] - 1 - mask.flip(1).int().argmax(1) - first + 1
        bad = (span != num_slots).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"Rows {bad} do not hold {num_slots} consecutive proxy slot tokens (id {slot_token_id}) in the prompt "
            f"(found {counts[bad].tolist()}): choose a proxy_slot_token that the chat template keeps and the "
            "prompt does not otherwise contain"
        )
    return mask


# -- collator --------------------------------------------------------------------------------------


@dataclass
class InstructionFreeCollator:
    """Rows ``{image, description}`` -> ``input_ids, attention_mask, labels, pixel_values`` (+ family
    extras) and, with the proxy, ``proxy_slot_mask``.

    User turn: the image, then ``num_proxy_tokens`` slot tokens (``use_proxy=True``) or
    ``instruction_text`` (the fixed-instruction baseline; ``""`` is no instruction at all).
    Assistant turn: the description, response-shuffled (:func:`shuffle_segments`) while
    ``training`` is True. Only the description (and the end-of-turn token) is learnt.

    Shuffling is reproducible: batch ``n`` (counted from the start of training) is shuffled by
    ``random.Random(f"{seed}:{n}")``, so a run resumed from a checkpoint (which sets
    :attr:`batch_index`) permutes exactly as the uninterrupted run. In dataloader worker
    processes the worker's torch seed is mixed in (a new permutation every epoch, reproducible
    for a given ``TrainingArguments.seed``).
    """

    processor: Any
    use_proxy: bool = True
    num_proxy_tokens: int = 8
    instruction_text: str = ""
    """User text of the fixed-instruction baseline (``use_proxy=False``)."""
    slot_token: str | None = None
    """Placeholder token of the proxy slots (default: the tokenizer's pad token)."""
    shuffle_prob: float = 1.0
    shuffle_separator: str = ", "
    max_length: int | None = None
    """Longer rows raise an error naming them (never silently truncated)."""
    image_column: str = "image"
    description_column: str = "description"
    seed: int = 0
    training: bool = True
    """Shuffle responses (the trainer evaluates with a copy that has False)."""
    batch_index: int = 0
    """Where the shuffling stream starts (the trainer starts a resumed run at its first untrained
    batch); counts up as batches are collated."""
    vitask_processor: Any = field(init=False, repr=False, default=None)
    """Renders and tokenises the examples (:class:`~hf_vitask.processing.VITaskProcessor`)."""

    def __post_init__(self):
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer.pad_token_id is None:
            raise ValueError("The processor's tokenizer has no pad token; set tokenizer.pad_token first")
        if not 0 <= self.shuffle_prob <= 1:
            raise ValueError(f"shuffle_prob must be in [0, 1], got {self.shuffle_prob}")
        if not self.shuffle_separator:
            raise ValueError("shuffle_separator must not be empty")
        if self.image_column == self.description_column:
            raise ValueError(f"image_column and description_column are both {self.image_column!r}")
        if self.use_proxy:
            if self.num_proxy_tokens < 1:
                raise ValueError(f"num_proxy_tokens must be >= 1 with the proxy, got {self.num_proxy_tokens}")
            self.slot_token, self.slot_token_id = slot_token_of(self.processor, self.slot_token)
        else:
            self.slot_token_id = None
        self.image_token_id = image_token_id_of(self.processor)
        self.vitask_processor = VITaskProcessor.wrap(self.processor)

    @property
    def prompt_text(self) -> str:
        """The user text after the image: the slot placeholder or the fixed instruction."""
        return self.slot_token * self.num_proxy_tokens if self.use_proxy else self.instruction_text

    def _rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        key = (
            f"{self.seed}:{self.batch_index}"
            if info is None
            else f"{self.seed}:{info.seed}:{self.batch_index}"
        )
        self.batch_index += 1
        return random.Random(key)

    def _row(self, row: dict, i: int) -> tuple:
        where = f" in row {i}" + (f" (id {row['id']!r})" if "id" in row else "")
        for column in (self.image_column, self.description_column):
            if column not in row:
                raise KeyError(f"Row {i} has no {column!r} column; columns: {sorted(row)}")
        description = row[self.description_column]
        if not isinstance(description, str) or not description.strip():
            raise ValueError(f"Empty or non-text description{where}: {description!r}")
        return load_image(row[self.image_column], where), description

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Empty batch: the dataset or sampler produced no rows")
        pairs = [self._row(row, i) for i, row in enumerate(rows)]
        if self.training:
            rng = self._rng()
            pairs = [
                (img, shuffle_segments(text, self.shuffle_separator, rng, self.shuffle_prob))
                for img, text in pairs
            ]
        examples = [self.vitask_processor.chat_example(img, self.prompt_text, text) for img, text in pairs]
        batch = dict(self.vitask_processor.encode_examples(examples))
        self._validate(batch)
        if self.use_proxy:
            batch[PROXY_SLOT_MASK] = find_proxy_slots(
                batch["input_ids"],
                batch["labels"],
                batch["attention_mask"],
                self.slot_token_id,
                self.num_proxy_tokens,
            )
        return batch

    def _validate(self, batch) -> None:
        validate_batch(batch, self.image_token_id, self.max_length, target="description")


# -- multiple-choice questions -----------------------------------------------------------------------

__all__ = [
    "InstructionFreeCollator",
    "PROXY_SLOT_MASK",
    "find_proxy_slots",
    "shuffle_segments",
    "slot_token_of",
]
