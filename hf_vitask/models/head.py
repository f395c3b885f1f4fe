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
    """``final_logit_softcapping`` (Gemma 3, PaliGemma 2): logits become ``c * tanh(logits / c)``."""


def output_layer(vlm, family) -> OutputLayer | None:
    """The output layer of ``vlm`` when the loss can apply it in its place, else None: it must be a
    plain ``nn.Linear`` (not LoRA-wrapped, not quantised) that the family's forward applies last."""
    if not family.deferred_output_layer:
        return None
    head = vlm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    config = vlm.config.get_text_config() if hasattr(vlm.config, "get_text_config") else vlm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputLayer(head.weight, head.bias, None if softcap is None else float(softcap))


@contextlib.contextmanager
def deferred_output_layer(vlm):
    """Within the block, ``vlm``'s output layer returns its input: ``.logits`` holds the final hidden
    states (at the ``logits_to_keep`` positions)."""
    head = vlm.get_output_embeddings()
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
