"""The fused pass modes (shared image prefix, stacked passes) give the reference's logits and gradients."""

import pytest
import torch

from hf_vitask.data.collator import VITaskCollator
from hf_vitask.models.head import output_layer
from hf_vitask.models.passes import run_passes
from tests.test_families import _assert_deferred_head_matches_logits, _losses, _model


def _batch(processor, task, tsm, digits, n=6, dataset_top_up=True):
    collator = VITaskCollator(
        processor,
        task,
        tsm=tsm,
        with_negatives=True,
        negatives_dataset=digits["train"] if dataset_top_up else None,
        seed=1,
    )
    rows = [digits["train"][i] for i in range(n)]
    rows[1] = dict(rows[1], label=rows[0]["label"])  # some rows share a class
    return collator(rows)


@pytest.mark.parametrize("mode", ["batch", "prefix"])
def test_fused_passes_equal_the_separate_passes(family, tsm, digits, task, mode):
    model, processor = _model(family, tsm)
    batch = _batch(processor, task, tsm, digits)
    assert (batch["crt_negative_index"] >= 0).sum() >= 2
    ref_passes, ref_losses, ref_grads = _losses(model, batch, "none")
    passes, losses, grads = _losses(model, batch, mode)
    assert passes.mode == mode
    for name in ("plain", "ep", "negative"):
        ref, got = getattr(ref_passes, name), getattr(passes, name)
        assert torch.equal(ref.response_targets, got.response_targets), name
        torch.testing.assert_close(got.response_logits, ref.response_logits, atol=2e-5, rtol=1e-4)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    assert (
        set(grads) == set(ref_grads)
        and any("lora" in n for n in grads)
        and any("connector" in n for n in grads)
    )
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_rows_without_a_negative_are_left_out(tsm, digits, task):
    model, processor = _model("llava", tsm)
    batch = _batch(processor, task, tsm, digits, n=4, dataset_top_up=False)
    batch["crt_negative_index"] = torch.tensor([-1, 2, -1, 0])
    for mode in ("none", "batch", "prefix"):
        _, losses, _ = _losses(model, batch, mode)
        passes = run_passes(
            model,
            {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")},
            negative_index=torch.tensor([-1, -1, -1, -1]),
            mode=mode,
        )
        assert passes.negative.response_logits.shape[0] == 0 and passes.ep is None


def test_prefix_stays_under_gradient_checkpointing(tsm, digits, task):
    """The shared prefix keeps its KV cache through checkpointed layers (no fallback to stacking),
    and the checkpointed step gives the separate passes' losses."""
    model, processor = _model("llava", tsm)
    batch = _batch(processor, task, tsm, digits, n=4)
    model.gradient_checkpointing_enable()
    passes, losses, _ = _losses(model, batch, "prefix")
    assert passes.mode == "prefix"
    model.gradient_checkpointing_disable()
    _, ref, _ = _losses(model, batch, "none")
    assert losses == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_unknown_mode_is_an_error(tsm, digits, task):
    model, processor = _model("llava", tsm)
    with pytest.raises(ValueError, match="pass mode"):
        run_passes(model, _batch(processor, task, tsm, digits, n=2), mode="fast")


@pytest.mark.parametrize("name", ["paligemma", "gemma3"])
def test_a_soft_capped_output_layer_is_capped_as_the_model_caps_it(name, tsm, task, digits):
    """A text config with ``final_logit_softcapping``: PaliGemma's forward caps its logits (the fused
    loss caps them once, not the hidden states as well), Gemma 3's vision model never does (the
    fused loss must not either)."""
    model, processor = _model(name, tsm)
    model.vlm.config.get_text_config().final_logit_softcapping = 2.0
    assert (output_layer(model.vlm, model.family).softcap is not None) == (name == "paligemma")
    _assert_deferred_head_matches_logits(model, processor, name, tsm, task, digits)
    assert model.vlm.config.get_text_config().final_logit_softcapping == 2.0  # restored after each pass
