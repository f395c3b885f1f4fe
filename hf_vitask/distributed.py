"""The collective steps of the command-line pipeline outside the Trainer (TSM stage, evaluation, prediction).

Launched with ``torchrun`` / ``accelerate launch``, every process runs the same command. Training
(the TSM's too) is distributed by the Trainer; around it, the work the pipeline does itself is
split like this: evaluation and prediction rows are split into one contiguous block per process
and gathered in order, so the metrics are the single-process ones; only the main process writes
files.
Without a launcher (one process) every function here is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _initialized() -> bool:
    """Join the process group of a multi-process launch (once); False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        PartialState(cpu=cpu, backend="gloo" if cpu else None)  # a CPU machine: gloo, as the trainers do
    return True


def rank_and_size() -> tuple[int, int]:
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    return rank_and_size()[0] == 0


def wait_for_everyone() -> None:
    if _initialized():
        torch.distributed.barrier()


def end_process_group() -> None:
    """Leave the process group this process joined (a no-op without one): wait for the others, then
    destroy it. A process that exits with a gloo group still alive can abort at interpreter exit
    ("terminate called without an active exception", SIGABRT) after a run that finished, and the
    launcher then reports the whole job as failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def my_block(n: int) -> range:
    """This process's contiguous block of ``range(n)`` (the first ``n % size`` blocks one longer)."""
    rank, size = rank_and_size()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def everyone(obj: Any) -> list:
    """``obj`` of every process, in process order, on every process (each must call this)."""
    if not _initialized():
        return [obj]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def gather(items: list) -> list:
    """Every process's ``items`` concatenated in process order, on every process."""
    return [item for part in everyone(list(items)) for item in part]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Row blocks of every process stacked in process order (blocks may differ in length)."""
    return torch.cat([t for t in gather([tensor.cpu()])]) if _initialized() else tensor
