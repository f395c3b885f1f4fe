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
        kl = kl - (1 - p_top.sum(-1)).clamp_min(0) * tail_logprob(log_q, vocab)
    return kl * temperature**2


def tail_logprob(topk_logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(N,)`` log-probability of each token outside a ``(N, k)`` top-k: the mass the top-k leave,
    spread evenly over the other ``vocab - k`` tokens (how a top-k teacher cache stands in for the rest)."""
    rest = (1 - topk_logprobs.exp().sum(-1)).clamp_min(1e-12)
    return torch.log(rest / (vocab - topk_logprobs.shape[-1]))


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


# -- the output layer and the VITask losses in one pass over the vocabulary ----------------------------
#: Logit elements (tokens x vocabulary) one chunk of :func:`fused_head_losses` holds at a time: 4M
#: float32 values, 16 MB per temporary (27 response tokens at a 152k vocabulary).
HEAD_CHUNK_ELEMENTS = 1 << 22


def _head(hidden: torch.Tensor, weight: torch.Tensor, bias, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _picked(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets[:, None])[:, 0]


def _minus_onehot(grad: torch.Tensor, targets: torch.Tensor, c: float) -> torch.Tensor:
    """``grad - c * onehot(targets)``, in place: with ``grad = c * softmax`` the gradient of ``c * CE``."""
    grad[torch.arange(len(targets), device=targets.device), targets] -= c
    return grad


class _FusedHeadLosses(torch.autograd.Function):
    """Forward computes the losses and, when a gradient is needed, the gradient of their weighted sum
    with respect to every input, one chunk of tokens at a time; backward only scales them. Nothing of
    vocabulary size outlives a chunk (the same trick as Liger's fused linear cross-entropy), and each
    pass's softmax is computed once for every term that reads it."""

    @staticmethod
    def forward(
        ctx, weight, bias, student, teacher, negative, teacher_logprobs, teacher_index, targets, keep, options
    ):
        c = options["coefficients"]
        temperature, softcap, detach = options["temperature"], options["softcap"], options["detach_teacher"]
        c_van, c_ep, c_rda, c_crt = (c.get(k, 0.0) for k in ("van", "ep", "rda", "crt"))
        rda = "rda" in c and (teacher is not None or teacher_logprobs is not None)
        grads = ctx.needs_input_grad
        want = any(grads[:5])
        n = student.shape[0]
        neg_pos = torch.cumsum(keep.long(), 0) - 1 if negative is not None else None
        terms = {"van": student.new_zeros(n, dtype=torch.float32)}
        if teacher is not None:
            terms["ep"] = torch.zeros_like(terms["van"])
        if rda:
            terms["rda"] = torch.zeros_like(terms["van"])
        if negative is not None:
            terms["crt"] = student.new_zeros(negative.shape[0], dtype=torch.float32)
        d_student = torch.zeros_like(student) if want else None
        d_teacher = torch.zeros_like(teacher) if want and teacher is not None else None
        d_negative = torch.zeros_like(negative) if want and negative is not None else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if grads[0] else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if grads[1] else None
        step = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])

        for a in range(0, n, step):
            rows = slice(a, min(a + step, n))
            y = targets[rows]
            # the passes' hidden states of this chunk through the layer in ONE product (the weight is
            # read once), and their logit gradients back through it in one more
            hidden = [student[rows]]
            if teacher is not None:
                hidden.append(teacher[rows])
            kept = keep[rows] if negative is not None else None
            if kept is not None and kept.any():
                every = bool(kept.all())
                at = neg_pos[rows][kept]
                hidden.append(negative[at])
            else:
                kept = None
            hidden = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
            z = _head(hidden, weight, bias, softcap)
            dz = torch.empty_like(z) if want else None
            sizes = [rows.stop - rows.start] * (1 + (teacher is not None))
            if kept is not None:
                sizes.append(len(at))
            zs, zt, zn = _passes(z, sizes, teacher is not None, kept is not None)
            dzs, dzt, dzn = _passes(dz, sizes, teacher is not None, kept is not None)
            # the log-softmaxes overwrite the logits (a log-softmax of the CRT margin or at another
            # temperature is the same from them: it ignores a per-row shift), and the student's
            # softmax is written straight into its gradient block: no further (C, V) buffer per pass
            lse_s = _log_softmax_(zs)
            logp_s = zs
            terms["van"][rows] = -_picked(logp_s, y)
            p_s = torch.exp(logp_s, out=dzs) if want else logp_s.exp()
            if teacher is not None:
                lse_t = _log_softmax_(zt)
                logp_t = zt
                terms["ep"][rows] = -_picked(logp_t, y)
                if want:
                    _minus_onehot(torch.exp(logp_t, out=dzt).mul_(c_ep), y, c_ep)
            if rda:
                if temperature == 1:
                    log_p, p = logp_s, p_s
                else:
                    log_p, p = _softmaxes(logp_s / temperature)
                if teacher_index is not None:  # top-k: the rest of the mass spread evenly (rda_kl_cached)
                    log_q = _dense_topk(teacher_logprobs[rows].float(), teacher_index[rows], weight.shape[0])
                elif teacher_logprobs is not None:
                    log_q = teacher_logprobs[rows].float()
                else:
                    log_q = logp_t if temperature == 1 else torch.log_softmax(logp_t / temperature, -1)
                gap = log_p - log_q
                kl = torch.bmm(p[:, None, :], gap[:, :, None]).flatten()  # sum(p * gap), no (C, V) product
                terms["rda"][rows] = kl * temperature**2
                if want:
                    if teacher is not None and teacher_logprobs is None and not detach:
                        dzt.add_((log_q.exp() - p).mul_(c_rda * temperature))
                    # d/d(student) of c_van * CE + c_rda * T^2 * KL: p_s * c_van + p * (gap - kl) * c_rda * T
                    gap.sub_(kl[:, None]).mul_(c_rda * temperature)
                    if temperature == 1:
                        dzs.mul_(gap.add_(c_van))  # dzs holds p_s = p
                    else:
                        dzs.mul_(c_van).add_(gap.mul_(p))
                del gap, log_p, p, log_q
            elif want:
                dzs.mul_(c_van)
            del p_s
            if want:
                _minus_onehot(dzs, y, c_van)
            if kept is not None:
                log_m = (logp_s if every else logp_s[kept]) - zn
                _log_softmax_(log_m)
                terms["crt"][at] = -_picked(log_m, y[kept])
                if want:  # d/d(student) = c * (softmax(margin) - onehot) = -d/d(negative)
                    _minus_onehot(torch.exp(log_m, out=dzn).mul_(c_crt), y[kept], c_crt)
                    if every:
                        dzs.add_(dzn)
                    else:
                        dzs[kept] += dzn
                    dzn.neg_()
                del log_m
            if softcap is not None and want:  # the capped logits back, for the derivative of the cap
                zs.add_(lse_s)
                if teacher is not None:
                    zt.add_(lse_t)
            if want:
                if softcap is not None:
                    dz.mul_(1 - (z / softcap) ** 2)
                del z
                dz = dz.to(weight.dtype)
                d_hidden = (dz @ weight).split(sizes)
                d_student[rows] = d_hidden[0].to(d_student.dtype)
                if teacher is not None:
                    d_teacher[rows] = d_hidden[1].to(d_teacher.dtype)
                if kept is not None:
                    d_negative[at] = d_hidden[-1].to(d_negative.dtype)
                if d_weight is not None:
                    d_weight.add_(dz.t().float() @ hidden.to(weight.dtype).float())
                if d_bias is not None:
                    d_bias.add_(dz.float().sum(0))
        total = sum(c.get(k, 0.0) * v.sum() for k, v in terms.items())
        total = torch.as_tensor(total, dtype=torch.float32, device=student.device)
        ctx.save_for_backward(d_weight, d_bias, d_student, d_teacher, d_negative)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        per_token = tuple(terms.get(k) for k in ("van", "ep", "rda", "crt"))
        ctx.mark_non_differentiable(*[t for t in per_token if t is not None])
        return (total, *per_token)

    @staticmethod
    def backward(ctx, grad_total, *_):
        d_weight, d_bias, d_student, d_teacher, d_negative = ctx.saved_tensors

        def scaled(t, dtype=None):
            if t is None:
                return None
            out = t * grad_total.to(t.dtype)
            return out if dtype is None else out.to(dtype)

        return (
            scaled(d_weight, ctx.dtypes[0]),
            scaled(d_bias, ctx.dtypes[1]),
            scaled(d_student),
            scaled(d_teacher),
            scaled(d_negative),
            None,
            None,
            None,
            None,
            None,
        )


def _dense_topk(values: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(C, V)`` log-probabilities from a top-k ``(C, k)``: the k given, and the mass left
    (``1 - sum(exp(values))``) spread evenly over the other ``V - k`` tokens. The KL against it is
    :func:`rda_kl_cached`'s: ``sum_v p_v (log p_v - l_v)`` splits into its top-k and rest terms."""
    if index.shape[-1] >= vocab:
        return values.new_empty(values.shape[0], vocab).scatter_(1, index, values)
    return tail_logprob(values, vocab)[:, None].expand(-1, vocab).clone().scatter_(1, index, values)


def _passes(stacked: torch.Tensor | None, sizes: list[int], teacher: bool, negative: bool) -> tuple:
    """(student, teacher, negative) row blocks of a stacked chunk (None for a pass that is absent)."""
    if stacked is None:
        return None, None, None
    blocks = list(stacked.split(sizes))
    student = blocks.pop(0)
    return student, blocks.pop(0) if teacher else None, blocks.pop(0) if negative else None


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` -> their log-softmax, in place; returns the per-row log-sum-exp that was subtracted."""
    lse = torch.logsumexp(logits, -1, keepdim=True)
    logits.sub_(lse)
    return lse


def _softmaxes(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(logits, -1)
    return log_p, log_p.exp()


def fused_head_losses(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    student: torch.Tensor,
    targets: torch.Tensor,
    coefficients: dict[str, float],
    *,
    teacher: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_index: torch.Tensor | None = None,
    negative: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    temperature: float = 1.0,
    detach_teacher: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output layer and the VITask losses together, from final hidden states at response tokens.

    Equal to applying the output layer (``logits = hidden @ weight.T + bias``, then ``softcap *
    tanh(logits / softcap)`` when the model soft-caps its logits) and then :func:`token_ce` (``van``
    on the student, ``ep`` on the teacher), :func:`rda_kl` (or :func:`rda_kl_cached` against
    ``teacher_logprobs``, all of them or the top-k) and :func:`crt_loss` (student rows where ``keep`` is True vs ``negative``),
    but no ``(N, V)`` tensor is kept for backward and each pass's log-softmax is computed once and
    shared by every loss that reads it. At a 152k vocabulary the logits of a stage-2 step are most
    of its memory.

    Args:
        weight, bias: the output layer (``bias`` may be None).
        student: ``(N, H)`` hidden states of the no-EP pass at the response tokens (see
            :func:`response_logits` for the order); ``targets``: their ``(N,)`` next tokens.
        coefficients: the factor of each term in the returned total, e.g.
            ``{"van": w / num_tokens, ...}``; a term without one (or 0) is computed but not learnt.
        teacher: ``(N, H)`` hidden states of the EP pass (gives ``ep`` and, as the RDA teacher, ``rda``).
        teacher_logprobs: ``(N, V)`` teacher log-probabilities at ``temperature`` instead (a frozen or
            cached teacher), detached; with ``teacher_index`` ``(N, k)``, the teacher's top-k
            log-probabilities at those vocabulary ids (the KL of :func:`rda_kl_cached`).
        negative, keep: ``(M, H)`` hidden states of the CRT negative pass and the ``(N,)`` mask of the
            student tokens they pair with (``M = keep.sum()``).
        detach_teacher: False lets the RDA gradient reach the teacher (ablation control).

    Returns:
        ``(total, terms)``: the differentiable ``sum_k coefficients[k] * terms[k].sum()`` and the
        per-token values of each term (``van``, and ``ep``, ``rda``, ``crt`` when computed), detached.
    """
    if negative is not None:
        if keep is None or int(keep.sum()) != negative.shape[0]:
            raise ValueError("negative hidden states need keep, one True per negative token")
    else:
        keep = targets.new_zeros(targets.shape, dtype=torch.bool)
    options = {
        "coefficients": {k: float(v) for k, v in coefficients.items()},
        "temperature": float(temperature),
        "softcap": softcap,
        "detach_teacher": detach_teacher,
    }
    if teacher_index is not None and (
        teacher_logprobs is None or teacher_index.shape != teacher_logprobs.shape
    ):
        raise ValueError("teacher_index needs teacher_logprobs of the same (N, k) shape")
    total, *per_token = _FusedHeadLosses.apply(
        weight, bias, student, teacher, negative, teacher_logprobs, teacher_index, targets, keep, options
    )
    names = ("van", "ep", "rda", "crt")
    return total, {k: v for k, v in zip(names, per_token) if v is not None}
