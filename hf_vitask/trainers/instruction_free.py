"""Instruction-free tuning (Kang, Kim, Li, Park; arXiv 2603.19482): learn from (image, description)
pairs alone, with a momentum proxy instruction and response shuffling.

:class:`InstructionFreeTrainer` is a thin ``Trainer``: response cross-entropy with the
:class:`~hf_vitask.models.proxy.ProxyInstruction` in the prompt; it saves the LoRA adapter (the
inference model: real instructions replace the proxy) and ``proxy.safetensors`` (raw + EMA +
step) in every checkpoint, and resumes exactly. The collator is
:class:`~hf_vitask.data.instruction_free.InstructionFreeCollator`; multiple-choice evaluation is
:func:`hf_vitask.evaluation.mc_evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from hf_vitask.config import InstructionFreeConfig
from hf_vitask.data.instruction_free import PROXY_SLOT_MASK, InstructionFreeCollator
from hf_vitask.losses import fused_head_losses, reduce_tokens, token_ce
from hf_vitask.models.modeling import VITaskModel, submodule_state
from hf_vitask.models.proxy import PROXY_FILE, ProxyInstruction, inject_proxy
from hf_vitask.trainers.base import VLMTrainer, check_trainer_inputs, wrap_lora


class ProxyEMACallback(TrainerCallback):
    """Updates the proxy EMA after every optimizer step. On train begin, points the shuffling stream
    of this run's collator (the trainer's own copy, see ``get_train_dataloader``) at the first
    batch still to be trained (exact resume)."""

    def __init__(self, trainer: InstructionFreeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        collator = self.trainer.train_collator
        if collator is not None and train_dataloader is not None:
            collator.batch_index = _batches_consumed(args, state.global_step, len(train_dataloader))

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.proxy is not None:
            self.trainer.proxy.update_ema()


def _batches_consumed(args: TrainingArguments, global_step: int, len_dataloader: int) -> int:
    """Micro-batches drawn (and collated) before optimizer step ``global_step``, as Trainer resumes."""
    ga = args.gradient_accumulation_steps
    per_epoch = max(len_dataloader // ga + int(len_dataloader % ga > 0), 1)
    epochs, in_epoch = divmod(global_step, per_epoch)
    return epochs * len_dataloader + (0 if args.ignore_data_skip else in_epoch * ga)


# -- the trainer -------------------------------------------------------------------------------------------


def build_model(model, args: InstructionFreeConfig, processor, peft_config=None) -> VITaskModel:
    """A VLM, peft model, VITaskModel or hub id/path -> a trainable :class:`VITaskModel` (no connector)."""
    if isinstance(model, VITaskModel):
        return model
    return VITaskModel.from_vlm(wrap_lora(model, args, peft_config), processor, with_connector=False)


class InstructionFreeTrainer(VLMTrainer):
    """Tune a VLM on ``{image, description}`` rows without instruction text.

    Args:
        model: a VLM (``PreTrainedModel``, wrapped in LoRA per ``args``), a ``PeftModel``, a
            :class:`VITaskModel`, or a hub id / path.
        args: :class:`InstructionFreeConfig`.
        processing_class: the VLM's processor (chat template + image processing).
        data_collator: default :class:`InstructionFreeCollator` built from ``args``.
        peft_config: a ``LoraConfig`` overriding the LoRA fields of ``args``.

    With ``use_proxy`` the model gets a :class:`ProxyInstruction` as ``model.proxy`` (so the
    optimizer, device moves and checkpoints see it; a model that already has one keeps it),
    initialised from ``proxy_init_text``. The trained adapter alone is the inference model.
    """

    _tag_names = ["hf_vitask", "instruction-free"]

    def __init__(
        self,
        model,
        args: InstructionFreeConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        args = check_trainer_inputs(
            args,
            InstructionFreeConfig,
            "instruction-free-output",
            processing_class,
            column_fields=("image_column", "description_column"),
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )
        model = build_model(model, args, processing_class, peft_config=peft_config)
        if args.use_proxy:
            proxy = getattr(model, "proxy", None)
            if proxy is None:
                proxy = ProxyInstruction.from_text(
                    model.get_input_embeddings(),
                    processing_class,
                    args.proxy_init_text,
                    args.num_proxy_tokens,
                    resize=args.proxy_init_resize,
                    momentum=args.proxy_momentum,
                    feed=args.proxy_feed,
                    generator=torch.Generator().manual_seed(args.seed),
                )
                model.proxy = proxy  # a submodule: optimised, moved, counted with the model
            elif proxy.num_tokens != args.num_proxy_tokens:
                raise ValueError(
                    f"the model's proxy has {proxy.num_tokens} vectors, args ask for {args.num_proxy_tokens}"
                )
            proxy.momentum, proxy.feed = args.proxy_momentum, args.proxy_feed
        if data_collator is None:
            data_collator = InstructionFreeCollator(
                processing_class,
                use_proxy=args.use_proxy,
                num_proxy_tokens=args.num_proxy_tokens,
                instruction_text=args.instruction_text or "",
                slot_token=args.proxy_slot_token,
                shuffle_prob=args.shuffle_prob,
                shuffle_separator=args.shuffle_separator,
                max_length=args.max_length,
                image_column=args.image_column,
                description_column=args.description_column,
                seed=args.seed + args.process_index,  # each process shuffles its own way
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.train_collator: InstructionFreeCollator | None = None
        """The copy of ``data_collator`` the current training run collates with."""
        self.add_callback(ProxyEMACallback(self))

    @property
    def proxy(self) -> ProxyInstruction | None:
        return (
            getattr(self.accelerator.unwrap_model(self.model), "proxy", None) if self.args.use_proxy else None
        )

    # -- optimizer: the proxy gets its own group (own lr, no weight decay) ------------------------------
    def create_optimizer(self, model=None):
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        proxy = self.proxy
        if created and proxy is not None and proxy.weight.requires_grad:
            weight = proxy.weight
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not weight]
            optimizer.add_param_group(
                {
                    "params": [weight],
                    "weight_decay": 0.0,
                    "lr": self.args.proxy_learning_rate or self.args.learning_rate,
                }
            )
        return optimizer

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        slot_mask = inputs.pop(PROXY_SLOT_MASK, None)
        proxy = self.proxy
        if proxy is not None and slot_mask is None:
            raise ValueError(
                f"The batch has no {PROXY_SLOT_MASK}: use InstructionFreeCollator(use_proxy=True)"
            )
        unwrapped = self.accelerator.unwrap_model(model)
        layer = None if return_outputs else self.loss_output_layer(unwrapped)
        # with the output layer left to the loss, the forward returns final hidden states at the
        # response tokens (one pass of run_passes, through the distributed wrapper when there is one)
        passes = {"mode": "batch", "logits": False} if layer is not None else None
        with inject_proxy(unwrapped, proxy, slot_mask) if proxy is not None else contextlib.nullcontext():
            out = model(**inputs, passes=passes)
        if passes is not None:
            out = out.plain
        if getattr(out, "response_hidden", None) is not None:
            targets = out.response_targets
            count = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
            loss, terms = fused_head_losses(
                layer.weight,
                layer.bias,
                out.response_hidden,
                targets,
                {"van": 1 / count},
                softcap=layer.softcap,
            )
            per_token = terms["van"]
        else:
            per_token = token_ce(out.response_logits, out.response_targets)
            loss = reduce_tokens(per_token, num_items_in_batch)
        self.record(model, "loss_ce", per_token, per_token.numel() if num_items_in_batch is not None else 1.0)
        if proxy is not None and model.training:
            self.record(model, "proxy_ema_gap", (proxy.weight.detach() - proxy.ema).norm(dim=-1).mean())
        loss = self.scale_for_devices(loss, num_items_in_batch)
        return (loss, out) if return_outputs else loss

    # -- each run collates with a copy of the collator: the one given is never changed ---------------------------
    def get_train_dataloader(self):
        """The training dataloader, collating with a fresh copy of ``data_collator`` whose shuffling
        stream this run owns (``train_collator``; the callback starts it where a resumed run stopped)."""
        given = self.data_collator
        if isinstance(given, InstructionFreeCollator):
            self.train_collator = dataclasses.replace(given)
            self.data_collator = self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = given

    # evaluation reads the descriptions as written: a configured copy of the collator, never a flag flip
    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_without_shuffling():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_without_shuffling():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_without_shuffling(self):
        training = self.data_collator
        if isinstance(training, InstructionFreeCollator) and training.training:
            self.data_collator = dataclasses.replace(training, training=False, batch_index=0)
        try:
            yield
        finally:
            self.data_collator = training

    # -- saving / loading: the proxy (raw + EMA + step) next to the adapter -----------------------------------
    def save_extras(self, output_dir: Path, state_dict: dict | None = None) -> None:
        if self.proxy is not None:
            gathered = None if state_dict is None else submodule_state(state_dict, "proxy.")
            self.proxy.save(output_dir / PROXY_FILE, gathered or None)

    def load_extras(self, path: Path, model) -> None:
        if self.args.use_proxy:
            file = path / PROXY_FILE
            if not file.is_file():
                raise FileNotFoundError(f"No {PROXY_FILE} in {path}: cannot restore the proxy instruction")
            model.proxy.load(file)


__all__ = ["InstructionFreeConfig", "InstructionFreeTrainer", "ProxyEMACallback", "build_model"]
