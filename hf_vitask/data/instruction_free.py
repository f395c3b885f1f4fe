"""Data side of instruction-free tuning: rows ``{image, description}`` with no instruction text.

* :class:`InstructionFreeCollator` renders the user turn as the image followed by ``K`` *slot
  tokens* (where an instruction would go; the trainer writes the learnt proxy vectors there)
  or, for the fixed-instruction baseline, by a constant text. The assistant turn is the
  description, whose segments are randomly permuted each time a row is seen (*response
  shuffling*). Tokenisation and masking are trl's VLM collator, as in
  :class:`~hf_vitask.VITaskCollator`: labels are -100 on the prompt, the slots and padding.
* Multiple-choice evaluation helpers: :func:`mc_prompt` and :func:`parse_letter`.
* A demo task on the bundled digits: :func:`digit_descriptions` ("value: seven, parity: odd,
  stroke: thick"), :func:`add_digit_descriptions` and :func:`make_mc_questions` (held-out
  question wordings about the same attributes).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_vitask.data.collator import (
    assistant_message,
    image_token_id_of,
    load_image,
    user_message,
    validate_batch,
)
from hf_vitask.data.sources import DIGIT_NAMES
from hf_vitask.data.vlm_collator import VLMCollator
from hf_vitask.losses import IGNORE_INDEX

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
        raise ValueError(f"The proxy slot token {token!r} tokenizes to {len(ids)} tokens; it must be exactly one")
    return token, int(ids[0])


def find_proxy_slots(
    input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, slot_token_id: int, num_slots: int
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
    """Shuffle responses; the trainer sets it to False while evaluating."""
    batch_index: int = 0
    """Batches collated so far in training (the shuffling stream position)."""
    _trl: Any = field(init=False, repr=False, default=None)

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
        self._trl = VLMCollator(self.processor, completion_only_loss=True)

    @property
    def prompt_text(self) -> str:
        """The user text after the image: the slot placeholder or the fixed instruction."""
        return self.slot_token * self.num_proxy_tokens if self.use_proxy else self.instruction_text

    def _rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        key = f"{self.seed}:{self.batch_index}" if info is None else f"{self.seed}:{info.seed}:{self.batch_index}"
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
                (img, shuffle_segments(text, self.shuffle_separator, rng, self.shuffle_prob)) for img, text in pairs
            ]
        examples = [
            {"images": [img], "prompt": user_message(self.prompt_text), "completion": assistant_message(text)}
            for img, text in pairs
        ]
        batch = dict(self._trl.torch_call(examples))
        self._validate(batch)
        if self.use_proxy:
            batch[PROXY_SLOT_MASK] = find_proxy_slots(
                batch["input_ids"], batch["labels"], batch["attention_mask"], self.slot_token_id, self.num_proxy_tokens
            )
        return batch

    def _validate(self, batch) -> None:
        validate_batch(batch, self.image_token_id, self.max_length, target="description")


# -- multiple-choice questions -----------------------------------------------------------------------

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


# -- the digits demo: attribute descriptions and held-out questions -------------------------------------

DIGIT_ATTRIBUTES = ("value", "parity", "stroke")

#: Held-out question wordings, never shown in training (which has no instruction text at all).
DIGIT_QUESTION_WORDINGS: dict[str, tuple[str, ...]] = {
    "value": (
        "Which digit is written in this image?",
        "What number does the handwritten character show?",
        "Read the numeral in the picture. Which one is it?",
    ),
    "parity": (
        "Is the number in this image odd or even?",
        "What is the parity of the handwritten digit?",
    ),
    "stroke": (
        "Is the pen stroke of this digit thick or thin?",
        "How heavy is the handwriting in this image?",
    ),
}


def stroke_intensity(image) -> float:
    """Mean grey level of the image in [0, 1]: more ink (white strokes on black) = thicker strokes."""
    img = load_image(image, "").convert("L")
    data = img.tobytes()
    return sum(data) / (255.0 * len(data))


@functools.lru_cache(maxsize=8)
def digits_stroke_threshold(image_size: int = 32) -> float:
    """Median :func:`stroke_intensity` of all 1,797 bundled digits rendered at ``image_size`` pixels,
    as :func:`~hf_vitask.data.sources.load_digits_dataset` renders them (computed once, cached)."""
    import statistics

    from sklearn.datasets import load_digits

    from hf_vitask.data.sources import _to_image

    images = load_digits().images
    return float(statistics.median(stroke_intensity(_to_image(px, image_size)) for px in images))


def digit_attributes(label: int, image, threshold: float | None = None) -> dict[str, str]:
    """``{"value": "seven", "parity": "odd", "stroke": "thick"|"thin"}`` for a bundled digit.

    Stroke is "thick" when the image's mean grey level is above ``threshold`` (default: the
    median over all bundled digits at this image size, :func:`digits_stroke_threshold`), so the
    two stroke classes are balanced over the whole set.
    """
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"a digit label is 0..9, got {label}")
    img = load_image(image, "")
    if threshold is None:
        threshold = digits_stroke_threshold(img.width)
    return {
        "value": DIGIT_NAMES[label],
        "parity": "even" if label % 2 == 0 else "odd",
        "stroke": "thick" if stroke_intensity(img) > threshold else "thin",
    }


def digit_descriptions(label: int, image, threshold: float | None = None, separator: str = ", ") -> str:
    """The description of a digit: ``"value: seven, parity: odd, stroke: thick"``
    (attributes as in :func:`digit_attributes`, joined by ``separator``)."""
    attrs = digit_attributes(label, image, threshold)
    return separator.join(f"{k}: {attrs[k]}" for k in DIGIT_ATTRIBUTES)


def add_digit_descriptions(data, threshold: float | None = None, *, label_column: str = "label",
                           image_column: str = "image", description_column: str = "description"):
    """Add a ``description`` column (:func:`digit_descriptions`) to a digits ``Dataset`` or ``DatasetDict``.
    The same threshold serves every split."""
    def describe(row):
        return {description_column: digit_descriptions(row[label_column], row[image_column], threshold)}

    return data.map(describe)


def make_mc_questions(
    dataset,
    seed: int = 0,
    *,
    attributes: Sequence[str] = DIGIT_ATTRIBUTES,
    wordings: dict[str, Sequence[str]] | None = None,
    num_value_options: int = 4,
    threshold: float | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> list[dict]:
    """Multiple-choice questions about the bundled digits, one per (row, attribute).

    Each question is ``{"image", "question", "options", "answer", "attribute", "wording"}``:
    the wording is drawn from ``wordings[attribute]`` (default :data:`DIGIT_QUESTION_WORDINGS`,
    phrasings never used in training), ``options`` are the attribute's values in the words of
    the descriptions ("seven"; "odd"/"even"; "thick"/"thin"), shuffled, with ``num_value_options``
    digit names (the true one and random others) for ``value``; ``answer`` indexes ``options``.
    Seeded: the same ``seed`` gives the same questions.
    """
    wordings = dict(DIGIT_QUESTION_WORDINGS if wordings is None else wordings)
    unknown = [a for a in attributes if a not in DIGIT_ATTRIBUTES or a not in wordings]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; known: {list(DIGIT_ATTRIBUTES)} (with wordings)")
    if not 2 <= num_value_options <= 10:
        raise ValueError(f"num_value_options must be in [2, 10], got {num_value_options}")
    rng = random.Random(seed)
    questions = []
    for i in range(len(dataset)):
        row = dataset[i]
        image = load_image(row[image_column], f" in row {i}")
        truth = digit_attributes(row[label_column], image, threshold)
        for attr in attributes:
            if attr == "value":
                others = [n for n in DIGIT_NAMES if n != truth["value"]]
                options = [truth["value"], *rng.sample(others, num_value_options - 1)]
            elif attr == "parity":
                options = ["odd", "even"]
            else:
                options = ["thick", "thin"]
            rng.shuffle(options)
            wording = rng.randrange(len(wordings[attr]))
            questions.append({
                "image": image,
                "question": wordings[attr][wording],
                "options": options,
                "answer": options.index(truth[attr]),
                "attribute": attr,
                "wording": wording,
            })
    return questions


__all__ = [
    "DIGIT_ATTRIBUTES",
    "DIGIT_QUESTION_WORDINGS",
    "InstructionFreeCollator",
    "LETTERS",
    "PROXY_SLOT_MASK",
    "add_digit_descriptions",
    "check_question",
    "digit_attributes",
    "digit_descriptions",
    "digits_stroke_threshold",
    "find_proxy_slots",
    "make_mc_questions",
    "mc_prompt",
    "parse_letter",
    "shuffle_segments",
    "slot_token_of",
    "stroke_intensity",
]
