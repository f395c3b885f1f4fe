"""The VITask losses as pure tensor functions.

Every function here takes logits already gathered at *response* positions: a tensor of shape
``(N, V)`` for the N teacher-forced response tokens of a batch (see :func:`response_logits`),
and returns one loss value per token, shape ``(N,)``. The trainer weights and reduces them with
:func:`reduce_tokens`. Keeping the per-token form makes the losses testable by hand, lets the
EP and no-EP passes be aligned token by token (the exemplar shifts positions, not responses),
and gives gradient accumulation the right normaliser (``num_items_in_batch``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def recomputed(fn):
    """Run a per-token loss so that autograd keeps only its inputs: the ``(N, V)`` intermediates
    (float copies, log-softmaxes, probabilities) are recomputed in backward instead of stored. At a
    152k vocabulary each such tensor is 0.6 MB per response token, and a stage-2 step makes about
    ten of them per token; recomputing them costs elementwise work only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def response_logits(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather next-token logits at response positions.

    A causal LM predicts ``labels[:, t + 1]`` from position ``t``; this shifts once and keeps
    the positions whose target is not ``ignore_index``. Returns ``(logits (N, V), targets (N,))``
    in row-major order, so two passes with the same responses give aligned rows even when
    their prompts differ in length.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, length)"
        )
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    keep = shift_labels != ignore_index
    return shift_logits[keep], shift_labels[keep]


def response_row_ids(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Batch row of each response token, in the order of :func:`response_logits`."""
    return (labels[:, 1:] != ignore_index).nonzero()[:, 0]


@recomputed
def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each response token, ``-log softmax(logits)[target]``; shape ``(N,)``."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


@recomputed
def rda_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, detach: bool = True
) -> torch.Tensor:
    """Response distribution alignment, ``KL(p_student || p_teacher)`` per token over the vocabulary.

    Student first, as in VITask: the distribution without the exemplar is pulled toward the
    exemplar-prompted one. The teacher is detached (stop-gradient) unless ``detach=False``, an
    ablation control: without the detach the paper reports no gain. With a temperature ``T`` both
    distributions are softened and the result is scaled by ``T**2`` so gradients keep their size.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ in shape"
        )
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logits = teacher_logits.detach() if detach else teacher_logits
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


@recomputed
def rda_kl_cached(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_index: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`rda_kl` against stored teacher log-probabilities (already at ``temperature``).

    ``teacher_index=None``: ``teacher_logprobs`` is the full ``(N, V)`` distribution and the result
    equals :func:`rda_kl`. Otherwise ``teacher_logprobs``/``teacher_index`` are the teacher's top-k
    ``(N, k)``; the mass outside them is spread evenly over the other ``V - k`` tokens. That is exact
    when the teacher puts (almost) all its mass on the top-k, as a trained teacher does on its
    response tokens; ``docs/performance.md`` gives the measured difference.
    """
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    if teacher_index is None:
        if teacher_logprobs.shape != log_p.shape:
            raise ValueError(
                f"teacher log-probs {tuple(teacher_logprobs.shape)} != student {tuple(log_p.shape)}"
            )
        return (p * (log_p - teacher_logprobs.float())).sum(-1) * temperature**2
    vocab, k = log_p.shape[-1], teacher_index.shape[-1]
    log_q = teacher_logprobs.float()
    p_top = p.gather(-1, teacher_index)
    kl = (p * log_p).sum(-1) - (p_top * log_q).sum(-1)
    if k < vocab:
        rest = (1 - log_q.exp().sum(-1)).clamp_min(1e-12)
        kl = kl - (1 - p_top.sum(-1)).clamp_min(0) * torch.log(rest / (vocab - k))
    return kl * temperature**2


@recomputed
def crt_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Contrastive response tuning, ``-log softmax(logits_pos - logits_neg)[target]`` per token.

    ``pos_logits`` come from the correct image, ``neg_logits`` from a mismatched image with the
    same teacher-forced response. The loss is low when the correct image makes the response
    token more likely *relative to* the wrong image than any other vocabulary entry. No margin;
    gradients flow through both branches.
    """
    if pos_logits.shape != neg_logits.shape:
        raise ValueError(
            f"positive {tuple(pos_logits.shape)} and negative {tuple(neg_logits.shape)} logits differ"
        )
    return F.cross_entropy(pos_logits.float() - neg_logits.float(), targets, reduction="none")


def reduce_tokens(
    per_token: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over tokens divided by ``num_items_in_batch`` (all response tokens of the accumulated
    batch, as the ``Trainer`` counts them), or the plain mean when it is ``None``.

    An empty selection gives a zero that still carries a graph, so a micro-batch without a
    valid token (e.g. no contrastive negative) does not break ``backward``.
    """
    if num_items_in_batch is None:
        return per_token.sum() / max(per_token.numel(), 1)
    return per_token.sum() / num_items_in_batch
