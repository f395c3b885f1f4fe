"""Loading a saved VITask bundle (adapter + connector + TSM + processor + task) in one call."""

from __future__ import annotations

from os import PathLike
from typing import Any, NamedTuple

from hf_vitask.models.modeling import VITaskModel
from hf_vitask.task import TaskSpec


class LoadedVITask(NamedTuple):
    model: VITaskModel
    processor: Any
    task: TaskSpec | None


def load_vitask(path: str | PathLike, base_model=None, *, load_tsm: bool = True, **model_kwargs) -> LoadedVITask:
    """Restore ``(model, processor, task)`` from a directory written by ``VITaskTrainer.save_model``.

    The base VLM is loaded from the adapter's ``base_model_name_or_path`` unless ``base_model``
    is given; ``model_kwargs`` go to its ``from_pretrained`` (dtype, device_map, ...).
    """
    from pathlib import Path

    from transformers import AutoProcessor

    model = VITaskModel.from_pretrained(path, base_model, load_tsm=load_tsm, **model_kwargs)
    processor = AutoProcessor.from_pretrained(str(path))
    task = TaskSpec.from_pretrained(path) if (Path(path) / "task.json").is_file() else None
    return LoadedVITask(model, processor, task)
