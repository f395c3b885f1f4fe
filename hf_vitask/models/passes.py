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
  forward that reuses the image features. Used where the prefix cannot be shared: rows differ
  before the image (images of different sizes). Under gradient checkpointing the prefix is still
  shared: :mod:`hf_vitask.models.checkpointing` keeps the KV cache through checkpointed layers.
* ``"none"``: separate forwards of the :class:`VITaskModel`, the reference the others are tested
  against.

The fused modes compute logits only at response positions (``logits_to_keep`` as a boolean
mask): no full-vocabulary logits for prompt or image tokens; with ``logits=False`` none at all:
they return the final hidden states there and the loss applies the output layer
(:mod:`hf_vitask.models.head`, :func:`~hf_vitask.losses.fused_head_losses`). LoRA dropout draws one mask for
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

from hf_vitask.config import PASS_MODES
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.models.checkpointing import cache_through_checkpointing
from hf_vitask.models.exemplar import exemplar_positions
from hf_vitask.models.head import deferred_output_layer, output_layer

logger = logging.getLogger(__name__)


@dataclass
class PassOutput:
    """Next-token logits at the response positions of one pass, row-major, and their targets.

    With the output layer deferred (``run_passes(..., logits=False)``) ``response_logits`` is None
    and ``response_hidden`` holds the final hidden states at those positions instead."""

    response_logits: torch.Tensor | None
    response_targets: torch.Tensor
    response_hidden: torch.Tensor | None = None

    def take(self, n: int) -> PassOutput:
        """The first ``n`` tokens (``n=0``: an empty pass of the same kind)."""
        cut = lambda t: None if t is None else t[:n]  # noqa: E731
        return PassOutput(cut(self.response_logits), self.response_targets[:n], cut(self.response_hidden))


@dataclass
class Passes:
    """What :func:`run_passes` returns. ``negative`` covers only rows with a negative
    (``negative_index >= 0``), in row order; ``mode`` is the mode that actually ran."""

    plain: PassOutput
    ep: PassOutput | None = None
    negative: PassOutput | None = None
    mode: str = "none"
    exemplar: torch.Tensor | None = None
    """The exemplar tokens the EP pass used (set when the passes ran inside ``VITaskModel.forward``)."""


def run_passes(
    model,
    inputs: dict,
    *,
    exemplar: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
    mode: str = "prefix",
    forward=None,
    logits: bool = True,
) -> Passes:
    """Response logits of the no-EP pass, the EP pass (when ``exemplar`` (B, k, D) is given) and
    the negative pass (when ``negative_index`` is given: row i's text with row ``negative_index[i]``'s
    image; -1 leaves row i out) of ``model``, a :class:`~hf_vitask.models.modeling.VITaskModel`.

    ``inputs`` is a collated batch (``input_ids``, ``attention_mask``, ``labels``, image keys).
    ``forward``: what separate passes call instead of ``model`` (a distributed wrapper of it).
    ``logits=False``: where a fused mode runs and the output layer can be deferred
    (:func:`~hf_vitask.models.head.output_layer`), return the final hidden states at the response
    positions (``response_hidden``) instead of logits, for
    :func:`~hf_vitask.losses.fused_head_losses`; the ``"none"`` mode always returns logits.
    """
    if mode not in PASS_MODES:
        raise ValueError(f"pass mode must be one of {PASS_MODES}, got {mode!r}")
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError("run_passes needs labels (the response tokens)")
    hidden = not logits and output_layer(model.vlm, model.family) is not None
    neg_rows = None
    if negative_index is not None:
        negative_index = torch.as_tensor(negative_index, device=labels.device)
        neg_rows = (negative_index >= 0).nonzero().flatten()
    if mode == "prefix" and exemplar is None and (neg_rows is None or not len(neg_rows)):
        mode = "batch"  # a single pass: nothing to share
    if mode == "prefix":
        why = _prefix_blocker(model, inputs)
        if why is None:
            return _prefix_passes(model, inputs, exemplar, negative_index, neg_rows, hidden)
        # fall back to the next mode the family can run, with one warning naming it
        mode = "batch" if "batch" in model.family.fusion_modes else "none"
        instead = "stacking the passes instead" if mode == "batch" else "running the passes separately"
        _warn_once(f"pass_fusion='prefix' is not possible here ({why}); {instead} ('{mode}')")
    if mode == "batch":
        if model.family.feature_route is not None:
            return _batch_passes(model, inputs, exemplar, negative_index, neg_rows, hidden)
        _warn_once(
            f"pass_fusion='batch' is not possible for the {model.family.name} family (its image features "
            "reach the language model neither through the input embedding nor as precomputed encoder "
            "outputs); running the passes separately ('none')"
        )
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
            passes.negative = out(forward(**negative_rows(model, inputs, negative_index, neg_rows)))
        else:
            passes.negative = passes.plain.take(0)
    return passes


def negative_rows(model, inputs: dict, negative_index: torch.Tensor, neg_rows: torch.Tensor) -> dict:
    """Rows ``neg_rows`` of the batch, row i with the WHOLE image of row ``negative_index[i]``.

    Built by splicing tokens: row j's prefix up to the end of its image block, then row i's text
    (every per-token tensor likewise), with all of image j's tiles / patches / cross-attention
    tiles. So image j may have another size (tile count, grid) than image i; the result is what
    the processor would give for row i's text with image j.
    """
    fam = model.family
    tokens = _token_tensors(inputs, fam)
    ends = exemplar_positions(inputs["input_ids"], model.image_token_id, model.image_end_token_id).tolist()
    sources = negative_index[neg_rows]
    spliced = [
        {k: torch.cat([v[j, : ends[j]], v[i, ends[i] :]]) for k, v in tokens.items()}
        for i, j in zip(neg_rows.tolist(), sources.tolist())
    ]
    length = max(part["input_ids"].shape[0] for part in spliced)
    pad = {"input_ids": model.slot_token_id, "labels": IGNORE_INDEX}
    out = {
        k: torch.stack([_pad_seq(part[k][None], length, pad.get(k, 0))[0] for part in spliced])
        for k in tokens
    }
    out.update(fam.select_images(inputs, sources, model.image_token_id))
    return fam.rebuild_token_tensors(out, model.image_token_id)


def _token_tensors(inputs: dict, fam) -> dict:
    return {k: inputs[k] for k in fam.token_keys if inputs.get(k) is not None}


# -- helpers shared by the fused modes --------------------------------------------------------------
def _base(vlm):
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


def _accepts(vlm, name: str) -> bool:
    """Whether the VLM's forward takes keyword ``name`` (it changed across transformers 5.x)."""
    return name in _forward_parameters(type(_base(vlm)))


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwargs(vlm, cache, use_cache: bool = True) -> dict:
    """``cache`` under the keyword this VLM's forward takes. ``use_cache=False`` with a given cache:
    layers still read and write it (what gradient checkpointing in training needs, where
    transformers would turn ``use_cache`` off with a warning)."""
    return {"cache" if _accepts(vlm, "cache") else "past_key_values": cache, "use_cache": use_cache}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _keep_mask(labels: torch.Tensor) -> torch.Tensor:
    """(R, L) bool: positions whose NEXT token is a response token (where logits are needed)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


# Token tensors have rows on dim 0 and the sequence on dim 1, whatever their rank; position ids
# ((R, L), or (3, R, L) for M-RoPE) have rows on dim -2 and the sequence on dim -1.
def _rows(part: dict, rows: torch.Tensor) -> dict:
    return {k: (v.index_select(-2, rows) if k == "position_ids" else v[rows]) for k, v in part.items()}


def _from(part: dict, start: int) -> dict:
    return {k: (v[..., start:] if k == "position_ids" else v[:, start:]) for k, v in part.items()}


def _pad_seq(t: torch.Tensor, length: int, value) -> torch.Tensor:
    missing = length - t.shape[1]
    if missing <= 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], missing, *t.shape[2:]), value)], dim=1)


def _stack(parts: list[dict], pad: dict) -> dict:
    """Right-pad each part's tensors to the longest sequence and stack the rows."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        if key == "position_ids":
            tensors = [torch.nn.functional.pad(p[key], (0, length - p[key].shape[-1])) for p in parts]
            out[key] = torch.cat(tensors, dim=-2)
        else:
            out[key] = torch.cat([_pad_seq(p[key], length, pad.get(key, 0)) for p in parts], dim=0)
    return out


def _split(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, row_counts: list[int]
) -> list[PassOutput]:
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


def _rows_with_response(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).any(1).nonzero().flatten()


def _pass_parts(model, inputs, exemplar, negative_index, neg_rows, positions=None):
    """The passes as token dicts with position ids, their slot masks, the batch row whose image
    each row shows, and their row counts. Rows without a response (extra CRT image rows) are left
    out of the no-EP and EP passes."""
    fam, vlm = model.family, model.vlm
    if positions is None:
        positions = fam.positions(vlm, inputs)
    tokens = dict(_token_tensors(inputs, fam), position_ids=positions)
    rows = _rows_with_response(inputs["labels"])
    parts, sources = [_rows(tokens, rows)], [rows]
    slot_parts = [torch.zeros_like(parts[0]["input_ids"], dtype=torch.bool)]
    if exemplar is not None:
        ep, slots = model.open_exemplar_slots(_token_tensors(inputs, fam), exemplar)
        ep["position_ids"] = fam.positions(vlm, {**inputs, **ep})
        parts.append(_rows(ep, rows))
        slot_parts.append(slots[rows])
        sources.append(rows)
    if neg_rows is not None and len(neg_rows):
        negative = negative_rows(model, inputs, negative_index, neg_rows)
        part = _token_tensors(negative, fam)
        part["position_ids"] = fam.positions(vlm, negative)
        parts.append(part)
        slot_parts.append(torch.zeros_like(part["input_ids"], dtype=torch.bool))
        sources.append(negative_index[neg_rows])
    return parts, slot_parts, sources, [len(s) for s in sources]


def _run_stacked(
    model,
    parts,
    slot_parts,
    exemplar_rows,
    dense_features,
    counts,
    mode,
    exemplar,
    neg_rows,
    hidden,
    **kwargs,
):
    """One forward of the stacked passes; exemplar (and, in "batch" mode, image features) are
    written into the input embedding at their positions. ``hidden``: return the final hidden states
    at the response positions instead of logits."""
    batch = _stack(parts, {"input_ids": model.slot_token_id, "labels": IGNORE_INDEX})
    slots = _stack([{"input_ids": s} for s in slot_parts], {})["input_ids"]
    labels = batch.pop("labels")
    keep = _keep_mask(labels)
    if "attention_mask" in kwargs:  # the cached prefix's mask goes in front
        batch["attention_mask"] = torch.cat([kwargs.pop("attention_mask"), batch["attention_mask"]], dim=1)
    mask, values = None, None
    if exemplar_rows is not None:
        mask, values = slots, exemplar_rows.reshape(-1, exemplar_rows.shape[-1])
    if dense_features is not None:
        image_mask = batch["input_ids"] == model.image_token_id
        dense = dense_features(image_mask)
        if mask is not None:
            dense[slots] = values.to(dense.dtype)
            mask = image_mask | slots
        else:
            mask = image_mask
        values = dense[mask]
    context = contextlib.nullcontext() if mask is None else model.inject(mask, values[None])
    head = deferred_output_layer(model.vlm) if hidden else contextlib.nullcontext()
    with context, head:
        logits = model.vlm(**batch, **kwargs, logits_to_keep=keep).logits
    outs = _split(logits, labels, keep, counts)
    if hidden:
        outs = [PassOutput(None, out.response_targets, out.response_logits) for out in outs]
    return _assemble(outs, exemplar, neg_rows, mode)


# -- "batch": vision tower once, passes stacked ------------------------------------------------------
def _vision_outputs(model, inputs: dict):
    base = _base(model.vlm)
    accepted = _image_feature_parameters(type(base))
    images = {k: v for k, v in model.family.image_inputs(inputs).items() if k in accepted}
    return base.get_image_features(**images, return_dict=True)


def _image_features(model, inputs: dict) -> list[torch.Tensor]:
    """Each row's image features, ``(T_i, D)`` in the order of its image tokens."""
    pooled = _vision_outputs(model, inputs).pooler_output
    if isinstance(pooled, torch.Tensor):
        flat = pooled.reshape(-1, pooled.shape[-1])
    else:
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled])
    counts = (inputs["input_ids"] == model.image_token_id).sum(1).tolist()
    if sum(counts) != flat.shape[0]:
        raise ValueError(
            f"{model.family.name}: the vision tower gave {flat.shape[0]} image features for {sum(counts)} image tokens"
        )
    return list(flat.split(counts))


@functools.cache
def _image_feature_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.get_image_features).parameters)


def _encoder_outputs_for(outputs, rows: list[int], n_images: int):
    """The vision tower's outputs for stacked ``rows`` (row r shows image ``rows[r]``): every field
    that holds one tensor per image (or a list of such, one per layer) is re-indexed; fields over
    all images at once are dropped (the model reads the per-image ones)."""

    def per_image(value) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == n_images
            and all(isinstance(v, torch.Tensor) for v in value)
        )

    fields = {}
    for key, value in outputs.items():
        if per_image(value):
            fields[key] = tuple(value[i] for i in rows)
        elif isinstance(value, (list, tuple)) and value and all(per_image(v) for v in value):
            fields[key] = [tuple(v[i] for i in rows) for v in value]
    if "pooler_output" not in fields:
        raise ValueError(f"get_image_features returned no per-image pooler_output (fields: {list(outputs)})")
    return type(outputs)(**fields)


def _batch_passes(model, inputs, exemplar, negative_index, neg_rows, hidden: bool = False) -> Passes:
    parts, slot_parts, sources, counts = _pass_parts(model, inputs, exemplar, negative_index, neg_rows)
    source = torch.cat(sources).tolist()
    rows = _rows_with_response(inputs["labels"])
    exemplar_rows = None if exemplar is None else exemplar[rows]
    if model.family.feature_route == "encoder_outputs":
        outputs = _vision_outputs(model, inputs)
        encoder = {"image": _encoder_outputs_for(outputs, source, len(outputs.pooler_output))}
        return _run_stacked(
            model,
            parts,
            slot_parts,
            exemplar_rows,
            None,
            counts,
            "batch",
            exemplar,
            neg_rows,
            hidden,
            mm_encoder_outputs=encoder,
        )
    features = _image_features(model, inputs)

    def dense(image_mask: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([features[i] for i in source])
        if int(image_mask.sum()) != flat.shape[0]:
            raise ValueError("stacked passes: image tokens and image features do not line up")
        out = flat.new_zeros(*image_mask.shape, flat.shape[-1])
        out[image_mask] = flat
        return out

    return _run_stacked(
        model, parts, slot_parts, exemplar_rows, dense, counts, "batch", exemplar, neg_rows, hidden
    )


def _checkpointing(base) -> bool:
    """Whether activation (gradient) checkpointing is on: ``is_activation_checkpointing`` in
    transformers >= 5.x (``is_gradient_checkpointing`` before, now deprecated)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


# -- "prefix": image prefix once into a KV cache, continuations batched on it ----------------------------
def _prefix_blocker(model, inputs) -> str | None:
    """Why the shared-prefix form cannot run on this batch (None: it can)."""
    if not model.family.prefix_fusion:
        return f"the {model.family.name} family cannot continue from a shared image prefix"
    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
    try:
        pos = exemplar_positions(ids, model.image_token_id, model.image_end_token_id)
    except ValueError:
        return "a row has no image token"
    p = int(pos[0])
    if not bool((pos == p).all()):
        return "the image ends at different positions in different rows (images of different sizes)"
    if not bool((ids[:, :p] == ids[:1, :p]).all()):
        return "the rows differ before the end of the image"
    if mask is not None and not bool(mask[:, :p].all()):
        return "padding inside the image prefix (left padding)"
    if bool((labels[:, : p + 1] != IGNORE_INDEX).any()):
        return "response tokens inside the image prefix"
    return None


def _prefix_passes(model, inputs, exemplar, negative_index, neg_rows, hidden: bool = False) -> Passes:
    fam = model.family
    ids = inputs["input_ids"]
    p = int(exemplar_positions(ids, model.image_token_id, model.image_end_token_id)[0])
    tokens = dict(_token_tensors(inputs, fam), position_ids=fam.positions(model.vlm, inputs))
    parts, slot_parts, sources, counts = _pass_parts(
        model, inputs, exemplar, negative_index, neg_rows, positions=tokens["position_ids"]
    )
    prefix = {
        k: (v[..., :p] if k == "position_ids" else v[:, :p]) for k, v in tokens.items() if k != "labels"
    }
    checkpointed = _checkpointing(_base(model.vlm)) and model.training and torch.is_grad_enabled()
    # under checkpointing, transformers turns use_cache off in training: hand the model a cache instead
    given = _new_cache(model.vlm) if checkpointed else None
    context = cache_through_checkpointing(model.vlm) if checkpointed else contextlib.nullcontext()
    with context:
        kwargs = (
            _cache_kwargs(model.vlm, given, use_cache=False) if given is not None else {"use_cache": True}
        )
        cache = _cache_of(model.vlm(**prefix, **fam.image_inputs(inputs), **kwargs, logits_to_keep=1))
        cache = given if given is not None else cache
        if cache is None or cache.get_seq_length() != p:
            raise RuntimeError("The prefix forward returned no KV cache; use pass_fusion='batch'")
        cache_index = torch.cat(sources)
        cache.reorder_cache(cache_index)  # index_select per layer: differentiable, shared rows fan out

        parts = [_from(part, p) for part in parts]
        slot_parts = [s[:, p:] for s in slot_parts]
        prefix_mask = torch.ones(len(cache_index), p, dtype=inputs["attention_mask"].dtype, device=ids.device)
        rows = _rows_with_response(inputs["labels"])
        return _run_stacked(
            model,
            parts,
            slot_parts,
            None if exemplar is None else exemplar[rows],
            None,
            counts,
            "prefix",
            exemplar,
            neg_rows,
            hidden,
            attention_mask=prefix_mask,
            **_cache_kwargs(model.vlm, cache, use_cache=not checkpointed),
        )


def _new_cache(vlm):
    from transformers import DynamicCache

    return DynamicCache(config=_base(vlm).config)


def _injection(model, slots: torch.Tensor | None, exemplar: torch.Tensor | None):
    if exemplar is None:
        return contextlib.nullcontext()
    return model.inject(slots, exemplar)


def _assemble(outs: list[PassOutput], exemplar, neg_rows, mode: str) -> Passes:
    passes = Passes(plain=outs.pop(0), mode=mode)
    if exemplar is not None:
        passes.ep = outs.pop(0)
    if neg_rows is not None:
        passes.negative = outs.pop(0) if len(neg_rows) else passes.plain.take(0)
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
    once into a KV cache; then all C responses of prompt i run as ONE continuation row on cache row
    i, packed one after the other, with a block-diagonal 4-D attention mask (each response sees the
    whole prompt and its own earlier tokens) and positions that restart at the prompt's end for
    every response: no copy of the cache per response. Where the model cannot take such a mask
    (see :func:`_packing_blocker`), the cache is copied per (prompt, response) pair instead.
    ``exemplar`` (N, k, D) adds the EP tokens. Returns None when the rows do not share one prompt
    layout (the caller then scores full sequences).
    """
    fam = model.family
    tokens = _token_tensors(prompts, fam)
    options = _token_tensors(candidates, fam)
    slots = None
    if exemplar is not None:
        tokens, slots = model.open_exemplar_slots(tokens, exemplar)
    q, qc = _first_response(tokens["labels"]), _first_response(options["labels"])
    if q is None or qc is None or q - qc != (0 if exemplar is None else exemplar.shape[1]):
        return None
    if not bool(tokens["attention_mask"][:, :q].all()):
        return None
    spans = _option_spans(options["labels"], qc)
    if not all(bool(options["attention_mask"][c, qc : qc + n].all()) for c, n in enumerate(spans)):
        return None  # padding inside a response (left-padded candidates)
    positions = fam.positions(model.vlm, {**prompts, **tokens})
    prefix = {k: v[:, :q] for k, v in tokens.items() if k != "labels"}
    prefix["position_ids"] = positions[..., :q]
    with _injection(model, None if slots is None else slots[:, :q], exemplar):
        out = model.vlm(**prefix, **fam.image_inputs(prompts), use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts the first response token
    scores = first_logp[:, options["labels"][:, qc]]  # (N, C)
    if sum(spans) == 0:  # one-token responses: the prompt's last logits were all that was needed
        return scores
    cache = _cache_of(out)
    start = positions[..., q : q + 1]  # where every response starts, per prompt: (N, 1) or (3, N, 1)
    why = _packing_blocker(model, cache, q, spans)
    if why is None:
        return _packed_option_scores(model, tokens, options, cache, scores, start, q, qc, spans)
    _warn_once(f"option scoring copies the prompt's KV cache per response ({why})")
    return _copied_option_scores(model, tokens, options, cache, scores, start, q, qc)


def _option_spans(labels: torch.Tensor, qc: int) -> list[int]:
    """Tokens of each candidate row, from its first response token on, that the scoring forward must
    read: up to the last one whose next token is a response token (the rest predicts nothing)."""
    keep = _keep_mask(labels)[:, qc:]
    last = torch.where(keep, torch.arange(keep.shape[1], device=keep.device), -1).max(1).values
    return (last + 1).tolist()


#: Attention implementations that take a custom 4-D mask as it is (flash kernels take none): sdpa a
#: boolean one (True: attend), eager an additive float one, what ``masking_utils`` builds for each.
_MASKED_ATTENTION = ("sdpa", "eager")


def _packing_blocker(model, cache, q: int, spans: list[int]) -> str | None:
    """Why the packed form (all responses of a prompt in one row) cannot run (None: it can)."""
    config = _base(model.vlm).config.get_text_config()
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _MASKED_ATTENTION:
        return f"attention implementation {implementation!r} takes no custom 4-D mask"
    # a window that cuts into the prompt needs its own mask; one for all layers only if all slide
    if _cuts_into_prompt(cache, q, max(spans)) and not all(getattr(cache, "is_sliding", [True])):
        types = set(getattr(config, "layer_types", None) or ())
        if not model.family.layer_type_masks or not types <= {"full_attention", "sliding_attention"}:
            return "a sliding window cuts into the prompt and the decoder takes one mask for all layers"
    return None


def _cuts_into_prompt(cache, q: int, longest: int) -> bool:
    """Whether a sliding-window layer hides part of the prompt from some response token."""
    windows = [getattr(layer, "sliding_window", None) for layer in getattr(cache, "layers", [])]
    return any(w is not None and q + longest > w for w in windows)


def _option_rows(options: dict, qc: int, spans: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The C responses packed into one row: their token tensors (``(1, L)``), the response each
    token belongs to and its offset in it (``(L,)`` each)."""
    device = options["input_ids"].device
    packed = {
        k: torch.cat([v[c : c + 1, qc : qc + n] for c, n in enumerate(spans)], dim=1)
        for k, v in options.items()
    }
    owner = torch.cat([torch.full((n,), c, device=device) for c, n in enumerate(spans)])
    offset = torch.cat([torch.arange(n, device=device) for n in spans])
    return packed, owner, offset


def _option_mask(owner, offset, q: int, window: int | None = None, cached: int | None = None):
    """``(1, 1, L, cached + L)`` bool, True where a packed response token attends: to the cached
    prompt and the earlier tokens of its own response. ``window``: a sliding-window layer's window,
    of which the cache holds the last ``cached`` prompt tokens; a response token at offset t
    (position q + t) sees the keys less than ``window`` positions before it, as in one sequence."""
    cached = q if cached is None else cached
    same = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])
    prompt_key = torch.arange(q - cached, q, device=owner.device)  # positions of the cached keys
    sees_prompt = torch.ones(len(owner), cached, dtype=torch.bool, device=owner.device)
    if window is not None:
        sees_prompt = (q + offset[:, None]) - prompt_key[None, :] < window
        same = same & (offset[:, None] - offset[None, :] < window)
    return torch.cat([sees_prompt, same], dim=1)[None, None]


def _packed_option_masks(model, cache, owner, offset, q: int, rows: int):
    """The 4-D mask(s) of the packed forward for ``rows`` prompts, in the convention of the attention
    implementation: one tensor, or one per layer type where a sliding window hides part of the
    prompt from some layers only."""
    base = _base(model.vlm)
    additive = base.config.get_text_config()._attn_implementation == "eager"

    def convention(allowed):
        allowed = allowed.expand(rows, *allowed.shape[1:])
        if not additive:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=base.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(base.dtype).min)

    layers = getattr(cache, "layers", [])
    sliding = [i for i, layer in enumerate(layers) if getattr(layer, "sliding_window", None) is not None]
    if not sliding or not _cuts_into_prompt(cache, q, int(offset.max()) + 1):
        return convention(_option_mask(owner, offset, q))
    kv_length, _ = cache.get_mask_sizes(len(owner), sliding[0])
    window = convention(
        _option_mask(owner, offset, q, layers[sliding[0]].sliding_window, kv_length - len(owner))
    )
    if len(sliding) == len(layers):
        return window
    return {"full_attention": convention(_option_mask(owner, offset, q)), "sliding_attention": window}


def _packed_option_scores(model, tokens, options, cache, scores, start, q, qc, spans):
    """Add to ``scores`` (N, C) the log-probs of every response token after the first, all C
    responses of prompt i in one continuation row on cache row i."""
    fam = model.family
    n = tokens["input_ids"].shape[0]
    packed, owner, offset = _option_rows(options, qc, spans)
    keep = _keep_mask(options["labels"])
    keep = torch.cat([keep[c : c + 1, qc : qc + m] for c, m in enumerate(spans)], dim=1)
    targets = torch.cat([options["labels"][c, qc + 1 : qc + 1 + m] for c, m in enumerate(spans)])[keep[0]]
    suffix = {
        k: v.repeat(n, *([1] * (v.dim() - 1)))
        for k, v in packed.items()
        if k not in ("labels", "attention_mask")
    }
    for key in suffix:  # keys that continue the prompt (a cross-attention mask reading image i)
        if fam.slot_value(key) == "previous":
            last = tokens[key][:, q - 1 : q]
            suffix[key] = last.expand(-1, len(owner), *last.shape[2:]).clone()
    suffix["position_ids"] = start + offset
    suffix["attention_mask"] = _packed_option_masks(model, cache, owner, offset, q, n)
    keep = keep.expand(n, -1)
    logits = model.vlm(**suffix, **_cache_kwargs(model.vlm, cache), logits_to_keep=keep).logits
    token_logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.repeat(n)[:, None]).squeeze(1)
    flat = (torch.arange(n, device=owner.device)[:, None] * scores.shape[1] + owner[keep[0]]).flatten()
    return scores.flatten().index_add(0, flat, token_logp).view_as(scores)


def _copied_option_scores(model, tokens, options, cache, scores, start, q, qc):
    """:func:`_packed_option_scores` for models that cannot take its mask: the cache copied per
    (prompt, response) pair, the N x C responses as one batch of rows."""
    fam = model.family
    n, c = tokens["input_ids"].shape[0], options["input_ids"].shape[0]
    cache.reorder_cache(torch.arange(n, device=scores.device).repeat_interleave(c))
    suffix = {k: v[:, qc:].repeat(n, *([1] * (v.dim() - 1))) for k, v in options.items()}
    for key in suffix:  # keys that continue the prompt (a cross-attention mask reading image i)
        if fam.slot_value(key) == "previous":
            last = tokens[key][:, q - 1 : q].repeat_interleave(c, dim=0)
            suffix[key] = last.expand(-1, suffix[key].shape[1], *last.shape[2:]).clone()
    labels = suffix.pop("labels")
    length = labels.shape[1]
    suffix["position_ids"] = start.repeat_interleave(c, dim=-2) + torch.arange(length, device=labels.device)
    suffix["attention_mask"] = torch.cat(
        [
            torch.ones(n * c, q, dtype=suffix["attention_mask"].dtype, device=labels.device),
            suffix["attention_mask"],
        ],
        1,
    )
    keep = _keep_mask(labels)
    if bool(keep.any()):
        logits = model.vlm(**suffix, **_cache_kwargs(model.vlm, cache), logits_to_keep=keep).logits
        token_logp = (
            torch.log_softmax(logits.float(), dim=-1)
            .gather(1, labels[:, 1:][keep[:, :-1]][:, None])
            .squeeze(1)
        )
        scores = scores.flatten().index_add(0, keep.nonzero()[:, 0], token_logp).view(n, c)
    return scores
