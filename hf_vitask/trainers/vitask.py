"""VITaskTrainer: a thin ``transformers.Trainer`` whose ``compute_loss`` adds EP, RDA and CRT.

Per step (weights from :class:`~hf_vitask.VITaskConfig`):

* no-EP pass (the inference path): ``L_van``, and the student side of RDA and CRT;
* EP pass, same batch with exemplar tokens: ``L_EP``, and the detached RDA teacher (``rda_teacher="self"``);
* frozen teacher pass (``rda_teacher="frozen"``): a saved stage-1 adapter + connector, no grad;
* negative pass (stage 2): each row's response with another class's image, for ``L_CRT``.

The losses themselves are the pure functions of :mod:`hf_vitask.losses`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path

import torch

from hf_vitask.config import VITaskConfig
from hf_vitask.data.collator import VITaskCollator
from hf_vitask.losses import (
    IGNORE_INDEX,
    crt_loss,
    fused_head_losses,
    rda_kl,
    rda_kl_cached,
    reduce_tokens,
    response_row_ids,
    token_ce,
)
from hf_vitask.models.exemplar import ExemplarConnector
from hf_vitask.models.modeling import (
    VITASK_CONFIG_FILE,
    VITaskModel,
    VITaskOutput,
    load_connector,
    read_vitask_config,
)
from hf_vitask.task import TaskSpec, save_tasks
from hf_vitask.trainers.base import VLMTrainer, check_trainer_inputs, wrap_lora
from hf_vitask.trainers.teacher_cache import (
    MEMORY_BUDGET_GIB,
    CachePlan,
    DiskTeacherCache,
    plan_cache,
    size_text,
)

TEACHER_ADAPTER = "rda_teacher"
#: The frozen teacher's on-disk cache, in the output directory (a resumed run finds it there).
TEACHER_CACHE_DIR = "teacher_cache"
logger = logging.getLogger(__name__)


def build_model(model, args: VITaskConfig, processor, tsm=None, peft_config=None) -> VITaskModel:
    """Turn what the user passed (a VLM, a peft model or a VITaskModel) into a trainable VITaskModel."""
    if isinstance(model, VITaskModel):
        if tsm is not None:
            model.tsm = tsm
    else:
        model = VITaskModel.from_vlm(
            wrap_lora(model, args, peft_config),
            processor,
            tsm=tsm,
            num_exemplar_tokens=args.num_exemplar_tokens,
            exemplar_feature=args.exemplar_feature,
            connector_hidden_dim=args.connector_hidden_dim,
            with_connector=tsm is not None,
        )
    if model.tsm is not None:
        model.tsm.requires_grad_(False)
    if model.connector is not None:
        if args.effective_freeze_connector and args.uses_exemplar and not model.connector.trained:
            raise ValueError(
                "This configuration freezes the exemplar connector (stage 2), but the model's connector was never "
                "trained: stage 2 starts from a stage-1 model (the stage-1 trainer's model, or a saved stage-1 "
                "bundle). Train stage 1 first, or set freeze_connector=False to train the connector here."
            )
        model.connector.requires_grad_(not args.effective_freeze_connector)
    return model


def check_tsm_matches_tasks(tsm, task) -> None:
    """A TSM must predict exactly the task's classes (all tasks' classes, for a shared multi-task head)."""
    if tsm is None or task is None:
        return
    tasks = task if isinstance(task, (list, tuple)) else [task]
    expected = sum(t.num_classes for t in tasks)
    if tsm.num_classes != expected:
        names = ", ".join(f"{t.name!r} ({t.num_classes})" for t in tasks)
        raise ValueError(
            f"The TSM has {tsm.num_classes} output classes but the task(s) {names} have {expected}: it was trained "
            "for other data. Train the TSM on this task (hf-vitask train-tsm) or pass the matching one."
        )


def _shared(entries: dict, args) -> dict:
    """``entries`` of every process (each calls this at the same step); just ``entries`` alone."""
    if args.world_size <= 1:
        return entries
    from hf_vitask.distributed import everyone

    return {key: value for part in everyone(entries) for key, value in part.items()}


class VITaskTrainer(VLMTrainer):
    """Instruction-tune a VLM with VITask (EP + RDA in stage 1, + CRT in stage 2).

    Args:
        model: a VLM (``PreTrainedModel``, wrapped in LoRA per ``args``), a ``PeftModel``, a
            :class:`VITaskModel` (e.g. the stage-1 result for stage 2), or a hub id / path.
        args: :class:`VITaskConfig`.
        processing_class: the VLM's processor (chat template + image processing).
        task: the :class:`TaskSpec` rendering instructions and responses (needed for the default collator);
            a list of them for a multi-task run (rows then carry a ``task`` index column).
        tsm: the trained task-specific model (needed unless the run is vanilla); can also be
            attached to the model beforehand.
        teacher: for ``rda_teacher="frozen"``: the directory of a saved stage-1 model (its adapter
            is loaded next to the trainable one on the same base weights), or a ``VITaskModel``.
        peft_config: a ``LoraConfig`` overriding the LoRA fields of ``args``.
    """

    _tag_names = ["hf_vitask", "vitask"]

    def __init__(
        self,
        model,
        args: VITaskConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        task: TaskSpec | list[TaskSpec] | None = None,
        tsm=None,
        teacher=None,
        peft_config=None,
        **kwargs,
    ):
        args = check_trainer_inputs(
            args,
            VITaskConfig,
            "vitask-output",
            processing_class,
            column_fields=("image_column", "label_column"),
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )
        frozen_teacher = args.rda_teacher == "frozen" and args.rda_weight > 0
        if frozen_teacher and teacher is None:
            raise ValueError("rda_teacher='frozen' needs teacher=<stage-1 output directory or VITaskModel>")
        if teacher is not None and not frozen_teacher:
            raise ValueError("A teacher was passed but rda_teacher is not 'frozen' (or rda_weight is 0)")
        has_tsm = tsm is not None or getattr(model, "tsm", None) is not None
        if (
            args.uses_exemplar or frozen_teacher
        ) and not has_tsm:  # checked before the user's model is wrapped
            raise ValueError(
                "This configuration runs the exemplar (EP) pass or an EP teacher, which needs a trained TSM: pass tsm=... "
                "(or set ep_weight=0 and rda_weight=0 for plain instruction tuning)"
            )
        check_tsm_matches_tasks(tsm if tsm is not None else getattr(model, "tsm", None), task)
        model = build_model(model, args, processing_class, tsm=tsm, peft_config=peft_config)
        if args.uses_exemplar and model.connector is None:
            raise ValueError(
                "This model has no exemplar connector (it was built without a TSM); EP cannot run"
            )
        needs = {
            "return_sample_keys": bool(
                frozen_teacher and args.rda_teacher_cache != "off"
            ),  # the teacher-output cache key
            "return_images": kwargs.get("compute_metrics")
            is not None,  # prediction_step scores every class option
        }
        if data_collator is None:
            if task is None:
                raise ValueError("task (a TaskSpec) is required to build the default VITaskCollator")
            crt = args.effective_crt_weight > 0
            data_collator = VITaskCollator(
                processing_class,
                task,
                tsm=model.tsm if args.uses_exemplar or frozen_teacher else None,
                complete_instruction=args.instruction == "complete",
                max_length=args.max_length,
                negatives_dataset=train_dataset if crt and args.crt_negatives == "batch+dataset" else None,
                with_negatives=crt,
                image_column=args.image_column,
                label_column=args.label_column,
                seed=args.seed + args.process_index,  # each process draws its own negatives
                **{flag: True for flag, needed in needs.items() if needed},
            )
        elif isinstance(data_collator, VITaskCollator):
            needs["with_negatives"] = (
                args.effective_crt_weight > 0
            )  # CRT negatives are picked by the collator only
            missing = {
                flag: True for flag, needed in needs.items() if needed and not getattr(data_collator, flag)
            }
            if missing:  # a configured copy: the caller's collator is left as it was given
                data_collator = dataclasses.replace(data_collator, **missing)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.task = task
        self.teacher_model: VITaskModel | None = None
        self._teacher_store: dict | DiskTeacherCache | None = None  # opened on first use
        self._announced_cache_plans: set[CachePlan] = set()
        self.teacher_passes = 0  # samples this process ran the cached frozen teacher on
        self.teacher_connector: ExemplarConnector | None = None
        self.teacher_cache_plan = CachePlan("off", 0, 0)
        if frozen_teacher:
            self._setup_frozen_teacher(teacher)
            self.teacher_cache_plan = self._check_teacher_cache_size()

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        connector = self.accelerator.unwrap_model(self.model).connector
        if connector is not None and any(p.requires_grad for p in connector.parameters()):
            connector.trained = True
        return output

    # -- frozen RDA teacher --------------------------------------------------------------------------
    def _setup_frozen_teacher(self, teacher) -> None:
        model: VITaskModel = self.model
        if isinstance(teacher, VITaskModel):
            teacher.requires_grad_(False)
            teacher.eval()
            self.teacher_model = teacher.to(self.args.device)
            return
        path = Path(teacher)
        if not (path / VITASK_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved VITask model (no {VITASK_CONFIG_FILE})")
        if not model.is_peft:
            raise ValueError(
                "A frozen teacher loaded from disk shares the base weights as a second LoRA adapter; "
                "the model being trained must be a peft model (use_lora=True)"
            )
        model.vlm.load_adapter(str(path), adapter_name=TEACHER_ADAPTER, is_trainable=False)
        model.vlm.set_adapter(model.vlm.active_adapter)  # keep training the student adapter
        cfg = read_vitask_config(path)
        if cfg.get("connector") is None:
            raise ValueError(f"The teacher at {path} has no exemplar connector: it was not trained with EP")
        connector = load_connector(path, cfg)
        connector.requires_grad_(False)
        self.teacher_connector = connector.to(self.args.device)

    def _check_teacher_cache_size(self, limit_gib: float = MEMORY_BUDGET_GIB) -> CachePlan:
        """Choose how the frozen teacher's outputs are cached (``rda_teacher_cache``, ``rda_teacher_topk``;
        ``limit_gib``: the most ``"auto"`` keeps in RAM) from the estimated size, and announce the choice
        once (each distinct choice once) on the main process."""
        args = self.args
        tasks = self.task if isinstance(self.task, list) else [self.task]
        vocab = self.model.vlm.get_output_embeddings().weight.shape[0]
        rows = tokens = None
        if self.task is not None and self.train_dataset is not None:
            with contextlib.suppress(TypeError):  # an iterable dataset: size unknown
                rows = len(self.train_dataset)
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            tokens = max(
                len(tokenizer(t.response(c))["input_ids"]) + 1 for t in tasks for c in range(t.num_classes)
            )
        plan = plan_cache(args.rda_teacher_cache, args.rda_teacher_topk, vocab, rows, tokens, limit_gib)
        if plan.mode != "off" and plan not in self._announced_cache_plans and self.is_world_process_zero():
            self._announced_cache_plans.add(plan)
            message = plan.describe(self._teacher_cache_dir)
            if plan.mode == "disk" and plan.nbytes() is not None:
                folder = next(
                    p for p in (self._teacher_cache_dir, *self._teacher_cache_dir.parents) if p.exists()
                )
                free = shutil.disk_usage(folder).free
                if plan.nbytes() > free:
                    message += f" That is more than the {size_text(free)} free there."
            logger.warning(message)
        return plan

    @property
    def _teacher_cache_dir(self) -> Path:
        return Path(self.args.output_dir) / TEACHER_CACHE_DIR

    @property
    def _teacher_cache(self) -> dict | DiskTeacherCache:
        """The frozen teacher's outputs per sample key: a dict in RAM, or the store in the output directory
        (opened on first use; a resumed run reuses what it holds)."""
        if self._teacher_store is None:
            self._teacher_store = self._open_teacher_cache()
        return self._teacher_store

    def _open_teacher_cache(self) -> dict | DiskTeacherCache:
        """The main process opens (and if need be repairs) the store first; the other processes then read
        it. A process that cannot see it (``output_dir`` not shared between machines) keeps its entries in
        RAM instead."""
        plan = self.teacher_cache_plan
        if plan.mode != "disk":
            return {}
        meta = {
            "vocab": plan.vocab,
            "topk": plan.topk,
            "temperature": self.args.rda_temperature,
            "teacher": self._teacher_fingerprint(),
        }
        main = self.is_world_process_zero()
        store = DiskTeacherCache(self._teacher_cache_dir, meta, writer=True) if main else None
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if not main:
            try:
                store = DiskTeacherCache(self._teacher_cache_dir, meta, writer=False)
            except (OSError, ValueError) as err:
                logger.warning(
                    f"Process {self.args.process_index} cannot read the teacher cache in "
                    f"{self._teacher_cache_dir} ({err}): it keeps the teacher's outputs in RAM"
                )
                return {}
        if len(store):
            logger.info(f"Frozen-teacher cache: {len(store)} samples already in {self._teacher_cache_dir}")
        return store

    def _teacher_fingerprint(self) -> str:
        """A digest of the frozen teacher's weights (a strided sample of each tensor: cheap for a large
        teacher, different for any retrained one): the on-disk cache is reused only for the same teacher."""
        model: VITaskModel = self.accelerator.unwrap_model(self.model)
        if self.teacher_model is not None:
            named = list(self.teacher_model.named_parameters())
        else:
            named = [(n, p) for n, p in model.vlm.named_parameters() if f".{TEACHER_ADAPTER}." in n]
            named += [(f"connector.{n}", p) for n, p in self.teacher_connector.named_parameters()]
            if model.tsm is not None:
                named += [(f"tsm.{n}", p) for n, p in model.tsm.named_parameters()]
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in named:
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() and flat.device.type != "meta":
                sample = flat[:: max(1, flat.numel() // 65536)].float().cpu()
                digest.update(sample.numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def _frozen_teacher_logits(self, model: VITaskModel, inputs: dict, tsm_pixel_values) -> torch.Tensor:
        if self.teacher_model is not None:
            return self.teacher_model(**inputs, tsm_pixel_values=tsm_pixel_values).response_logits
        was_training = model.training
        model.eval()  # no LoRA dropout in the teacher
        try:
            exemplar = model.exemplar_embeds(tsm_pixel_values, connector=self.teacher_connector)
            with model.use_adapter(TEACHER_ADAPTER):
                return model(**inputs, exemplar_embeds=exemplar).response_logits
        finally:
            model.train(was_training)

    def _has_dropout(self, model) -> bool:
        if getattr(self, "_dropout_present", None) is None:
            self._dropout_present = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        return self._dropout_present

    @torch.no_grad()
    def _self_teacher_without_dropout(self, model, inputs: dict, exemplar: torch.Tensor) -> torch.Tensor:
        """The EP pass as a teacher in eval mode (no LoRA dropout), without gradients."""
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            return unwrapped(**inputs, exemplar_embeds=exemplar.detach()).response_logits
        finally:
            unwrapped.train()

    def _frozen_rda(self, model: VITaskModel, inputs: dict, tsm_pixel_values, student_logits, sample_keys):
        """L_RDA against the frozen teacher: from the per-sample cache when the batch names its samples."""
        temperature = self.args.rda_temperature
        if sample_keys is None or self.teacher_cache_plan.mode == "off":
            return rda_kl(
                student_logits, self._frozen_teacher_logits(model, inputs, tsm_pixel_values), temperature
            )
        logprobs, index = self._cached_teacher(model, inputs, tsm_pixel_values, sample_keys)
        return rda_kl_cached(student_logits, logprobs, index, temperature)

    @torch.no_grad()
    def _cached_teacher(self, model: VITaskModel, inputs: dict, tsm_pixel_values, sample_keys):
        """Teacher log-probabilities at the batch's response tokens (top-k, or all), computed only for
        samples not seen before. The teacher is frozen, so a sample's outputs never change.

        Under several processes each one computes the samples of its own batch and the new entries
        are shared with all of them at once, so a sample that a later epoch deals to another process
        is not computed again: once per sample for the whole job. On disk, the main process writes
        them and the others read them from there (see :mod:`hf_vitask.trainers.teacher_cache`)."""
        cache = self._teacher_cache
        labels = inputs["labels"]
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
        missing = [i for i, key in enumerate(sample_keys) if counts[i] and key not in cache]
        new: dict = {}
        if missing:
            rows = torch.tensor(missing, device=labels.device)
            sub = model.family.take_rows(inputs, rows, model.image_token_id)
            logits = self._frozen_teacher_logits(model, sub, tsm_pixel_values[rows])
            logprobs = torch.log_softmax(logits.float() / self.args.rda_temperature, dim=-1)
            index = None
            if self.teacher_cache_plan.topk:
                logprobs, index = logprobs.topk(min(self.teacher_cache_plan.topk, logprobs.shape[-1]), dim=-1)
            start = 0
            for i in missing:
                end = start + counts[i]
                new[sample_keys[i]] = (
                    logprobs[start:end].cpu(),
                    None if index is None else index[start:end].to(torch.int32).cpu(),
                )
                start = end
        self.teacher_passes += len(new)
        new = _shared(new, self.args)
        cache.update(new)
        entries = [new[key] if key in new else cache[key] for i, key in enumerate(sample_keys) if counts[i]]
        logprobs = torch.cat([e[0] for e in entries]).to(labels.device)
        index = None if entries[0][1] is None else torch.cat([e[1] for e in entries]).to(labels.device).long()
        return logprobs, index

    # -- loss ----------------------------------------------------------------------------------------
    def _log_crt_coverage(self, model, labels: torch.Tensor, negative_index: torch.Tensor) -> None:
        """Log ``crt_coverage`` (share of the rows that have a negative); warn once when rows lack one."""
        rows = (labels != IGNORE_INDEX).any(1)
        covered = (negative_index >= 0) & rows
        coverage = float(covered.sum()) / max(int(rows.sum()), 1)
        self.record(model, "crt_coverage", coverage)
        if coverage < 1 and not getattr(self, "_warned_crt_coverage", False):
            self._warned_crt_coverage = True
            logger.warning(
                f"{int(rows.sum() - covered.sum())} of {int(rows.sum())} rows of a batch have no CRT negative (no other "
                "class of their task in the batch): L_CRT averages over the rows that have one (crt_coverage in the "
                "logs). crt_negatives='batch+dataset' draws a negative from the training set for such rows."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: VITaskConfig = self.args
        unwrapped: VITaskModel = self.accelerator.unwrap_model(model)
        inputs = dict(inputs)
        inputs.pop("class_ids", None)
        tsm_pixel_values = inputs.pop("tsm_pixel_values", None)
        negative_index = inputs.pop("crt_negative_index", None)
        inputs.pop("task_ids", None)
        sample_keys = inputs.pop("sample_keys", None)
        inputs.pop("images", None)

        if args.uses_exemplar and tsm_pixel_values is None:
            raise ValueError("The batch has no tsm_pixel_values: give the collator the TSM (tsm=...)")
        if args.effective_crt_weight > 0 and negative_index is None:
            raise ValueError(
                "CRT (crt_weight > 0) needs crt_negative_index in the batch: the collator picks the negatives "
                "(VITaskCollator(..., with_negatives=True), the default collator of this trainer)"
            )
        crt = args.effective_crt_weight > 0
        layer = self.loss_output_layer(unwrapped)
        hidden = layer is not None and not return_outputs
        # one forward for the no-EP, EP and negative passes (shared image prefix; see hf_vitask.models.passes),
        # through the distributed wrapper when there is one
        passes = model(
            **inputs,
            tsm_pixel_values=tsm_pixel_values if args.uses_exemplar else None,
            passes={
                "mode": args.pass_fusion,
                "negative_index": negative_index if crt else None,
                "logits": not hidden,
            },
        )
        student = passes.plain
        targets = student.response_targets
        keep = (negative_index >= 0)[response_row_ids(inputs["labels"])] if crt else None
        weights = {
            "van": args.van_weight,
            "ep": args.ep_weight,
            "rda": args.rda_weight,
            "crt": args.effective_crt_weight,
        }
        scale = {}
        if crt:
            self._log_crt_coverage(model, inputs["labels"], negative_index)
            if num_items_in_batch is not None and keep.any():
                # the sum over all tokens -> the mean over the covered ones
                scale["crt"] = keep.numel() / keep.sum().item()
        if student.response_hidden is not None:
            loss, terms = self._fused_loss(
                model, unwrapped, inputs, passes, layer, keep, tsm_pixel_values, sample_keys,
                weights, scale, num_items_in_batch,
            )  # fmt: skip
        else:
            terms = self._loss_terms(model, unwrapped, inputs, passes, keep, tsm_pixel_values, sample_keys)
            loss = sum(
                weights[k] * scale.get(k, 1.0) * reduce_tokens(v, num_items_in_batch)
                for k, v in terms.items()
                if weights[k] > 0
            )
        weight = targets.numel() if num_items_in_batch is not None else 1.0  # as the terms enter the loss
        for k, v in terms.items():
            if v.numel():
                self.record(model, f"loss_{k}", v, weight)
        loss = self.scale_for_devices(loss, num_items_in_batch)
        if return_outputs:
            return loss, VITaskOutput(
                loss=loss, response_logits=student.response_logits, response_targets=targets
            )
        return loss

    def _loss_terms(self, model, unwrapped, inputs, passes, keep, tsm_pixel_values, sample_keys) -> dict:
        """The per-token terms from the passes' response logits."""
        args: VITaskConfig = self.args
        student = passes.plain
        targets = student.response_targets
        terms: dict[str, torch.Tensor] = {"van": token_ce(student.response_logits, targets)}
        if passes.ep is not None:
            terms["ep"] = token_ce(passes.ep.response_logits, targets)
        if args.rda_weight > 0:
            if args.rda_teacher == "self":
                teacher = passes.ep.response_logits
                if not args.rda_teacher_dropout and unwrapped.training and self._has_dropout(unwrapped):
                    teacher = self._self_teacher_without_dropout(model, inputs, passes.exemplar)
                terms["rda"] = rda_kl(
                    student.response_logits, teacher, args.rda_temperature, detach=args.rda_detach
                )
            else:
                terms["rda"] = self._frozen_rda(
                    unwrapped, inputs, tsm_pixel_values, student.response_logits, sample_keys
                )
        if keep is not None:
            terms["crt"] = crt_loss(
                student.response_logits[keep], passes.negative.response_logits, targets[keep]
            )
        return terms

    def _fused_loss(
        self,
        model,
        unwrapped,
        inputs,
        passes,
        layer,
        keep,
        tsm_pixel_values,
        sample_keys,
        weights,
        scale,
        num_items,
    ) -> tuple[torch.Tensor, dict]:
        """The loss and its per-token terms from the passes' final hidden states: the output layer and
        every term in one chunked pass over the vocabulary (:func:`~hf_vitask.losses.fused_head_losses`)."""
        args: VITaskConfig = self.args
        student = passes.plain
        targets = student.response_targets
        temperature = args.rda_temperature
        teacher_logprobs = teacher_index = None
        if args.rda_weight > 0:
            if args.rda_teacher == "frozen":
                if sample_keys is None or self.teacher_cache_plan.mode == "off":
                    logits = self._frozen_teacher_logits(unwrapped, inputs, tsm_pixel_values)
                    teacher_logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
                else:  # all of the distribution, or its top-k (teacher_index)
                    teacher_logprobs, teacher_index = self._cached_teacher(
                        unwrapped, inputs, tsm_pixel_values, sample_keys
                    )
            elif not args.rda_teacher_dropout and unwrapped.training and self._has_dropout(unwrapped):
                logits = self._self_teacher_without_dropout(model, inputs, passes.exemplar)
                teacher_logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        counts = {"van": targets.numel(), "ep": targets.numel(), "rda": targets.numel()}
        counts["crt"] = 0 if keep is None else int(keep.sum())
        coefficients = {
            k: w * scale.get(k, 1.0) / (num_items if num_items is not None else max(counts[k], 1))
            for k, w in weights.items()
            if w > 0
        }
        return fused_head_losses(
            layer.weight,
            layer.bias,
            student.response_hidden,
            targets,
            coefficients,
            teacher=None if passes.ep is None else passes.ep.response_hidden,
            teacher_logprobs=teacher_logprobs,
            teacher_index=teacher_index,
            negative=None if keep is None else passes.negative.response_hidden,
            keep=keep,
            temperature=temperature,
            detach_teacher=args.rda_detach,
            softcap=layer.softcap,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss with the same terms as training (logged as ``eval_loss_*``).

        With ``compute_metrics`` set, also returns the option log-likelihood of every class per
        image and the class ids, so ``hf_vitask.evaluation.compute_classification_metrics``
        gives accuracy / macro-F1 / AUC inside ``Trainer.evaluate``.
        """
        inputs = self._prepare_inputs(inputs)
        images = inputs.get("images")
        class_ids = inputs.get("class_ids")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if (
            prediction_loss_only
            or self.compute_metrics is None
            or images is None
            or not isinstance(self.task, TaskSpec)
        ):
            return loss.detach(), None, None
        from hf_vitask.evaluation import score_options

        scores = score_options(
            self.accelerator.unwrap_model(model),
            self.processing_class,
            self.task,
            images,
            use_tsm=self.args.metric_use_tsm,
            complete_instruction=self.args.instruction == "complete",
            batch_size=len(images),
            option_score=self.args.metric_option_score,
        )
        return loss.detach(), scores.to(loss.device), class_ids[: len(images)]

    # -- saving --------------------------------------------------------------------------------------------
    def save_extras(self, output_dir: Path, state_dict: dict | None = None) -> None:
        """The task(s): ``task.json`` (or ``tasks.json``) next to the adapter, connector and TSM."""
        if self.task is not None:
            save_tasks(self.task, output_dir)
