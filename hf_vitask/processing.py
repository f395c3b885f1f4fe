"""VITaskProcessor: one object that turns images (and answers) into model inputs, for training and inference.

Predicting with a bundle needs four things that live in different places: the task's words
(:class:`~hf_vitask.task.TaskSpec`), the VLM's processor and chat template, the chat layout of the
collator, and the TSM's image transform (the exemplar's pixels). :class:`VITaskProcessor` holds
them together, renders prompts with the same functions the collator and the evaluation use, and is
saved in every bundle as ``vitask_processor.json`` next to the VLM processor files and ``task.json``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

from hf_vitask.data.collator import (
    assistant_message,
    generation_prompts,
    image_token_id_of,
    load_image,
    user_message,
    validate_batch,
)
from hf_vitask.data.vlm_collator import VLMCollator
from hf_vitask.files import TSM_CONFIG_FILE, TSM_DIR, VITASK_CONFIG_FILE, VITASK_PROCESSOR_FILE
from hf_vitask.jsonfile import read_json
from hf_vitask.task import TaskSpec, load_tasks, save_tasks
from hf_vitask.version import __version__

__all__ = ["TSMTransform", "VITaskProcessor"]

INSTRUCTIONS = ("complete", "incomplete")


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
            batch = generation_prompts(self.processor, images, instructions)
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
            examples = [
                {"images": [image], "prompt": user_message(said), "completion": assistant_message(answer)}
                for image, said, answer in zip(images, instructions, answers)
            ]
            batch = self._collator.torch_call(examples)
            validate_batch(batch, image_token_id_of(self.processor), max_length, target="response")
        batch = BatchFeature(dict(batch))
        if self.tsm_transform is not None:
            batch["tsm_pixel_values"] = self.tsm_transform(images)
        return batch

    @functools.cached_property
    def _collator(self) -> VLMCollator:
        """trl's collator taught the family quirks: the one VITaskCollator tokenises with."""
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

        from hf_vitask.hub import resolve_bundle

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
            if data.get("tsm_transform") is not None:
                transform = TSMTransform.from_dict(data["tsm_transform"])
        elif (bundle / TSM_DIR / TSM_CONFIG_FILE).is_file() and _has_connector(bundle):
            from hf_vitask.models.tsm import TaskSpecificModel

            transform = TSMTransform.from_tsm(TaskSpecificModel.from_pretrained(bundle / TSM_DIR))
        return cls(processor, load_tasks(bundle), transform)


def _has_connector(bundle: Path) -> bool:
    config = bundle / VITASK_CONFIG_FILE
    return config.is_file() and bool(read_json(config).get("connector"))
