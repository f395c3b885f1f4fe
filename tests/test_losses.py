"""The VITask losses against numbers worked out by hand."""

import math

import pytest
import torch

from hf_vitask.losses import (
    crt_loss,
    rda_kl,
    rda_kl_cached,
    reduce_tokens,
    response_logits,
    response_row_ids,
    token_ce,
)


def test_response_logits_shifts_and_masks():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    labels = torch.tensor([[-100, -100, 2, 1], [-100, 0, -100, -100]])
    resp, targets = response_logits(logits, labels)
    # row 0: positions 1 and 2 predict labels 2 and 1; row 1: position 0 predicts label 0
    assert targets.tolist() == [2, 1, 0]
    assert torch.equal(resp, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    assert response_row_ids(labels).tolist() == [0, 0, 1]


def test_response_logits_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="disagree"):
        response_logits(torch.zeros(1, 5, 3), torch.zeros(1, 4, dtype=torch.long))


def test_token_ce_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    ce = token_ce(logits, torch.tensor([1, 0]))
    assert ce.tolist() == pytest.approx([-math.log(0.75), -math.log(0.25)], abs=1e-6)


def test_rda_kl_is_student_first():
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)  # p = [1/2, 1/2]
    teacher = torch.tensor([[math.log(3), 0.0]], requires_grad=True)  # q = [3/4, 1/4]
    kl = rda_kl(student, teacher)
    kl_p_q = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.1438
    kl_q_p = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308
    assert kl.item() == pytest.approx(kl_p_q, abs=1e-6)
    assert abs(kl.item() - kl_q_p) > 1e-2  # the other direction is a different number
    kl.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # stop-gradient on the teacher


def test_rda_kl_temperature_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3), 0.0]])
    t = 2.0
    q1 = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln3 / 2, 0])
    expected = (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))) * t**2
    assert rda_kl(student, teacher, temperature=t).item() == pytest.approx(expected, abs=1e-6)


def test_rda_kl_zero_for_identical():
    x = torch.randn(5, 7)
    assert torch.allclose(rda_kl(x, x.clone()), torch.zeros(5), atol=1e-6)


def test_rda_kl_stops_the_gradient_at_the_teacher_unless_asked_not_to():
    student = torch.randn(3, 7, requires_grad=True)
    teacher = torch.randn(3, 7, requires_grad=True)
    rda_kl(student, teacher).sum().backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    control = rda_kl(student, teacher, detach=False)
    torch.testing.assert_close(control, rda_kl(student, teacher))  # same value ...
    control.sum().backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0  # ... but the teacher is trained too


def test_crt_by_hand():
    pos = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    neg = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    loss = crt_loss(pos, neg, torch.tensor([0]))
    # softmax over pos - neg = [1, 0, -1], target 0
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    assert neg.grad is not None and neg.grad.abs().sum() > 0  # gradient through the negative branch


def test_crt_ignores_shared_shift():
    """Adding the same logits to both branches changes nothing: only the difference matters."""
    pos, neg, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    shift = torch.randn(4, 6)
    assert torch.allclose(crt_loss(pos + shift, neg + shift, y), crt_loss(pos, neg, y), atol=1e-5)


def test_reduce_tokens():
    per_token = torch.tensor([1.0, 2.0, 3.0])
    assert reduce_tokens(per_token).item() == pytest.approx(2.0)
    assert reduce_tokens(per_token, num_items_in_batch=6).item() == pytest.approx(1.0)
    assert reduce_tokens(per_token, num_items_in_batch=torch.tensor(12)).item() == pytest.approx(0.5)
    empty = torch.zeros(0, requires_grad=True)
    out = reduce_tokens(empty)
    out.backward()
    assert out.item() == 0.0


def test_response_cross_entropy_matches_manual():
    """The SFT loss as the model computes it: response logits, token CE, reduced over the tokens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    manual = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 1], logits[0, 2], logits[0, 3], logits[1, 0], logits[1, 1]]),
        torch.tensor([3, 4, 5, 7, 8]),
    )
    per_token = token_ce(*response_logits(logits, labels))
    assert reduce_tokens(per_token).item() == pytest.approx(manual.item(), abs=1e-6)
    assert reduce_tokens(per_token, num_items_in_batch=10).item() == pytest.approx(
        manual.item() / 2, abs=1e-6
    )


def test_rda_kl_cached_full_distribution_equals_rda_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    for t in (1.0, 2.0):
        logq = torch.log_softmax(teacher / t, dim=-1)
        torch.testing.assert_close(rda_kl_cached(student, logq, None, t), rda_kl(student, teacher, t))
        values, index = logq.topk(11, dim=-1)  # k = V: the sparse form is exact too
        torch.testing.assert_close(rda_kl_cached(student, values, index, t), rda_kl(student, teacher, t))


def test_rda_kl_cached_topk_spreads_the_rest_evenly():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    logq = torch.log_softmax(teacher, dim=-1)
    values, index = logq.topk(3, dim=-1)
    # the distribution the top-k form stands for: the top 3 kept, the remaining mass split over 6 tokens
    rest = (1 - values.exp().sum(-1, keepdim=True)) / 6
    approx = torch.full_like(logq, 0).copy_(rest.expand(-1, 9)).scatter(-1, index, values.exp())
    expected = rda_kl(student, approx.log())
    got = rda_kl_cached(student, values, index)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # a peaked teacher and a student near it (late in training) lose (almost) nothing with a small k
    peaked = teacher * 20
    near = peaked + 0.3 * torch.randn_like(peaked)
    values, index = torch.log_softmax(peaked, dim=-1).topk(2, dim=-1)
    torch.testing.assert_close(rda_kl_cached(near, values, index), rda_kl(near, peaked), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("name", ["token_ce", "rda_kl", "rda_kl_cached", "crt_loss"])
def test_losses_keep_only_their_inputs_for_backward_and_give_the_same_gradients(name):
    """The (N, V) intermediates are recomputed in backward: autograd stores nothing beyond the
    inputs, and values and gradients equal the plain computation's."""
    from hf_vitask import losses

    torch.manual_seed(0)
    student = torch.randn(6, 500, requires_grad=True)
    other = torch.randn(6, 500, requires_grad=name == "crt_loss")
    targets = torch.randint(0, 500, (6,))
    args = {
        "token_ce": (student, targets),
        "rda_kl": (student, other),
        "rda_kl_cached": (student, torch.log_softmax(other, -1)),
        "crt_loss": (student, other, targets),
    }[name]
    fn = getattr(losses, name)
    inputs = {t.untyped_storage().data_ptr() for t in args}
    saved: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in inputs:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn(*args)
    assert sum(saved.values()) < 6 * 500 * 4  # less than one (N, V) float tensor
    (grad,) = torch.autograd.grad(value.sum(), student)
    plain = fn.__wrapped__(*args)
    (want,) = torch.autograd.grad(plain.sum(), student)
    torch.testing.assert_close(value, plain)
    torch.testing.assert_close(grad, want)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        fn.__wrapped__(*args)
    assert sum(saved.values()) >= 6 * 500 * 4  # the plain computation stores at least one


# -- the fused output layer + losses ---------------------------------------------------------------------
def _reference_head_losses(weight, bias, student, targets, coefficients, *, teacher=None, teacher_logprobs=None,
                           teacher_index=None, negative=None, keep=None, temperature=1.0, detach_teacher=True,
                           softcap=None):  # fmt: skip
    """The unfused path: logits first, then the per-token losses of this module."""

    def head(h):
        z = torch.nn.functional.linear(h, weight, bias)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    zs = head(student)
    terms = {"van": token_ce(zs, targets)}
    if teacher is not None:
        zt = head(teacher)
        terms["ep"] = token_ce(zt, targets)
    if "rda" in coefficients:
        if teacher_logprobs is not None:
            terms["rda"] = rda_kl_cached(zs, teacher_logprobs, teacher_index, temperature)
        else:
            terms["rda"] = rda_kl(zs, zt, temperature, detach=detach_teacher)
    if negative is not None:
        terms["crt"] = crt_loss(zs[keep], head(negative), targets[keep])
    total = sum(coefficients.get(k, 0.0) * v.sum() for k, v in terms.items())
    return total, terms


FUSED_CASES = {
    "stage 2 (self teacher, CRT)": dict(teacher=True, negative=True, coefficients=dict(van=1.0, ep=0.5, rda=0.7, crt=0.3)),
    "temperature, undetached teacher, bias": dict(teacher=True, bias=True, temperature=2.0, detach_teacher=False,
                                                  coefficients=dict(van=0.2, ep=1.0, rda=1.3)),
    "soft-capped logits, trained output layer": dict(teacher=True, negative=True, softcap=3.0, train_weight=True,
                                                     coefficients=dict(van=1.0, ep=1.0, rda=1.0, crt=1.0)),
    "given teacher log-probs": dict(teacher_logprobs=True, temperature=1.5, coefficients=dict(van=1.0, rda=2.0)),
    "vanilla": dict(coefficients=dict(van=1.0)),
    "undetached teacher at temperature 1": dict(teacher=True, negative=True, detach_teacher=False,
                                                coefficients=dict(van=0.4, ep=1.0, rda=0.9, crt=0.6)),
    "given teacher log-probs at temperature 1, CRT": dict(teacher_logprobs=True, negative=True,
                                                          coefficients=dict(van=1.0, rda=0.5, crt=2.0)),
    "top-k teacher log-probs, CRT": dict(teacher_topk=7, negative=True, coefficients=dict(van=1.0, rda=1.5, crt=0.5)),
    "top-k teacher log-probs, temperature 2": dict(teacher_topk=7, temperature=2.0, coefficients=dict(van=0.5, rda=1.0)),
    "top-k teacher, every token kept": dict(teacher_topk=50, coefficients=dict(van=1.0, rda=1.0)),
    "soft-capped, temperature 2": dict(teacher=True, softcap=2.0, temperature=2.0,
                                       coefficients=dict(van=1.0, ep=0.3, rda=1.0)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_head_losses_equal_the_logits_path_in_values_and_gradients(case, monkeypatch):
    import hf_vitask.losses as losses

    spec = dict(FUSED_CASES[case])
    monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS", 3 * 50)  # 3 tokens a chunk: chunk edges are crossed
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 11, 8, 50
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_(
        spec.pop("train_weight", False)
    )
    bias = (
        torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_()
        if spec.pop("bias", False)
        else None
    )
    targets = torch.randint(vocab, (n,), generator=g)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True])
    inputs = {"student": torch.randn(n, hidden, generator=g, dtype=torch.float64, requires_grad=True)}
    if spec.pop("teacher", False):
        inputs["teacher"] = torch.randn(n, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    if spec.pop("negative", False):
        inputs["negative"] = torch.randn(
            int(keep.sum()), hidden, generator=g, dtype=torch.float64, requires_grad=True
        )
        spec["keep"] = keep
    if spec.pop("teacher_logprobs", False):
        spec["teacher_logprobs"] = torch.randn(n, vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    if "teacher_topk" in spec:  # a peaked teacher's top-k, as the teacher cache stores it
        full = (3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).log_softmax(-1)
        spec["teacher_logprobs"], spec["teacher_index"] = full.topk(spec.pop("teacher_topk"), dim=-1)
    coefficients = spec.pop("coefficients")

    def run(fn):
        given = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        w = weight.detach().clone().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().clone().requires_grad_()
        total, terms = fn(
            w,
            b,
            given["student"],
            targets,
            coefficients,
            **{k: v for k, v in given.items() if k != "student"},
            **spec,
        )
        (2.5 * total).backward()
        grads = {k: v.grad for k, v in given.items()} | {
            "weight": w.grad,
            "bias": None if b is None else b.grad,
        }
        return total.detach(), {k: v.detach() for k, v in terms.items()}, grads

    fused, reference = run(losses.fused_head_losses), run(_reference_head_losses)
    with torch.no_grad():  # evaluation: the same values without computing any gradient
        total, terms = losses.fused_head_losses(
            weight, bias, inputs["student"], targets, coefficients,
            **{k: v for k, v in inputs.items() if k != "student"}, **spec,
        )  # fmt: skip
    torch.testing.assert_close(total, fused[0])
    assert all(torch.equal(terms[k], fused[1][k]) for k in terms) and sorted(terms) == sorted(fused[1])
    torch.testing.assert_close(fused[0], reference[0].to(fused[0].dtype), rtol=1e-5, atol=1e-6)
    assert sorted(fused[1]) == sorted(reference[1])
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name].float(), rtol=1e-5, atol=1e-6)
    for name, grad in reference[2].items():
        if grad is None:
            assert fused[2][name] is None, name
        else:
            torch.testing.assert_close(
                fused[2][name].double(), grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )


def test_fused_head_losses_keep_nothing_of_vocabulary_size_for_backward():
    from hf_vitask.losses import fused_head_losses

    n, hidden, vocab = 16, 8, 4096
    weight = torch.randn(vocab, hidden)
    student, teacher = (torch.randn(n, hidden, requires_grad=True) for _ in range(2))
    targets = torch.randint(vocab, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        total, _ = fused_head_losses(
            weight, None, student, targets, dict(van=1.0, ep=1.0, rda=1.0), teacher=teacher
        )
    assert saved and max(saved) <= n * hidden  # hidden-sized gradients only, never (N, V)
    total.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
