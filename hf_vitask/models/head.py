"""The output layer, left to the loss: fused passes can return final hidden states instead of logits.

A stage-2 step computes the response logits of three passes. At a 152k vocabulary these
``(tokens, vocabulary)`` tensors, and the softmaxes of the losses on them, are most of the step's
memory and a large part of its time. With the output layer deferred, the passes return the
``(tokens, hidden)`` states at the response positions and
:func:`~hf_vitask.losses.fused_head_losses` applies the layer and every loss chunk by chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["OutputLayer", "deferred_output_layer", "output_layer"]


@dataclass
class OutputLayer:
    """What the loss needs to apply a VLM's output layer itself."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    """``final_logit_softcapping`` where the family's forward applies it (PaliGemma 2): logits become
    ``c * tanh(logits / c)``."""


def output_layer(vlm, family) -> OutputLayer | None:
    """The output layer of ``vlm`` when the loss can apply it in its place, else None: it must be a
    plain ``nn.Linear`` (not LoRA-wrapped, not quantised) that the family's forward applies last."""
    if not family.deferred_output_layer:
        return None
    head = vlm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    softcap = getattr(_text_config(vlm), "final_logit_softcapping", None) if family.softcaps_logits else None
    return OutputLayer(head.weight, head.bias, None if softcap is None else float(softcap))


@contextlib.contextmanager
def deferred_output_layer(vlm):
    """Within the block, ``vlm``'s output layer returns its input: ``.logits`` holds the final hidden
    states (at the ``logits_to_keep`` positions), which the forward does not soft-cap either (the
    loss applies the cap after the layer, :attr:`OutputLayer.softcap`)."""
    head = vlm.get_output_embeddings()
    config = _text_config(vlm)
    softcap = getattr(config, "final_logit_softcapping", None)
    head.forward = _identity
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def _text_config(vlm):
    return vlm.config.get_text_config() if hasattr(vlm.config, "get_text_config") else vlm.config


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
