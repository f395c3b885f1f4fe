"""The passes of one VITask step (no-EP, EP, CRT negative), run as cheaply as the math allows.

A stage-2 step needs the response logits of one batch three ways: without the exemplar (the
inference path), with it (EP), and with another row's image (the CRT negative). Run naively
that is three full VLM forwards. :func:`run_passes` returns the same logits, and the same
gradients, for less:

* ``"prefix"`` (default): everything the passes share, the chat-template prefix and the image
  block (all tokens before the exemplar slot), runs once, vision tower included, into a KV cache.
  The continuations (no-EP; EP = exemplar + text; negative = row i's text on row j's cached
  image prefix) then run as ONE batched forward on that cache. Image tokens dominate VLM
  sequences (576 of ~600 in LLaVA-1.5), so a step costs about one prefix plus three short
  suffixes. Gradients flow through the cache into the prefix, so nothing is approximated.
* ``"batch"``: the vision tower runs once and the passes are stacked into one language-model
  forward that reuses the image features. Used where the prefix cannot be shared: gradient
  checkpointing drops KV caches during training, or rows differ before the image.
* ``"none"``: separate forwards of the :class:`VITaskModel`, the reference the others are tested
  against.

The fused modes compute logits only at response positions (``logits_to_keep`` as a boolean
mask): no full-vocabulary logits for prompt or image tokens. LoRA dropout draws one mask for
the shared prefix instead of one per pass (same expectation; with dropout 0 the modes agree
to float rounding, tested).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_vitask.config import PASS_MODES
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.models.exemplar import exemplar_positions

logger = logging.getLogger(__name__)


@dataclass
class PassOutput:
    """Next-token logits at the response positions of one pass, row-major, and their targets."""

    response_logits: torch.Tensor
    response_targets: torch.Tensor


@dataclass
class Passes:
    """What :func:`run_passes` returns. ``negative`` covers only rows with a negative
    (``negative_index >= 0``), in row order; ``mode`` is the mode that actually ran."""

    plain: PassOutput
    ep: PassOutput | None = None
    negative: PassOutput | None = None
    mode: str = "none"


def run_passes(
    model,
    inputs: dict,
    *,
    exemplar: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
    mode: str = "prefix",
    forward=None,
) -> Passes:
    """Response logits of the no-EP pass, the EP pass (when ``exemplar`` (B, k, D) is given) and
    the negative pass (when ``negative_index`` is given: row i's text with row ``negative_index[i]``'s
    image; -1 leaves row i out) of ``model``, a :class:`~hf_vitask.models.modeling.VITaskModel`.

    ``inputs`` is a collated batch (``input_ids``, ``attention_mask``, ``labels``, image keys).
    ``forward``: what separate passes call instead of ``model`` (a distributed wrapper of it).
    """
    if mode not in PASS_MODES:
        raise ValueError(f"pass mode must be one of {PASS_MODES}, got {mode!r}")
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError("run_passes needs labels (the response tokens)")
    neg_rows = None
    if negative_index is not None:
        negative_index = torch.as_tensor(negative_index, device=labels.device)
        neg_rows = (negative_index >= 0).nonzero().flatten()
    if mode == "prefix" and exemplar is None and (neg_rows is None or not len(neg_rows)):
        mode = "batch"  # a single pass: nothing to share
    if mode == "prefix":
        why = _prefix_blocker(model, inputs)
        if why is None:
            return _prefix_passes(model, inputs, exemplar, negative_index, neg_rows)
        _warn_once(f"pass_fusion='prefix' is not possible here ({why}); stacking the passes instead ('batch')")
        mode = "batch"
    if mode == "batch":
        if _accepts(model.vlm, "mm_encoder_outputs"):
            return _batch_passes(model, inputs, exemplar, negative_index, neg_rows)
        _warn_once("This transformers version takes no precomputed image features (mm_encoder_outputs); "
                   "running the passes separately ('none')")
    return _separate_passes(model, inputs, exemplar, negative_index, neg_rows, forward or model)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# -- the reference: one forward per pass -------------------------------------------------------------
def _separate_passes(model, inputs, exemplar, negative_index, neg_rows, forward) -> Passes:
    def out(result) -> PassOutput:
        return PassOutput(result.response_logits, result.response_targets)

    plain = forward(**inputs)
    passes = Passes(plain=out(plain), mode="none")
    if exemplar is not None:
        passes.ep = out(forward(**inputs, exemplar_embeds=exemplar))
    if neg_rows is not None:
        if len(neg_rows):
            passes.negative = out(forward(**_negative_rows(model, inputs, negative_index, neg_rows)))
        else:
            passes.negative = PassOutput(plain.response_logits[:0], plain.response_targets[:0])
    return passes


def _negative_rows(model, inputs: dict, negative_index, neg_rows) -> dict:
    """Rows ``neg_rows`` of the batch, each with the image of row ``negative_index[row]``."""
    fam = model.family
    rows = {k: v[neg_rows] for k, v in _token_tensors(inputs, fam).items()}
    return {**rows, **fam.select_images(inputs, negative_index[neg_rows])}


def _token_tensors(inputs: dict, fam) -> dict:
    keys = ("input_ids", "attention_mask", "labels", *fam.per_token_keys)
    return {k: inputs[k] for k in keys if inputs.get(k) is not None}


# -- helpers shared by the fused modes --------------------------------------------------------------
def _base(vlm):
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


def _accepts(vlm, name: str) -> bool:
    """Whether the VLM's forward takes keyword ``name`` (it changed across transformers 5.x)."""
    return name in _forward_parameters(type(_base(vlm)))


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwargs(vlm, cache) -> dict:
    return {"cache" if _accepts(vlm, "cache") else "past_key_values": cache, "use_cache": True}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _keep_mask(labels: torch.Tensor) -> torch.Tensor:
    """(R, L) bool: positions whose NEXT token is a response token (where logits are needed)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _stack(parts: list[dict], pad: dict) -> dict:
    """Right-pad each part's (R_i, L_i, ...) tensors to the longest and stack the rows."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        if key == "position_ids":  # (R, L) or (3, R, L): rows on dim -2, sequence on dim -1
            tensors = [torch.nn.functional.pad(p[key], (0, length - p[key].shape[-1])) for p in parts]
            out[key] = torch.cat(tensors, dim=-2)
            continue
        tensors = [torch.nn.functional.pad(p[key], (0, length - p[key].shape[1]), value=pad.get(key, 0)) for p in parts]
        out[key] = torch.cat(tensors, dim=0)
    return out


def _split(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, row_counts: list[int]) -> list[PassOutput]:
    """Cut the flat (N, V) logits of a stacked forward back into one PassOutput per pass."""
    targets = labels[:, 1:][keep[:, :-1]]
    per_row = keep.sum(1)
    outs, row = [], 0
    start = 0
    for count in row_counts:
        n = int(per_row[row : row + count].sum())
        outs.append(PassOutput(logits[start : start + n], targets[start : start + n]))
        start, row = start + n, row + count
    return outs


def _positions(model, inputs: dict) -> torch.Tensor:
    """Position ids as the model would compute them: 0..L-1, or Qwen2-VL's 3-D M-RoPE indices."""
    ids = inputs["input_ids"]
    if not model.family.mrope:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    kwargs = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "attention_mask") if k in inputs}
    positions, _ = _base(model.vlm).model.get_rope_index(ids, **kwargs)
    return positions


def _with_slots(model, inputs: dict, exemplar: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The token tensors with the exemplar slots opened, and the slot mask."""
    return model._with_exemplar(_token_tensors(inputs, model.family), exemplar)


def _rows_with_response(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).any(1).nonzero().flatten()


# -- "batch": vision tower once, passes stacked ------------------------------------------------------
def _batch_passes(model, inputs, exemplar, negative_index, neg_rows) -> Passes:
    fam = model.family
    features = list(_base(model.vlm).get_image_features(**{k: inputs[k] for k in fam.image_keys}, return_dict=True).pooler_output)
    tokens = _token_tensors(inputs, fam)
    rows = _rows_with_response(inputs["labels"])  # extra CRT rows only lend their image
    parts, sources, counts = [{k: v[rows] for k, v in tokens.items()}], [rows], [len(rows)]
    slot_parts = [torch.zeros_like(parts[0]["input_ids"], dtype=torch.bool)]
    if exemplar is not None:
        ep, slots = _with_slots(model, inputs, exemplar)
        parts.append({k: v[rows] for k, v in ep.items()})
        slot_parts.append(slots[rows])
        sources.append(rows)
        counts.append(len(rows))
    if neg_rows is not None and len(neg_rows):
        parts.append({k: v[neg_rows] for k, v in tokens.items()})
        slot_parts.append(torch.zeros_like(parts[-1]["input_ids"], dtype=torch.bool))
        sources.append(negative_index[neg_rows])
        counts.append(len(neg_rows))
    source = torch.cat(sources)
    batch = _stack(parts, {"input_ids": model.slot_token_id, "labels": IGNORE_INDEX})
    slots = _stack([{"input_ids": s} for s in slot_parts], {})["input_ids"]
    labels = batch.pop("labels")
    keep = _keep_mask(labels)
    images = BaseModelOutputWithPooling(pooler_output=[features[i] for i in source.tolist()])
    kwargs = dict(batch, mm_encoder_outputs={"image": images})
    if "image_grid_thw" in inputs:
        kwargs["image_grid_thw"] = inputs["image_grid_thw"][source]
    with _injection(model, slots, None if exemplar is None else exemplar[rows]):
        logits = model.vlm(**kwargs, logits_to_keep=keep).logits
    return _assemble(_split(logits, labels, keep, counts), exemplar, neg_rows, "batch")


# -- "prefix": image prefix once into a KV cache, continuations batched on it ----------------------------
def _prefix_blocker(model, inputs) -> str | None:
    """Why the shared-prefix form cannot run on this batch (None: it can)."""
    base = _base(model.vlm)
    if getattr(base, "is_gradient_checkpointing", False) and model.training and torch.is_grad_enabled():
        return "gradient checkpointing drops the KV cache in training"
    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
    try:
        pos = exemplar_positions(ids, model.image_token_id, model.image_end_token_id)
    except ValueError:
        return "a row has no image token"
    p = int(pos[0])
    if not bool((pos == p).all()):
        return "the image ends at different positions in different rows"
    if not bool((ids[:, :p] == ids[:1, :p]).all()):
        return "the rows differ before the end of the image"
    if mask is not None and not bool(mask[:, :p].all()):
        return "padding inside the image prefix (left padding)"
    if bool((labels[:, : p + 1] != IGNORE_INDEX).any()):
        return "response tokens inside the image prefix"
    return None


def _prefix_passes(model, inputs, exemplar, negative_index, neg_rows) -> Passes:
    fam = model.family
    ids = inputs["input_ids"]
    p = int(exemplar_positions(ids, model.image_token_id, model.image_end_token_id)[0])
    tokens = _token_tensors(inputs, fam)
    positions = _positions(model, inputs)
    tokens_pos = dict(tokens, position_ids=positions)

    prefix = {k: v[..., :p] for k, v in tokens_pos.items() if k != "labels"}
    prefix.update({k: inputs[k] for k in fam.image_keys})
    cache = _cache_of(model.vlm(**prefix, use_cache=True, logits_to_keep=1))
    if cache is None or cache.get_seq_length() != p:
        raise RuntimeError("The prefix forward returned no KV cache; use pass_fusion='batch'")

    def suffix(part: dict, rows: torch.Tensor) -> dict:
        return {k: (v.index_select(-2, rows) if k == "position_ids" else v[rows])[..., p:] for k, v in part.items()}

    rows = _rows_with_response(inputs["labels"])
    parts, slot_parts, cache_rows, counts = [suffix(tokens_pos, rows)], [], [rows], [len(rows)]
    slot_parts.append(torch.zeros_like(parts[0]["input_ids"], dtype=torch.bool))
    if exemplar is not None:
        ep, slots = _with_slots(model, inputs, exemplar)
        ep_pos = _positions(model, {**inputs, **ep})
        parts.append(suffix(dict(ep, position_ids=ep_pos), rows))
        slot_parts.append(slots[rows][:, p:])
        cache_rows.append(rows)
        counts.append(len(rows))
    if neg_rows is not None and len(neg_rows):
        sources = negative_index[neg_rows]
        negative = _negative_rows(model, inputs, negative_index, neg_rows)
        neg_pos = _positions(model, negative)
        every = torch.arange(len(neg_rows), device=ids.device)
        part = {k: negative[k] for k in tokens}
        parts.append(suffix(dict(part, position_ids=neg_pos), every))
        slot_parts.append(torch.zeros_like(parts[-1]["input_ids"], dtype=torch.bool))
        cache_rows.append(sources)
        counts.append(len(neg_rows))
    cache_index = torch.cat(cache_rows)
    cache.reorder_cache(cache_index)  # index_select per layer: differentiable, shared rows fan out

    batch = _stack(parts, {"input_ids": model.slot_token_id, "labels": IGNORE_INDEX})
    slots = _stack([{"input_ids": s} for s in slot_parts], {})["input_ids"]
    labels = batch.pop("labels")
    keep = _keep_mask(labels)
    prefix_mask = torch.ones(len(cache_index), p, dtype=batch["attention_mask"].dtype, device=ids.device)
    batch["attention_mask"] = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)
    with _injection(model, slots, None if exemplar is None else exemplar[rows]):
        logits = model.vlm(**batch, **_cache_kwargs(model.vlm, cache), logits_to_keep=keep).logits
    return _assemble(_split(logits, labels, keep, counts), exemplar, neg_rows, "prefix")


def _injection(model, slots: torch.Tensor, exemplar: torch.Tensor | None):
    if exemplar is None:
        return contextlib.nullcontext()
    return model._injector.inject(slots, exemplar)


def _assemble(outs: list[PassOutput], exemplar, neg_rows, mode: str) -> Passes:
    passes = Passes(plain=outs.pop(0), mode=mode)
    if exemplar is not None:
        passes.ep = outs.pop(0)
    if neg_rows is not None:
        passes.negative = outs.pop(0) if len(neg_rows) else PassOutput(
            passes.plain.response_logits[:0], passes.plain.response_targets[:0]
        )
    return passes


# -- option scoring: one prompt, many candidate responses ---------------------------------------------
def _first_response(labels: torch.Tensor) -> int | None:
    """Index of the first response token, when it is the same in every row (else None)."""
    is_response = labels != IGNORE_INDEX
    if not bool(is_response.any(1).all()):
        return None
    first = is_response.int().argmax(1)
    return int(first[0]) if bool((first == first[0]).all()) else None


@torch.no_grad()
def candidate_logprobs(model, prompts: dict, candidates: dict, exemplar: torch.Tensor | None = None):
    """``(N, C)`` summed log-probabilities of C candidate responses for each of N prompts.

    ``prompts``: a collated batch of the N image prompts (each row with any one response, which
    marks where the prompt ends); ``candidates``: a collated batch of C rows holding the SAME prompt
    text with each candidate response (the image of its rows is not used). Each image prompt runs
    once into a KV cache, and the N x C responses run as one batch on it, instead of N x C full
    sequences. ``exemplar`` (N, k, D) adds the EP tokens. Returns None when the rows do not share
    one prompt layout (the caller then scores full sequences).
    """
    fam = model.family
    tokens = _token_tensors(prompts, fam)
    options = _token_tensors(candidates, fam)
    slots = None
    if exemplar is not None:
        tokens, slots = model._with_exemplar(tokens, exemplar)
    q, qc = _first_response(tokens["labels"]), _first_response(options["labels"])
    if q is None or qc is None or q - qc != (0 if exemplar is None else exemplar.shape[1]):
        return None
    if not bool(tokens["attention_mask"][:, :q].all()):
        return None
    n, c = tokens["input_ids"].shape[0], options["input_ids"].shape[0]
    positions = _positions(model, {**prompts, **tokens})
    prefix = {k: v[:, :q] for k, v in tokens.items() if k != "labels"}
    prefix["position_ids"] = positions[..., :q]
    with _injection(model, None if slots is None else slots[:, :q], exemplar):
        out = model.vlm(**prefix, **{k: prompts[k] for k in fam.image_keys}, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts the first response token
    scores = first_logp[:, options["labels"][:, qc]]  # (N, C)
    cache = _cache_of(out)
    cache.reorder_cache(torch.arange(n, device=scores.device).repeat_interleave(c))
    suffix = {k: v[:, qc:].repeat(n, *([1] * (v.dim() - 1))) for k, v in options.items()}
    labels = suffix.pop("labels")
    length = labels.shape[1]
    start = positions[..., q : q + 1].repeat_interleave(c, dim=-2)  # row (i, c) continues prompt i
    suffix["position_ids"] = start + torch.arange(length, device=labels.device)
    suffix["attention_mask"] = torch.cat([torch.ones(n * c, q, dtype=suffix["attention_mask"].dtype,
                                                     device=labels.device), suffix["attention_mask"]], 1)
    keep = _keep_mask(labels)
    if bool(keep.any()):
        logits = model.vlm(**suffix, **_cache_kwargs(model.vlm, cache), logits_to_keep=keep).logits
        token_logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, 1:][keep[:, :-1]][:, None]).squeeze(1)
        scores = scores.flatten().index_add(0, keep.nonzero()[:, 0], token_logp).view(n, c)
    return scores
