"""Checkpoints you can trust on resume: each one is sealed with a manifest once fully written.

``Trainer`` writes a checkpoint file by file; a run killed mid-save (or a disk that fills up)
leaves a folder that looks like the latest checkpoint and fails, or silently differs, on resume.
After the Trainer has saved a checkpoint, :class:`SealCheckpointCallback` writes
``hf_vitask_checkpoint.json`` (every file and its size) into it, last. :func:`last_complete_checkpoint`
then picks the newest checkpoint whose manifest is present and whose files still match it, and
warns about each newer one it skips.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_vitask.files import MANIFEST_FILE

logger = logging.getLogger(__name__)


__all__ = [
    "MANIFEST_FILE",
    "SealCheckpointCallback",
    "checkpoint_problem",
    "is_checkpoint_dir",
    "last_complete_checkpoint",
    "seal",
]


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def seal(folder: str | Path) -> None:
    """Record every file of a fully written checkpoint and its size (written last)."""
    folder = Path(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": _files(folder)}, indent=1) + "\n")


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is)."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return "no manifest: its save did not finish"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    actual = _files(folder)
    for name, size in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != size:
            return f"{name} has {actual[name]} bytes, {size} were written"
    return None


def _step(path: Path) -> int:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_checkpoint_dir(path: str | Path, output_dir: str | Path) -> bool:
    """Whether ``path`` is one of the Trainer's ``checkpoint-<step>`` folders of ``output_dir`` (a bundle
    saved elsewhere under a name like ``checkpoint-best`` is not)."""
    path = Path(path)
    return _step(path) >= 0 and path.resolve().parent == Path(output_dir).resolve()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``; newer incomplete ones are skipped with a warning."""
    folders = sorted(
        (p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and _step(p) >= 0),
        key=_step,
        reverse=True,
    )
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"Skipping checkpoint {folder} on resume: {problem}. Trying the previous one.")
    return None


class SealCheckpointCallback(TrainerCallback):
    """Seal each checkpoint once the Trainer has written all of it (``on_save`` runs after). Under
    several processes each one writes its own RNG state into the checkpoint: the main process
    seals only after all of them have."""

    def on_save(self, args, state, control, **kwargs):
        import torch

        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                seal(folder)
        return control
