"""The TSM stage through ``transformers.Trainer``: the task-specific model trains like every other stage.

:class:`TSMTrainer` is a small ``Trainer`` whose ``compute_loss`` is the (task-restricted) cross-entropy
of the timm classifier, so ``report_to``, bf16, DDP, checkpoints and resume, evaluation every epoch
and the progress bar are the Trainer's own. :func:`train_tsm` is the one-call form with the
package's defaults (AdamW, cosine schedule, the best validation epoch kept).
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_vitask.models.tsm import (
    TaskSpecificModel,
    checked_labels,
    restrict_to_tasks,
    running_batchnorm,
    task_offsets,
)

__all__ = ["TSMCollator", "TSMTrainer", "train_tsm"]


class TSMCollator:
    """Rows -> ``pixel_values`` (the TSM's own preprocessing, augmented when ``train``), ``labels`` (ids of
    the shared head) and, with ``task_sizes``, ``task_ids``."""

    def __init__(
        self,
        tsm: TaskSpecificModel,
        *,
        train: bool,
        image_column: str = "image",
        label_column: str = "label",
        task_sizes: Sequence[int] | None = None,
        task_column: str = "task",
    ):
        self.tsm, self.train = tsm, train
        self.image_column, self.label_column, self.task_column = image_column, label_column, task_column
        self.task_sizes = list(task_sizes) if task_sizes is not None else None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([int(row[self.label_column]) for row in rows])
        batch = {
            "pixel_values": self.tsm.preprocess([row[self.image_column] for row in rows], train=self.train)
        }
        if self.task_sizes is not None:
            task_ids = torch.tensor([int(row[self.task_column]) for row in rows])
            labels = labels + torch.tensor(task_offsets(self.task_sizes))[task_ids]
            batch["task_ids"] = task_ids
        batch["labels"] = labels
        return batch


def _accuracy(eval_pred) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(eval_pred.label_ids)).mean())}


class TSMTrainer(Trainer):
    """``Trainer`` for a :class:`~hf_vitask.models.tsm.TaskSpecificModel`.

    ``task_sizes`` (several tasks sharing one head): rows carry a task index in ``task_column`` and a
    label within their task; the softmax is restricted to the row's own task. Checkpoints and the
    saved model are the TSM's own ``model.safetensors`` + ``tsm_config.json``.
    """

    def __init__(
        self,
        model: TaskSpecificModel,
        args: TrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        task_sizes: Sequence[int] | None = None,
        task_column: str = "task",
        **kwargs,
    ):
        if args.remove_unused_columns:  # the collator reads the image and label columns itself
            args.remove_unused_columns = False
        args.label_names = ["labels"]
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None:
                checked_labels(
                    dataset, model.num_classes, image_column, label_column, name, task_sizes, task_column
                )
        columns = dict(
            image_column=image_column,
            label_column=label_column,
            task_sizes=task_sizes,
            task_column=task_column,
        )
        self.eval_collator = TSMCollator(model, train=False, **columns)
        kwargs.setdefault("compute_metrics", _accuracy)
        super().__init__(
            model=model,
            args=args,
            data_collator=TSMCollator(model, train=True, **columns),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self.task_sizes = list(task_sizes) if task_sizes is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        with running_batchnorm(model, model.training and len(labels) == 1):
            logits = model(inputs["pixel_values"])
        if self.task_sizes is not None:
            logits = restrict_to_tasks(logits, inputs["task_ids"], self.task_sizes)
        loss = F.cross_entropy(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation images are preprocessed without augmentation."""
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_model

        from hf_vitask.models.tsm import WEIGHTS_NAME

        tsm = self.accelerator.unwrap_model(model or self.model)
        load_model(
            tsm.model, f"{resume_from_checkpoint}/{WEIGHTS_NAME}", device=str(next(tsm.parameters()).device)
        )

    def _load_best_model(self):
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class _KeepBest(TrainerCallback):
    """The weights of the best evaluation (first on ties), kept in memory and restored at the end:
    the best validation epoch without writing a checkpoint per epoch."""

    def __init__(self):
        self.best, self.state_dict = -1.0, None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        accuracy = (metrics or {}).get("eval_accuracy")
        if accuracy is not None and accuracy > self.best and model is not None:
            self.best = accuracy
            self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.state_dict is not None and model is not None:
            model.load_state_dict(self.state_dict)


@contextlib.contextmanager
def _callers_rng_kept():
    """The Trainer seeds the global generators; give the caller's states back afterwards."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(
        devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    ):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def train_tsm(
    tsm: TaskSpecificModel,
    train_dataset,
    *,
    eval_dataset=None,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: str | torch.device | None = None,
    image_column: str = "image",
    label_column: str = "label",
    task_sizes: Sequence[int] | None = None,
    task_column: str = "task",
    progress: bool = True,
    args: TrainingArguments | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> dict:
    """Fully fine-tune the TSM (VITask trains it alone, first) with a :class:`TSMTrainer`.

    Defaults: AdamW, a cosine schedule without warm-up, evaluation every epoch and the weights of
    the best validation epoch kept (the last epoch without an ``eval_dataset``), as the paper keeps
    the best validation checkpoint. ``args`` (``TrainingArguments``) replaces those defaults
    entirely (``report_to``, ``bf16``, checkpoints, ...); under ``torchrun`` the TSM trains with DDP.
    ``device=None`` trains where the TSM already is. Deterministic for a seed; the caller's random
    states are left untouched. The TSM ends in eval mode.

    Returns ``{"train_loss": [mean loss per epoch], "eval_accuracy": [per epoch] (with an
    eval_dataset), "best_epoch": 0-based index into those lists}``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    where = torch.device(device) if device is not None else next(tsm.parameters()).device
    with _callers_rng_kept(), contextlib.ExitStack() as stack:
        if args is None:
            output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-vitask-tsm-"))
            args = TrainingArguments(
                output_dir=output_dir,
                num_train_epochs=epochs,
                per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=batch_size,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                lr_scheduler_type="cosine",
                optim="adamw_torch",
                seed=seed,
                data_seed=seed,
                eval_strategy="epoch" if eval_dataset is not None else "no",
                logging_strategy="epoch",
                save_strategy="no",
                report_to="none",
                disable_tqdm=not progress,
                use_cpu=where.type == "cpu",
                dataloader_pin_memory=False,
                remove_unused_columns=False,
            )
        keep_best = _KeepBest()
        trainer = TSMTrainer(
            tsm,
            args,
            train_dataset,
            eval_dataset,
            image_column=image_column,
            label_column=label_column,
            task_sizes=task_sizes,
            task_column=task_column,
            callbacks=[keep_best] if not args.load_best_model_at_end else None,
        )
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    history: dict = {"train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
    accuracies = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    if eval_dataset is not None:
        history["eval_accuracy"] = accuracies
    history["best_epoch"] = (
        accuracies.index(max(accuracies)) if accuracies else len(history["train_loss"]) - 1
    )
    tsm.zero_grad(set_to_none=True)  # leave no stale gradients on a model others will freeze
    tsm.eval()
    return history
