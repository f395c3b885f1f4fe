"""What the package's trainers share: wrapping the VLM in LoRA, per-term loss logging, and
saving / resuming the trainable state (adapter + package extras) as safetensors."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_vitask.config import VLMTuningArguments
from hf_vitask.files import TRAINING_CONFIG_FILE
from hf_vitask.models.head import OutputLayer, output_layer
from hf_vitask.models.modeling import VITaskModel, is_peft_model
from hf_vitask.processing import VITaskProcessor
from hf_vitask.trainers.bundles import OutputDirLock, publish_bundle, staging_dir
from hf_vitask.trainers.checkpoints import (
    MANIFEST_FILE,
    SealCheckpointCallback,
    checkpoint_problem,
    is_checkpoint_dir,
    last_complete_checkpoint,
)


def wrap_lora(model, args: VLMTuningArguments, peft_config=None):
    """A plain VLM (or hub id / path) -> a LoRA ``PeftModel`` on the language model's linear layers,
    per ``args`` or ``peft_config``; peft models and ``use_lora=False`` pass through unchanged.
    A 4-bit base first goes through ``prepare_model_for_kbit_training`` (QLoRA)."""
    from hf_vitask.models.loading import is_quantized, lora_config, prepare_for_training

    if isinstance(model, str):
        from hf_vitask.models.loading import load_vlm

        model = load_vlm(model)[0]
    if isinstance(model, VITaskModel) or is_peft_model(model):
        return model
    quantized = is_quantized(model)
    if peft_config is None and not args.use_lora:
        if quantized:
            raise ValueError("A 4-bit model cannot be trained without adapters: set use_lora=True (QLoRA)")
        return model
    if quantized:
        model = prepare_for_training(
            model, gradient_checkpointing=bool(args.gradient_checkpointing), quantized=True
        )
    from peft import get_peft_model

    peft_config = peft_config or lora_config(
        model,
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )
    return get_peft_model(model, peft_config)


def check_datasets(columns: list[str], **datasets) -> None:
    """Fail at construction, not at step 3,000: empty datasets and missing columns, named."""
    for name, ds in datasets.items():
        if ds is None or not hasattr(ds, "__len__"):
            continue
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
        available = getattr(ds, "column_names", None)
        if available is not None:
            missing = [c for c in columns if c not in available]
            if missing:
                raise ValueError(f"{name} has no column(s) {missing}; columns: {available}")


def check_trainer_inputs(
    args,
    config_class,
    default_output_dir: str,
    processing_class,
    *,
    column_fields: tuple[str, ...],
    data_collator=None,
    train_dataset=None,
    eval_dataset=None,
):
    """The checks every trainer constructor starts with; returns ``args`` (a default config when None).
    ``column_fields``: the config fields naming the columns the default collator reads (not
    checked when a custom ``data_collator`` is given)."""
    args = args if args is not None else config_class(output_dir=default_output_dir)
    if not isinstance(args, config_class):
        raise TypeError(f"args must be an instance of {config_class.__name__}, got {type(args).__name__}")
    if processing_class is None:
        raise ValueError("processing_class (the VLM's processor) is required")
    columns = [getattr(args, f) for f in column_fields] if data_collator is None else []
    check_datasets(columns, train_dataset=train_dataset, eval_dataset=eval_dataset)
    return args


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss term or weight; it stopped before anything was saved."""


def _stopped(args, step: int, what: str) -> NonFiniteLossError:
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint had been written"
    return NonFiniteLossError(
        f"step {step}: {what}. Training stopped and nothing was saved ({kept}). Lower learning_rate, set "
        "max_grad_norm > 0, train in float32 or bfloat16 instead of float16, or check the data."
    )


class FiniteWeightsCallback(TrainerCallback):
    """After every optimizer step, stop when a trainable weight is no longer finite, before a
    checkpoint of it can be written."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if model is not None else []
        if params and not bool(torch.stack([p.detach().isfinite().all() for _, p in params]).all()):
            name = next(n for n, p in params if not bool(p.detach().isfinite().all()))
            raise _stopped(args, state.global_step, f"the trainable weight {name!r} is no longer finite")
        return control


def _step_means(sums: dict[str, dict[int, list[float]]]) -> dict[str, float]:
    """Each term's weighted mean within a step, averaged over the steps since the last log (as
    the Trainer averages ``loss``)."""
    means = {}
    for name, steps in sums.items():
        per_step = [weighted / weight for weighted, weight in steps.values() if weight]
        if per_step:
            means[name] = sum(per_step) / len(per_step)
    return means


class VLMTrainer(Trainer):
    """Base of :class:`VITaskTrainer` and :class:`InstructionFreeTrainer` (a ``transformers.Trainer``).

    Subclasses record loss terms with :meth:`record`, which :meth:`log` averages since the last
    log (``loss_*`` in training, ``eval_loss_*`` in evaluation), and save / restore their own
    extra state in :meth:`save_extras` / :meth:`load_extras` next to the adapter.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.add_callback(FiniteWeightsCallback())
        self.add_callback(SealCheckpointCallback())

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete*
        checkpoint (an unfinished or damaged newer one is skipped with a warning)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}"
                )
            resume_from_checkpoint = str(resume_from_checkpoint)
        elif resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None and Path(resume_from_checkpoint, MANIFEST_FILE).exists():
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}")
        lock = (
            OutputDirLock(self.args.output_dir) if self.args.process_index == 0 else contextlib.nullcontext()
        )
        with lock:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def record(self, model, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        """Keep ``value`` for the next log; a non-finite training loss term stops training
        (:class:`NonFiniteLossError` naming the step and the term) instead of being logged.

        ``weight``: how much this value counts within its step (e.g. its response tokens), so the
        logged term is the step's value over all micro-batches and processes, as ``loss`` is."""
        mode = "train" if model.training else "eval"
        value = float(value.detach().float().mean()) if torch.is_tensor(value) else value
        if mode == "train" and name.startswith("loss") and not math.isfinite(value):
            raise _stopped(self.args, self.state.global_step + 1, f"the loss term {name!r} is {value}")
        self._metrics[mode][name].append((self.state.global_step, value * weight, weight))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = _step_means(self._gather_metrics(self._metrics[mode]))
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)  # in place: Trainer.evaluate() returns this dict
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _gather_metrics(self, recorded: dict[str, list]) -> dict[str, dict[int, list[float]]]:
        """Per term and step: [sum of value x weight, sum of weights], over every process."""
        from hf_vitask.distributed import everyone

        local = [
            (name, step, weighted, weight)
            for name, entries in recorded.items()
            for step, weighted, weight in entries
        ]
        sums: dict[str, dict[int, list[float]]] = {}
        for part in everyone(local) if self.args.world_size > 1 else [local]:  # log() runs on every process
            for name, step, weighted, weight in part:
                cell = sums.setdefault(name, {}).setdefault(step, [0.0, 0.0])
                cell[0] += weighted
                cell[1] += weight
        return sums

    def scale_for_devices(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """As ``Trainer.compute_loss`` does when the loss is normalised by the global token count."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def loss_output_layer(self, unwrapped) -> OutputLayer | None:
        """The output layer the loss applies itself (``fused_loss_head``), or None for the logits path:
        off, or FSDP / DeepSpeed (they shard the weights outside their forward), or a layer the model
        must apply (LoRA-wrapped, quantised, transformed logits)."""
        if not self.args.fused_loss_head or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        return output_layer(unwrapped.vlm, unwrapped.family)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss with the same terms as training."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- the Hub -----------------------------------------------------------------------------------
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> str | None:
        """Save the bundle to ``output_dir`` and upload it (adapter, connector, TSM, processor, task,
        model card; safetensors only) to ``hub_model_id``. Extra keywords: ``metrics``, ``datasets``,
        ``base_model`` for the model card."""
        from hf_vitask.hub import push_bundle

        output_dir = Path(self.args.output_dir)
        self.save_model(str(output_dir))
        if not self.is_world_process_zero():
            return None
        return push_bundle(
            output_dir,
            self.args.hub_model_id or output_dir.name,
            private=private if private is not None else bool(self.args.hub_private_repo),
            revision=revision or getattr(self.args, "hub_revision", None),
            commit_message=commit_message,
            token=token or self.args.hub_token,
            metrics=kwargs.get("metrics"),
            datasets=kwargs.get("datasets"),
            base_model=kwargs.get("base_model"),
        )

    def _push_from_checkpoint(self, checkpoint_folder) -> None:
        """``push_to_hub=True`` during training: upload the checkpoint's bundle (never pickled args)."""
        from hf_vitask.hub import push_bundle

        if self.is_world_process_zero() and self.args.hub_model_id:
            push_bundle(
                checkpoint_folder,
                self.args.hub_model_id,
                private=bool(self.args.hub_private_repo),
                commit_message=f"Training in progress, step {self.state.global_step}",
                token=self.args.hub_token,
            )

    # -- saving / loading ----------------------------------------------------------------------------
    def save_extras(self, output_dir: Path, state_dict: dict | None = None) -> None:
        """Write what the subclass adds to the bundle (task, proxy, ...); ``state_dict`` is the
        model's full state dict when FSDP or DeepSpeed gathered it from the shards."""

    def load_extras(self, path: Path, model) -> None:
        """Restore what :meth:`save_extras` wrote (exact resume)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' ``save_model``; then every process waits for the main one to finish writing,
        so a script that saves and then loads the bundle on every process reads a complete bundle."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Adapter (or full model) + package extras (safetensors), processor, training config.

        A checkpoint is written in place (sealed afterwards, see :mod:`.checkpoints`); a bundle is
        written next to its directory and published into it (:func:`.bundles.publish_bundle`), so
        an interrupted save never leaves a mixture of two runs. Only the main process writes; under
        FSDP / DeepSpeed every process has joined the gathering of ``state_dict`` before this."""
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        checkpoint = is_checkpoint_dir(output_dir, self.args.output_dir)
        target = output_dir if checkpoint else staging_dir(output_dir)
        target.mkdir(parents=True, exist_ok=True)
        try:
            model = self.accelerator.unwrap_model(self.model)
            if isinstance(
                model, VITaskModel
            ):  # the TSM is frozen: in the final bundle, not in every checkpoint
                model.save_pretrained(target, save_tsm=not checkpoint, state_dict=state_dict)
            else:
                model.save_pretrained(target, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(target))
            self.save_extras(target, state_dict)
            if self.processing_class is not None:  # renders the inputs this run trained on
                tsm = getattr(model, "tsm", None) if getattr(model, "connector", None) is not None else None
                VITaskProcessor(self.processing_class, getattr(self, "task", None), tsm).save_config(target)
            (target / TRAINING_CONFIG_FILE).write_text(json.dumps(self.args.effective_dict(), indent=2))
            self._write_model_card(target)
        except BaseException:
            if not checkpoint:
                shutil.rmtree(target, ignore_errors=True)
            raise
        if not checkpoint:
            publish_bundle(target, output_dir)

    def _write_model_card(self, folder: Path) -> None:
        """The package's model card as README.md (replacing peft's placeholder): base model, method and
        stage, task, metrics once evaluated, the loading snippet."""
        from hf_vitask.hub import README_FILE, render_model_card

        evaluated = [e for e in self.state.log_history if any(k.startswith("eval_") for k in e)]
        metrics = {
            k: v
            for k, v in (evaluated[-1] if evaluated else {}).items()
            if k.startswith("eval_") and isinstance(v, int | float)
        }
        (folder / README_FILE).write_text(render_model_card(folder, metrics=metrics or None))

    def _load_trainable(self, path, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        model.load_trainable_weights(path)
        self.load_extras(Path(path), model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if (
            self.is_fsdp_enabled or self.is_deepspeed_enabled
        ):  # their own sharded checkpoint holds every weight
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_trainable(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_trainable(self.state.best_model_checkpoint)
