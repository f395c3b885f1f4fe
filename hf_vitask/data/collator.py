"""VITaskCollator: rows ``{image, label}`` to a VLM training batch with prompt tokens masked.

Prompts are rendered and tokenised by :class:`~hf_vitask.processing.VITaskProcessor` (trl's
vision-language collator underneath: prompt and completion tokenised separately, so the training
prompt is exactly the inference prompt); this module adds what VITask needs on top: the task's
instruction and response words, TSM pixel values, class ids,
contrastive negatives, and validation that names the offending row instead of failing at step
3,000 with a shape error.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from hf_vitask.data.images import load_image
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.processing import (
    VITaskProcessor,
    assistant_message,
    image_token_id_of,
    user_message,
    validate_batch,
)
from hf_vitask.task import TaskSpec


def sample_key(example: dict) -> str:
    """Digest of one example's images, prompt and completion: equal keys, equal model inputs."""
    digest = hashlib.blake2b(digest_size=16)
    for image in example["images"]:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    digest.update(json.dumps([example["prompt"], example["completion"]], sort_keys=True).encode())
    return digest.hexdigest()


def pick_negatives(class_ids: list[int], rng: random.Random, groups: list[int] | None = None) -> list[int]:
    """For each row, a random row of the batch with a different class (and the same task when
    ``groups`` gives each row's task), or -1 when there is none."""
    groups = groups if groups is not None else [0] * len(class_ids)
    out = []
    for i, (c, g) in enumerate(zip(class_ids, groups)):
        pool = [j for j, (d, h) in enumerate(zip(class_ids, groups)) if d != c and h == g and j != i]
        out.append(rng.choice(pool) if pool else -1)
    return out


@dataclass
class VITaskCollator:
    """Build ``input_ids, attention_mask, labels, pixel_values (+ family extras), tsm_pixel_values,
    class_ids`` (and ``crt_negative_index``) from rows holding an image and a label.

    ``labels`` is -100 on every prompt, image and padding token: only the response is learnt.
    With ``negatives_dataset`` set (stage 2, CRT), every row gets a negative: a row of the
    batch with another class, or, when the batch has none, an extra row drawn from the dataset
    and appended with all labels at -100 (it only lends its image).

    CRT negatives are chosen here and nowhere else, from one random stream per batch: a
    ``random.Random`` seeded with a digest of ``seed`` and the batch's rows, so the same rows get
    the same negatives after a resume and in any process (the trainer passes ``seed + process_index``).

    Several tasks: pass a list of TaskSpecs; each row then names its task index in
    ``task_column``, its label is a class of that task, and the batch carries ``task_ids``.
    """

    processor: Any
    task: TaskSpec | Sequence[TaskSpec]
    tsm: Any = None
    """TaskSpecificModel whose ``preprocess`` makes ``tsm_pixel_values``; None skips them."""
    complete_instruction: bool = True
    max_length: int | None = None
    """Longer rows raise an error naming them (never silently truncated)."""
    negatives_dataset: Any = None
    """Dataset that tops up CRT negatives; None disables the top-up."""
    with_negatives: bool = False
    """Emit ``crt_negative_index`` (in-batch negatives, topped up from ``negatives_dataset`` if set)."""
    return_images: bool = False
    """Also return the decoded PIL ``images`` of the batch rows (evaluation by option scoring)."""
    return_sample_keys: bool = False
    """Also return ``sample_keys``: a digest of each row's image and text (the frozen-teacher cache key)."""
    image_column: str = "image"
    label_column: str = "label"
    task_column: str = "task"
    seed: int = 0
    _by_class: dict | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer.pad_token_id is None:
            raise ValueError("The processor's tokenizer has no pad token; set tokenizer.pad_token first")
        self.tasks: list[TaskSpec] = [self.task] if isinstance(self.task, TaskSpec) else list(self.task)
        if not self.tasks:
            raise ValueError("The collator needs at least one TaskSpec")
        self.image_token_id = image_token_id_of(self.processor)
        self.vitask_processor = VITaskProcessor.wrap(self.processor)

    @property
    def multi_task(self) -> bool:
        return len(self.tasks) > 1

    # -- rows -> examples --------------------------------------------------------------------------
    def _row(self, row: dict, i: int, source: str = "") -> tuple[Image.Image, int, int]:
        where = f" in row {i}{source}" + (f" (id {row['id']!r})" if "id" in row else "")
        columns = [self.image_column, self.label_column] + ([self.task_column] if self.multi_task else [])
        for column in columns:
            if column not in row:
                raise KeyError(f"Row {i}{source} has no {column!r} column; columns: {sorted(row)}")
        task_id = int(row[self.task_column]) if self.multi_task else 0
        if not 0 <= task_id < len(self.tasks):
            raise ValueError(f"Task index {task_id}{where} is out of range for {len(self.tasks)} tasks")
        image = load_image(row[self.image_column], where)
        return image, self.tasks[task_id].check_label(row[self.label_column], where), task_id

    def _example(self, image: Image.Image, label: int, task_id: int) -> dict:
        task = self.tasks[task_id]
        return self.vitask_processor.chat_example(
            image, task.instruction(self.complete_instruction), task.response(label)
        )

    def _batch_rng(self, items) -> random.Random:
        """The random stream of one batch, a function of the seed and the batch's content: the same
        rows get the same negatives whenever (and in whichever process) they are collated, so a
        resumed run picks what an uninterrupted one picked."""
        digest = hashlib.blake2b(str(self.seed).encode(), digest_size=16)
        for image, label, task_id in items:
            digest.update(f"{label}:{task_id}:{image.size}".encode())
            digest.update(image.tobytes())
        return random.Random(digest.hexdigest())

    def _dataset_negative(self, label: int, task_id: int, rng: random.Random) -> tuple[Image.Image, int, int]:
        if self._by_class is None:
            by_class = defaultdict(list)
            ds = self.negatives_dataset
            task_ids = ds[self.task_column] if self.multi_task else [0] * len(ds)
            for idx, (lab, t) in enumerate(zip(ds[self.label_column], task_ids)):
                by_class[
                    (int(t), self.tasks[int(t)].check_label(lab, f" in row {idx} of the negatives dataset"))
                ].append(idx)
            self._by_class = dict(by_class)
        classes = [key for key in self._by_class if key[0] == task_id and key[1] != label]
        if not classes:
            raise ValueError(
                f"CRT needs at least two classes per task in the training data; task {self.tasks[task_id].name!r} has one"
            )
        idx = rng.choice(self._by_class[rng.choice(classes)])
        return self._row(self.negatives_dataset[idx], idx, " of the negatives dataset")

    # -- call ------------------------------------------------------------------------------------
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Empty batch: the dataset or sampler produced no rows")
        items = [self._row(row, i) for i, row in enumerate(rows)]
        n_real = len(items)
        negatives = None
        if self.negatives_dataset is not None or self.with_negatives:
            rng = self._batch_rng(items)
            negatives = pick_negatives([c for _, c, _ in items], rng, [t for _, _, t in items])
            if self.negatives_dataset is not None:
                for i in range(n_real):
                    if negatives[i] == -1:
                        items.append(self._dataset_negative(items[i][1], items[i][2], rng))
                        negatives[i] = len(items) - 1
                negatives += [-1] * (len(items) - n_real)
        examples = [self._example(*item) for item in items]
        keys = [sample_key(example) for example in examples] if self.return_sample_keys else None
        batch = self.vitask_processor.encode_examples(examples)
        batch["labels"][n_real:] = IGNORE_INDEX  # extra rows only lend their image to CRT
        self._validate(batch, n_real)
        batch["class_ids"] = torch.tensor([c for _, c, _ in items], dtype=torch.long)
        if self.multi_task:
            batch["task_ids"] = torch.tensor([t for _, _, t in items], dtype=torch.long)
        if self.tsm is not None:
            batch["tsm_pixel_values"] = self.tsm.preprocess([img for img, _, _ in items])
        if negatives is not None:
            batch["crt_negative_index"] = torch.tensor(negatives, dtype=torch.long)
        if self.return_images:
            batch["images"] = [img for img, _, _ in items[:n_real]]
        if self.return_sample_keys:
            batch["sample_keys"] = keys
        return dict(batch)

    def _validate(self, batch, n_real: int) -> None:
        validate_batch(batch, self.image_token_id, self.max_length, n_real, "answer")


def build_prompts(processor, task: TaskSpec, images: list, complete: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (image + the task's instruction + generation prompt) for generation."""
    return generation_prompts(processor, images, [task.instruction(complete) for _ in images])


def generation_prompts(processor, images: list, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch: each image with its own instruction (:meth:`VITaskProcessor.encode_prompts`)."""
    return VITaskProcessor.wrap(processor).encode_prompts(images, instructions)


__all__ = [
    "VITaskCollator",
    "assistant_message",
    "build_prompts",
    "generation_prompts",
    "image_token_id_of",
    "load_image",
    "pick_negatives",
    "user_message",
]
