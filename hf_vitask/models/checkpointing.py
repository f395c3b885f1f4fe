"""KV caches through activation (gradient) checkpointing.

transformers' checkpointed decoder layers drop the KV cache in training: the backward pass
re-runs each layer, and a layer that writes its cache would write it a second time. The
shared-prefix passes (:mod:`hf_vitask.models.passes`) need a cache in training: the image prefix
runs once into it and the continuations read it. :func:`cache_through_checkpointing` gives the
checkpointed layers a cache for the duration of a call, without double writes:

* each layer runs, inside its checkpoint, on a private copy of its own cache layer, made anew in
  every run from the entries the layer held before the call, so the recompute sees exactly what
  the first run saw;
* the entries it held before go into the checkpoint as explicit inputs and the entries it leaves
  come out as explicit outputs, so gradients flow from the continuation's attention back into the
  prefix (through the recompute) with reentrant and non-reentrant checkpointing alike;
* after the checkpoint, the private layer (holding those outputs) replaces the layer in the cache.

The checkpointing function the user configured (``use_reentrant``, ``every_n_layers``) is kept.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

#: cache layer classes whose ``update`` rebinds tensors (no in-place writes), so a private shallow
#: copy leaves the shared layer untouched
_FUNCTIONAL_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def checkpointed_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """The checkpointed modules that own a KV-cache layer, with that layer's index."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = []
    for module in model.modules():
        if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing:
            continue
        index = layer_index(module)
        if index is not None:
            found.append((module, index))
    return found


def layer_index(layer: torch.nn.Module) -> int | None:
    """The cache index of a decoder layer: the ``layer_idx`` its attention carries."""
    for module in layer.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None


@contextlib.contextmanager
def cache_through_checkpointing(model: torch.nn.Module):
    """Within the block, checkpointed decoder layers of ``model`` read and write the KV cache they
    are given (see the module docstring); outside it they behave as transformers made them."""
    layers = checkpointed_layers(model)
    saved = [(layer, dict(layer.__dict__)) for layer, _ in layers]
    try:
        for layer, index in layers:
            layer._can_checkpoint_with_cache = True  # transformers then passes the cache through
            layer._gradient_checkpointing_func = functools.partial(
                _checkpoint_with_cache, layer._gradient_checkpointing_func, index
            )
        yield
    finally:
        for layer, attributes in saved:
            for name in ("_can_checkpoint_with_cache", "_gradient_checkpointing_func"):
                if name in attributes:
                    setattr(layer, name, attributes[name])
                else:
                    layer.__dict__.pop(name, None)


def _cache_keyword(fn: functools.partial) -> str | None:
    for name in ("cache", "past_key_values"):
        if fn.keywords.get(name) is not None:
            return name
    return None


def _checkpoint_with_cache(checkpoint, index: int, fn: functools.partial, *args):
    """What a checkpointed layer calls instead of ``checkpoint(fn, *args)``; ``fn`` is the layer's
    forward with its keywords (the cache among them) bound."""
    keyword = _cache_keyword(fn) if isinstance(fn, functools.partial) else None
    if keyword is None:  # a forward without a cache: plain checkpointing
        return checkpoint(fn, *args)
    cache = fn.keywords[keyword]
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= index:
            cache.layers.append(cache.layer_class_to_replicate())
    before = cache.layers[index]
    if type(before).__name__ not in _FUNCTIONAL_LAYERS:
        raise TypeError(
            f"A {type(before).__name__} cache layer cannot be kept through gradient checkpointing "
            f"(supported: {', '.join(_FUNCTIONAL_LAYERS)})"
        )
    past = (before.keys, before.values) if before.is_initialized and before.keys.numel() else ()
    first: list = []  # the private layer and output structure of the first (non-recompute) run

    def run(*inputs):
        layer_inputs, past_entries = inputs[: len(args)], inputs[len(args) :]
        private = copy.copy(before)
        if past_entries:
            private.keys, private.values = past_entries
        view = copy.copy(cache)
        view.layers = list(cache.layers)
        view.layers[index] = private
        out = fn(*layer_inputs, **{keyword: view})
        is_tuple = isinstance(out, tuple)
        if not first:
            first.extend([private, is_tuple])
        return (*(out if is_tuple else (out,)), private.keys, private.values)

    *out, keys, values = checkpoint(run, *args, *past)
    private, is_tuple = first
    private.keys, private.values = keys, values  # the checkpoint's outputs: they carry the gradient
    cache.layers[index] = private
    return tuple(out) if is_tuple else out[0]
