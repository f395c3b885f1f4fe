"""Instruction-free tuning (Kang, Kim, Li, Park; arXiv 2603.19482): learn from (image, description)
pairs alone, with a momentum proxy instruction and response shuffling.

* :class:`InstructionFreeConfig` — ``TrainingArguments`` plus the method's knobs.
* :class:`ProxyInstruction` — ``K`` learnable vectors in the LLM input-embedding space, written
  where the instruction would go, smoothed by an EMA ``t̄ ← m·t̄ + (1−m)·t`` after every
  optimizer step. The model is fed the EMA copy (straight-through: ``t̄.detach() + t − t.detach()``,
  so gradients reach ``t``) or the raw one (``proxy_feed``).
* :class:`InstructionFreeTrainer` — a thin ``Trainer``: response cross-entropy with the proxy
  in the prompt; saves the LoRA adapter (the inference model: real instructions replace the
  proxy) and ``proxy.safetensors`` (raw + EMA + step) in every checkpoint; resumes exactly.
* :func:`mc_evaluate` — multiple-choice questions answered with a letter, by letter
  likelihood or greedy generation, with instructions never seen in training.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from hf_vitask.config import PROXY_FEEDS, PROXY_INIT_RESIZES, InstructionFreeConfig
from hf_vitask.data.collator import assistant_message, load_image, user_message
from hf_vitask.data.instruction_free import (
    LETTERS,
    PROXY_SLOT_MASK,
    InstructionFreeCollator,
    check_question,
    mc_prompt,
    parse_letter,
)
from hf_vitask.data.vlm_collator import VLMCollator
from hf_vitask.jsonfile import read_json
from hf_vitask.losses import IGNORE_INDEX, reduce_tokens, response_logits, response_row_ids, token_ce
from hf_vitask.models.exemplar import ExemplarInjector
from hf_vitask.models.modeling import VITaskModel, submodule_state
from hf_vitask.trainers.base import TRAINING_CONFIG_FILE, VLMTrainer, check_trainer_inputs, wrap_lora

PROXY_FILE = "proxy.safetensors"


# -- the proxy instruction -------------------------------------------------------------------------------


def resize_tokens(embeds: torch.Tensor, k: int, mode: str = "linear") -> torch.Tensor:
    """``(n, D)`` token embeddings -> ``(k, D)``.

    ``"linear"``: linear interpolation along the token axis with the first and last token kept
    (k > n blends neighbours, k < n samples evenly; k = n is the identity). ``"repeat"``: the n
    tokens cycled (``t1..tn t1..``) and cut to k (k <= n keeps the first k tokens).
    """
    n = embeds.shape[0]
    if n == 0 or k < 1:
        raise ValueError(f"cannot resize {n} token embeddings to {k}")
    if mode == "repeat":
        return embeds.repeat(math.ceil(k / n), 1)[:k].clone()
    if mode != "linear":
        raise ValueError(f"resize mode must be one of {PROXY_INIT_RESIZES}, got {mode!r}")
    if n == 1:
        return embeds.expand(k, -1).clone()
    x = embeds.t().unsqueeze(0).float()  # (1, D, n)
    return F.interpolate(x, size=k, mode="linear", align_corners=True)[0].t().to(embeds.dtype).contiguous()


class ProxyInstruction(nn.Module):
    """``K`` learnable vectors (``weight``) and their exponential moving average (``ema``).

    ``ema`` starts equal to ``weight``; :meth:`update_ema` applies ``ema ← m·ema + (1−m)·weight``
    and counts ``step``. :meth:`fed` is what the model sees: the EMA with a straight-through
    gradient to ``weight`` (``feed="ema"``) or ``weight`` itself (``feed="raw"``). With ``m = 0``
    both feeds are the raw proxy.
    """

    def __init__(self, init: torch.Tensor, momentum: float = 0.99, feed: str = "ema"):
        super().__init__()
        if init.dim() != 2:
            raise ValueError(f"the proxy init must be (K, D), got {tuple(init.shape)}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if feed not in PROXY_FEEDS:
            raise ValueError(f"feed must be one of {PROXY_FEEDS}, got {feed!r}")
        self.momentum = float(momentum)
        self.feed = feed
        self.weight = nn.Parameter(init.detach().float().clone())
        self.register_buffer("ema", init.detach().float().clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_text(
        cls,
        embedding: nn.Embedding,
        tokenizer,
        text: str,
        num_tokens: int,
        *,
        resize: str = "linear",
        momentum: float = 0.99,
        feed: str = "ema",
        generator: torch.Generator | None = None,
    ) -> ProxyInstruction:
        """Initialise from the token embeddings of ``text`` resized to ``num_tokens``
        (:func:`resize_tokens`); an empty text gives ``N(0, std(embedding))`` vectors."""
        weight = embedding.weight.detach()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if ids:
            init = resize_tokens(weight[torch.tensor(ids, device=weight.device)].float().cpu(), num_tokens, resize)
        else:
            std = weight.float().std().item()
            init = torch.randn(num_tokens, weight.shape[1], generator=generator) * std
        return cls(init.to(weight.device), momentum=momentum, feed=feed)

    def fed(self) -> torch.Tensor:
        """The ``(K, D)`` vectors written into the prompt."""
        if self.feed == "raw":
            return self.weight
        return self.ema.detach() + self.weight - self.weight.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema ← m·ema + (1−m)·weight``; called once after every optimizer step."""
        self.ema.mul_(self.momentum).add_(self.weight.detach(), alpha=1 - self.momentum)
        self.step += 1

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path, state: dict | None = None) -> None:
        """``proxy.safetensors``-style file: ``proxy`` (raw), ``proxy_ema``, ``step``, metadata m and feed.
        ``state``: this module's state dict when it was gathered from FSDP / DeepSpeed shards."""
        state = state or {"weight": self.weight, "ema": self.ema, "step": self.step}
        tensors = {
            "proxy": state["weight"].detach().float().cpu().contiguous(),
            "proxy_ema": state["ema"].detach().float().cpu().contiguous(),
            "step": state["step"].detach().cpu().reshape(1),
        }
        save_file(tensors, str(path), metadata={"momentum": repr(self.momentum), "feed": self.feed})

    def load(self, path: str | Path) -> None:
        """Restore raw, EMA and step in place (exact resume)."""
        state = load_file(str(path))
        if state["proxy"].shape != self.weight.shape:
            raise ValueError(f"{path} holds a proxy of shape {tuple(state['proxy'].shape)}, expected {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(state["proxy"])
            self.ema.copy_(state["proxy_ema"])
            self.step.copy_(state["step"].reshape(()))


def inject_proxy(injector: ExemplarInjector, proxy: ProxyInstruction, slot_mask: torch.Tensor):
    """Context manager writing ``proxy.fed()`` into every row's slots for one model call."""
    values = proxy.fed().unsqueeze(0).expand(slot_mask.shape[0], -1, -1)
    return injector.inject(slot_mask, values)


class ProxyEMACallback(TrainerCallback):
    """Updates the proxy EMA after every optimizer step; on train begin, points the collator's
    shuffling stream at the first batch still to be trained (exact resume)."""

    def __init__(self, trainer: InstructionFreeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        collator = self.trainer.data_collator
        if isinstance(collator, InstructionFreeCollator) and train_dataloader is not None:
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
            args, InstructionFreeConfig, "instruction-free-output", processing_class,
            column_fields=("image_column", "description_column"),
            data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
        )
        model = build_model(model, args, processing_class, peft_config=peft_config)
        if args.use_proxy:
            proxy = getattr(model, "proxy", None)
            if proxy is None:
                proxy = ProxyInstruction.from_text(
                    model.get_input_embeddings(), processing_class, args.proxy_init_text, args.num_proxy_tokens,
                    resize=args.proxy_init_resize, momentum=args.proxy_momentum, feed=args.proxy_feed,
                    generator=torch.Generator().manual_seed(args.seed),
                )
                model.proxy = proxy  # a submodule: optimised, moved, counted with the model
            elif proxy.num_tokens != args.num_proxy_tokens:
                raise ValueError(f"the model's proxy has {proxy.num_tokens} vectors, args ask for {args.num_proxy_tokens}")
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
        self._injector = ExemplarInjector(self.model.get_input_embeddings()) if args.use_proxy else None
        self.add_callback(ProxyEMACallback(self))

    @property
    def proxy(self) -> ProxyInstruction | None:
        return getattr(self.accelerator.unwrap_model(self.model), "proxy", None) if self.args.use_proxy else None

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
                {"params": [weight], "weight_decay": 0.0, "lr": self.args.proxy_learning_rate or self.args.learning_rate}
            )
        return optimizer

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        slot_mask = inputs.pop(PROXY_SLOT_MASK, None)
        proxy = self.proxy
        if proxy is not None:
            if slot_mask is None:
                raise ValueError(f"The batch has no {PROXY_SLOT_MASK}: use InstructionFreeCollator(use_proxy=True)")
            with inject_proxy(self._injector, proxy, slot_mask):
                out = model(**inputs)
        else:
            out = model(**inputs)
        per_token = token_ce(out.response_logits, out.response_targets)
        loss = reduce_tokens(per_token, num_items_in_batch)
        self.record(model, "loss_ce", per_token, per_token.numel() if num_items_in_batch is not None else 1.0)
        if proxy is not None and model.training:
            self.record(model, "proxy_ema_gap", (proxy.weight.detach() - proxy.ema).norm(dim=-1).mean())
        loss = self.scale_for_devices(loss, num_items_in_batch)
        return (loss, out) if return_outputs else loss

    def _unshuffled(self, fn, *a, **kw):
        collator = self.data_collator
        was = getattr(collator, "training", None)
        if was is not None:
            collator.training = False  # evaluation loss on the descriptions as written
        try:
            return fn(*a, **kw)
        finally:
            if was is not None:
                collator.training = was

    def evaluate(self, *args, **kwargs):
        return self._unshuffled(super().evaluate, *args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._unshuffled(super().predict, *args, **kwargs)

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


def load_proxy(path: str | Path) -> dict[str, torch.Tensor]:
    """``{"proxy", "proxy_ema", "step"}`` from a checkpoint / output directory or a ``proxy.safetensors`` file."""
    path = Path(path)
    return load_file(str(path / PROXY_FILE if path.is_dir() else path))


# -- multiple-choice evaluation --------------------------------------------------------------------------------


def _mc_examples(questions: Sequence[dict], answer_instruction: str) -> list[tuple[dict, str]]:
    out = []
    for i, q in enumerate(questions):
        check_question(q, i)
        out.append((q, mc_prompt(q["question"], q["options"], answer_instruction)))
    return out


def _forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits of a VITaskModel, a peft model or a plain VLM (no labels: the loss is ours)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _drop_common_suffix(labels: torch.Tensor, n_options: Sequence[int]) -> torch.Tensor:
    """Per question (consecutive rows, one per option), mask the response tokens all its options
    end with (the end-of-turn token), so each option is scored by its letter tokens only."""
    labels = labels.clone()
    start = 0
    for n in n_options:
        rows = range(start, start + n)
        positions = [(labels[r] != IGNORE_INDEX).nonzero().flatten() for r in rows]
        tokens = [labels[r, pos].tolist() for r, pos in zip(rows, positions)]
        common = 0
        shortest = min(len(t) for t in tokens)
        while common < shortest - 1 and len({tuple(t[len(t) - common - 1 :]) for t in tokens}) == 1:
            common += 1
        if common:
            for r, pos in zip(rows, positions):
                labels[r, pos[-common:]] = IGNORE_INDEX
        start += n
    return labels


@torch.no_grad()
def _mc_likelihood(model, processor, items, batch_size: int, device) -> list[int]:
    collator = VLMCollator(processor, completion_only_loss=True)
    predictions: list[int] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        examples, n_options = [], []
        for q, prompt in chunk:
            image = load_image(q["image"], f" in question {s + len(n_options)}")
            n_options.append(len(q["options"]))
            examples += [
                {"images": [image], "prompt": user_message(prompt), "completion": assistant_message(LETTERS[j])}
                for j in range(len(q["options"]))
            ]
        batch = {k: v.to(device) for k, v in collator.torch_call(examples).items()}
        labels = _drop_common_suffix(batch["labels"], n_options)
        logits, targets = response_logits(_forward_logits(model, batch), labels)
        token_logp = -token_ce(logits, targets)
        per_row = torch.zeros(len(examples), device=token_logp.device).index_add_(
            0, response_row_ids(labels), token_logp
        )
        for scores in per_row.cpu().split(n_options):
            predictions.append(int(scores.argmax()))
    return predictions


@torch.no_grad()
def _mc_generate(model, processor, items, batch_size: int, device, max_new_tokens: int) -> list[str]:
    tokenizer = processor.tokenizer
    texts: list[str] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        prompts = [processor.apply_chat_template(user_message(p), add_generation_prompt=True, tokenize=False) for _, p in chunk]
        images = [[load_image(q["image"], f" in question {s + i}")] for i, (q, _) in enumerate(chunk)]
        batch = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt",
                          add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if not isinstance(model, VITaskModel):  # VITaskModel.generate returns the new tokens only
            out = out[:, batch["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


def mc_evaluate(
    model,
    processor,
    questions: Sequence[dict],
    *,
    method: str = "likelihood",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    answer_instruction: str = "Answer with the letter.",
) -> dict:
    """Accuracy on multiple-choice questions ``{image, question, options, answer}`` answered with a letter.

    The prompt is the question, one ``"A. option"`` line per option and ``answer_instruction``
    (:func:`~hf_vitask.data.instruction_free.mc_prompt`); no proxy is involved (real instructions).

    * ``"likelihood"``: every option letter is teacher-forced as the answer and scored by the
      summed log-probability of its tokens (the end-of-turn token all options share is left
      out); the best-scoring letter is the prediction. Never fails to answer.
    * ``"generate"``: greedy decoding, then the first stand-alone option letter of the text
      (:func:`~hf_vitask.data.instruction_free.parse_letter`); no letter = a parse failure, counted wrong.

    ``model`` is a :class:`VITaskModel`, a peft model or a plain VLM. Returns ``{"accuracy",
    "num_questions", "parse_failures", "parse_failure_rate", "predictions"}`` (option index or
    ``None`` per question), ``"answers"`` (the generated texts, ``"generate"`` only) and, when
    questions carry an ``"attribute"``, ``"by_attribute"``: ``{attribute: accuracy}``.
    """
    if method not in ("likelihood", "generate"):
        raise ValueError(f"method must be 'likelihood' or 'generate', got {method!r}")
    if not questions:
        raise ValueError("no questions to evaluate")
    items = _mc_examples(questions, answer_instruction)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    result: dict = {}
    try:
        if method == "likelihood":
            predictions: list[int | None] = _mc_likelihood(model, processor, items, batch_size, device)
        else:
            texts = _mc_generate(model, processor, items, batch_size, device, max_new_tokens)
            predictions = [parse_letter(t, len(q["options"])) for t, (q, _) in zip(texts, items)]
            result["answers"] = texts
    finally:
        model.train(was_training)
    correct = [p == q["answer"] for p, q in zip(predictions, questions)]
    failures = sum(p is None for p in predictions)
    result.update(
        accuracy=sum(correct) / len(questions),
        num_questions=len(questions),
        parse_failures=failures,
        parse_failure_rate=failures / len(questions),
        predictions=predictions,
    )
    if any("attribute" in q for q in questions):
        groups: dict[str, list[bool]] = defaultdict(list)
        for ok, q in zip(correct, questions):
            groups[str(q.get("attribute"))].append(ok)
        result["by_attribute"] = {k: sum(v) / len(v) for k, v in groups.items()}
    return result


def load_training_config(path: str | Path) -> dict:
    """The ``InstructionFreeConfig`` a run was trained with, as saved next to its adapter."""
    return read_json(Path(path) / TRAINING_CONFIG_FILE)


__all__ = [
    "InstructionFreeConfig",
    "InstructionFreeTrainer",
    "PROXY_FILE",
    "ProxyEMACallback",
    "ProxyInstruction",
    "build_model",
    "inject_proxy",
    "load_proxy",
    "load_training_config",
    "mc_evaluate",
    "resize_tokens",
]
