"""VITaskProcessor: one object that turns images (and answers) into model inputs, for training and inference.

Predicting with a bundle needs four things that live in different places: the task's words
(:class:`~hf_vitask.task.TaskSpec`), the VLM's processor and chat template, the chat layout of the
collator, and the TSM's image transform (the exemplar's pixels). :class:`VITaskProcessor` holds
them together and is the one place prompts are rendered: the training collators, option scoring,
generation and multiple-choice evaluation all go through it. It is saved in every bundle as ``vitask_processor.json`` next to the VLM processor files and ``task.json``.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

from hf_vitask.data.images import load_image
from hf_vitask.data.vlm_collator import VLMCollator
from hf_vitask.files import TSM_CONFIG_FILE, TSM_DIR, VITASK_CONFIG_FILE, VITASK_PROCESSOR_FILE
from hf_vitask.jsonfile import read_json
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.task import TaskSpec, load_tasks, save_tasks
from hf_vitask.version import __version__

__all__ = [
    "TSMTransform",
    "VITaskProcessor",
    "assistant_message",
    "image_token_id_of",
    "user_message",
    "validate_batch",
]

INSTRUCTIONS = ("complete", "incomplete")


def user_message(instruction: str) -> list[dict]:
    """The user turn of every prompt: the image, then the instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def assistant_message(text: str) -> list[dict]:
    """The assistant turn: the response the model learns (or is scored on)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def validate_batch(
    batch,
    image_token_id: int | None,
    max_length: int | None,
    n_real: int | None = None,
    target: str = "answer",
) -> None:
    """Fail naming the rows: no image token after the chat template, nothing to learn (among the
    first ``n_real`` rows), or longer than ``max_length`` (rows are never silently truncated)."""
    ids = batch["input_ids"]
    if image_token_id is not None:
        no_image = (~(ids == image_token_id).any(1)).nonzero().flatten().tolist()
        if no_image:
            raise ValueError(
                f"Rows {no_image} have no image token after the chat template: the processor's chat template "
                "must render {'type': 'image'} content as the image placeholder"
            )
    labels = batch["labels"] if n_real is None else batch["labels"][:n_real]
    no_target = (~(labels != IGNORE_INDEX).any(1)).nonzero().flatten().tolist()
    if no_target:
        raise ValueError(f"Rows {no_target} have no response token to learn from (empty {target}?)")
    if max_length is not None:
        lengths = batch["attention_mask"].sum(1)
        too_long = (lengths > max_length).nonzero().flatten().tolist()
        if too_long:
            raise ValueError(
                f"Rows {too_long} are {lengths[too_long].tolist()} tokens long, over max_length={max_length}. "
                f"Raise max_length (truncating would cut the {target} or image tokens)."
            )


def image_token_id_of(processor) -> int | None:
    """The id of the token the processor expands into one token per image feature.

    transformers' ``image_token_ids`` names it; ``image_token_id`` alone may be the token that opens
    an image block instead (Gemma 3's ``<start_of_image>``)."""
    ids = getattr(processor, "image_token_ids", None)
    if ids and ids[0] is not None:
        return int(ids[0])
    token_id = getattr(processor, "image_token_id", None)
    token = getattr(processor, "image_token", None)
    if token_id is None and token is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return token_id


class TSMTransform:
    """The TSM's inference preprocessing (what ``TaskSpecificModel.preprocess`` does), rebuilt from a
    small dict so that a bundle can make ``tsm_pixel_values`` without loading the TSM's weights.

    ``backend="timm"``: timm's eval transform from the model's ``data_config``;
    ``backend="transformers"``: the classifier's own image processor (its ``to_dict()``).
    """

    def __init__(self, backend: str, config: dict):
        if backend not in ("timm", "transformers"):
            raise ValueError(f"Unknown TSM transform backend {backend!r}; expected 'timm' or 'transformers'")
        self.backend, self.config = backend, dict(config)
        if backend == "timm":
            import timm

            data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.items()}
            self._transform = timm.data.create_transform(**data_config, is_training=False)
        else:
            import transformers

            kind = self.config.get("image_processor_type")
            cls = getattr(transformers, str(kind), None)
            if cls is None:
                raise ValueError(f"TSM transform: unknown image_processor_type {kind!r}")
            self._transform = cls.from_dict(self.config)

    @classmethod
    def from_tsm(cls, tsm) -> TSMTransform:
        image_processor = getattr(tsm, "image_processor", None)
        if image_processor is not None:  # a TransformersTSM
            return cls("transformers", image_processor.to_dict())
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in tsm.data_config.items()}
        return cls("timm", config)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict) -> TSMTransform:
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError(
                f"A TSM transform must be {{'backend': ..., 'config': {{...}}}}, got {data!r:.120}"
            )
        return cls(data.get("backend"), data["config"])

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.backend == "transformers":
            return self._transform(images=list(images), return_tensors="pt")["pixel_values"]
        return torch.stack([self._transform(image) for image in images])

    def __eq__(self, other) -> bool:
        return isinstance(other, TSMTransform) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"TSMTransform(backend={self.backend!r})"


class VITaskProcessor:
    """The VLM's processor, the task(s) and the TSM transform, as one processor.

    ``processor(images=..., instruction="complete")`` gives the left-padded generation prompt
    (``input_ids``, ``attention_mask``, ``pixel_values`` and the family's extras, plus
    ``tsm_pixel_values`` when a TSM transform is set) ready for ``model.generate(**inputs)``;
    with ``responses=`` it gives the training layout instead (right padding, ``labels`` at -100
    outside the response), built by the same collator as :class:`~hf_vitask.VITaskCollator`.
    :meth:`parse` maps a generated answer back to a class id.

    Everything else is the VLM's processor: unknown attributes (``apply_chat_template``,
    ``image_token``, ...) are looked up on it, a call with ``text=`` is its own call, and the family
    registry looks through it (``vlm_processor``), so a VITaskProcessor goes wherever the VLM's
    processor went.

    Args:
        processor: the VLM's processor (``AutoProcessor.from_pretrained(...)``).
        task: a TaskSpec, a list of them (multi-task), or None (free-form instructions only).
        tsm_transform: a :class:`TSMTransform`, or a TSM (``TaskSpecificModel``) to take it from.
    """

    def __init__(self, processor, task: TaskSpec | Sequence[TaskSpec] | None = None, tsm_transform=None):
        if processor is None:
            raise ValueError("VITaskProcessor needs the VLM's processor")
        if isinstance(processor, VITaskProcessor):
            processor = processor.processor
        self.processor = processor
        if task is None:
            self.tasks: list[TaskSpec] = []
        else:
            self.tasks = [task] if isinstance(task, TaskSpec) else list(task)
            for i, t in enumerate(self.tasks):
                if not isinstance(t, TaskSpec):
                    raise TypeError(f"task {i} is a {type(t).__name__}, not a TaskSpec")
        if tsm_transform is not None and not isinstance(tsm_transform, TSMTransform):
            tsm_transform = TSMTransform.from_tsm(tsm_transform)
        self.tsm_transform: TSMTransform | None = tsm_transform

    # -- the inner processor's contract ----------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("processor", "tasks", "tsm_transform"):
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __reduce__(self):  # rebuilt from its parts (attribute lookups fall through to the processor)
        return (VITaskProcessor, (self.processor, self.tasks or None, self.tsm_transform))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def vlm_processor(self):
        """The VLM's processor this one holds (what the family registry looks at)."""
        return self.processor

    @property
    def task(self) -> TaskSpec | list[TaskSpec] | None:
        """The TaskSpec (a list of them for several tasks, None for none), as ``load_vitask`` gives it."""
        if not self.tasks:
            return None
        return self.tasks[0] if len(self.tasks) == 1 else list(self.tasks)

    def batch_decode(self, *args, **kwargs):
        return self.processor.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.processor.decode(*args, **kwargs)

    def __repr__(self) -> str:
        names = [t.name for t in self.tasks]
        return (
            f"VITaskProcessor(processor={type(self.processor).__name__}, tasks={names}, "
            f"tsm_transform={self.tsm_transform!r})"
        )

    # -- inputs ------------------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        *,
        instruction: str | Sequence[str] = "complete",
        responses=None,
        task: int | Sequence[int] = 0,
        raw_responses: bool = False,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Model inputs for ``images`` (one image or a list: PIL, paths or ``{"path", "bytes"}`` dicts).

        Args:
            text: pass-through to the VLM's processor (the call then is exactly its own call).
            instruction: ``"complete"`` (the task's instruction listing the options), ``"incomplete"``
                (without them), or the instruction text itself; one for all images or one per image.
            responses: None for the generation prompt; otherwise one answer per image: a class id or
                class name (rendered with the task's response template), or with ``raw_responses=True``
                the answer text itself.
            task: the task index (one for all images or one per image) in a multi-task processor.
            max_length: training rows longer than this raise an error naming them.
        """
        if text is not None:
            return self.processor(images=images, text=text, **kwargs)
        if kwargs:
            raise TypeError(
                f"VITaskProcessor got unexpected arguments {sorted(kwargs)}; the VLM processor's own "
                "arguments go with text=..."
            )
        if images is None:
            raise ValueError("VITaskProcessor needs images=... (one image or a list of them)")
        if isinstance(images, (Image.Image, str, PathLike, dict)):
            images = [images]
        images = [load_image(image, f" at index {i}") for i, image in enumerate(images)]
        if not images:
            raise ValueError("VITaskProcessor got an empty list of images")
        n = len(images)
        task_ids = self._per_item(task, n, "task")
        instructions = [
            self._instruction(given, tid, i)
            for i, (given, tid) in enumerate(zip(self._per_item(instruction, n, "instruction"), task_ids))
        ]
        if responses is None:
            batch = self.encode_prompts(images, instructions)
        else:
            if isinstance(responses, (str, int)):
                responses = [responses]
            responses = list(responses)
            if len(responses) != n:
                raise ValueError(
                    f"Got {n} images but {len(responses)} responses: give one response per image"
                )
            answers = [
                self._response(r, tid, i, raw_responses)
                for i, (r, tid) in enumerate(zip(responses, task_ids))
            ]
            examples = [self.chat_example(*item) for item in zip(images, instructions, answers)]
            batch = self.encode_examples(examples)
            validate_batch(batch, image_token_id_of(self.processor), max_length, target="response")
        batch = BatchFeature(dict(batch))
        if self.tsm_transform is not None:
            batch["tsm_pixel_values"] = self.tsm_transform(images)
        return batch

    # -- the one place prompts are rendered ---------------------------------------------------------------
    # The collators (training, instruction-free), option scoring, generation and multiple-choice
    # evaluation all render through these four methods, so a training prompt is exactly the prompt
    # the model is evaluated and served with. A subclass that changes the chat layout changes it
    # everywhere at once.
    def prompt_messages(self, instruction: str) -> list[dict]:
        """The chat turns before the answer: the user turn with the image, then the instruction."""
        return user_message(instruction)

    def response_messages(self, text: str) -> list[dict]:
        """The chat turns that make up the answer."""
        return assistant_message(text)

    def chat_example(self, image: Image.Image, instruction: str, response: str) -> dict:
        """One conversational example in trl's ``{"images", "prompt", "completion"}`` layout."""
        return {
            "images": [image],
            "prompt": self.prompt_messages(instruction),
            "completion": self.response_messages(response),
        }

    def encode_examples(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The training layout of :meth:`chat_example` rows: right-padded, ``labels`` at -100 outside
        the completion (prompt and completion tokenised apart, so the prompt is the inference prompt)."""
        return self._collator.torch_call(list(examples))

    def encode_prompts(self, images: Sequence, instructions: Sequence[str]) -> BatchFeature:
        """The generation layout: each image with its own instruction and the generation prompt,
        left-padded for ``model.generate``."""
        texts = [
            self.processor.apply_chat_template(
                self.prompt_messages(text), add_generation_prompt=True, tokenize=False
            )
            for text in instructions
        ]
        images = [[load_image(img, f" at index {i}")] for i, img in enumerate(images)]
        return self.processor(
            images=images,
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
        )

    @classmethod
    def wrap(cls, processor) -> VITaskProcessor:
        """``processor`` itself when it is a VITaskProcessor, otherwise one holding it (no task, no TSM
        transform): what the collators and the evaluation functions render with."""
        return processor if isinstance(processor, VITaskProcessor) else cls(processor)

    @functools.cached_property
    def _collator(self) -> VLMCollator:
        """trl's vision-language collator taught the family quirks (it tokenises the training layout)."""
        return VLMCollator(self.processor, completion_only_loss=True)

    @staticmethod
    def _per_item(value, n: int, what: str) -> list:
        if isinstance(value, (str, int)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"Got {n} images but {len(value)} values of {what}: give one, or one per image")
        return value

    def _task(self, index, where: str) -> TaskSpec:
        if not self.tasks:
            raise ValueError(
                f"This processor has no task{where}: pass the instruction text and raw_responses=True, "
                "or build it with task=TaskSpec(...)"
            )
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.tasks):
            raise ValueError(f"Task index {index!r}{where} is out of range for {len(self.tasks)} task(s)")
        return self.tasks[index]

    def _instruction(self, text, task_id, i: int) -> str:
        where = f" at index {i}"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"instruction{where} must be 'complete', 'incomplete' or the instruction text, got {text!r}"
            )
        if text in INSTRUCTIONS:
            return self._task(task_id, where).instruction(text == "complete")
        return text

    def _response(self, response, task_id, i: int, raw: bool) -> str:
        where = f" at index {i}"
        if raw or not self.tasks:
            if not isinstance(response, str) or not response.strip():
                raise ValueError(f"Response{where} must be a non-empty answer text, got {response!r}")
            return response
        task = self._task(task_id, where)
        return task.response(task.check_label(response, where))

    def parse(self, text: str | Sequence[str], task: int = 0):
        """A generated answer (or a list of them) back to the class id it names, or None."""
        spec = self._task(task, "")
        if isinstance(text, str):
            return spec.parse(text)
        return [spec.parse(t) for t in text]

    # -- persistence ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """What ``vitask_processor.json`` holds; the VLM processor and the tasks have their own files."""
        return {
            "vitask_processor_class": type(self).__name__,
            "processor_class": type(self.processor).__name__,
            "tsm_transform": None if self.tsm_transform is None else self.tsm_transform.to_dict(),
            "hf_vitask_version": __version__,
        }

    def save_config(self, save_directory: str | PathLike) -> None:
        """Write ``vitask_processor.json`` only (a bundle writer that saved the processor and task already)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / VITASK_PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def save_pretrained(self, save_directory: str | PathLike, **kwargs) -> None:
        """The VLM processor's files, ``task.json`` / ``tasks.json`` and ``vitask_processor.json``."""
        self.processor.save_pretrained(str(save_directory), **kwargs)
        if self.tasks:
            save_tasks(self.tasks, save_directory)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> VITaskProcessor:
        """Restore a processor from a bundle directory or a Hub repo id (resolved as ``load_vitask`` does).

        A bundle saved before ``vitask_processor.json`` existed still loads: the TSM transform is then
        taken from ``tsm/`` when the bundle has a TSM.
        """
        from transformers import AutoProcessor

        from hf_vitask.files import resolve_bundle

        bundle = resolve_bundle(path, revision, token)
        try:
            processor = AutoProcessor.from_pretrained(str(bundle), **kwargs)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(
                f"Cannot load the processor saved in {bundle} (tokenizer / processor files missing or "
                f"damaged: {' '.join(str(err).split())[:300]})"
            ) from err
        config_file = bundle / VITASK_PROCESSOR_FILE
        transform = None
        if config_file.is_file():
            data = read_json(config_file)
            saved = data.get("vitask_processor_class", "VITaskProcessor")
            if saved != cls.__name__:
                warnings.warn(
                    f"{bundle} was saved by {saved}, a VITaskProcessor with its own chat layout, and is loaded "
                    f"as {cls.__name__}: load it with {saved}.from_pretrained(...) to render prompts as in training",
                    stacklevel=2,
                )
            if data.get("tsm_transform") is not None:
                transform = TSMTransform.from_dict(data["tsm_transform"])
        elif (bundle / TSM_DIR / TSM_CONFIG_FILE).is_file() and _has_connector(bundle):
            from hf_vitask.models.tsm import TaskSpecificModel

            transform = TSMTransform.from_tsm(TaskSpecificModel.from_pretrained(bundle / TSM_DIR))
        return cls(processor, load_tasks(bundle), transform)


def _has_connector(bundle: Path) -> bool:
    config = bundle / VITASK_CONFIG_FILE
    return config.is_file() and bool(read_json(config).get("connector"))
