"""Option scoring on a shared prompt: every response of an image packed into one continuation row
of the prompt's KV cache (block-diagonal mask, positions restarting per response) scores exactly
what full sequences score, on every family, with and without the exemplar."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from hf_vitask.data.collator import VITaskCollator
from hf_vitask.evaluation import score_options
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.models import families, passes
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tiny import TINY_FAMILIES, build_tiny_vlm
from hf_vitask.task import TaskSpec

# class names of 1, 2 and 4 words: responses of different token lengths packed side by side
TASK = TaskSpec(class_names=["seven", "red fox", "a big brown dog"], response_template="{label}")


def _model(name, tsm, attention="sdpa", **build):
    vlm, processor = build_tiny_vlm(name, seed=0, **build)
    if attention != "sdpa":
        vlm.set_attn_implementation(attention)
    with torch.no_grad():  # a non-trivial output layer, so the class scores differ
        vlm.get_output_embeddings().weight.normal_(0, 0.5)
    return VITaskModel.from_vlm(vlm, processor, tsm=tsm), processor


def _score(model, processor, images, monkeypatch, use_tsm=False):
    """Shared-prompt and full-sequence scores, and which shared form ran (with its VLM forwards)."""
    ran = {"packed": 0, "copied": 0, "forwards": 0}
    for form in ("packed", "copied"):
        real = getattr(passes, f"_{form}_option_scores")

        def spy(*args, _real=real, _form=form, **kwargs):
            ran[_form] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(passes, f"_{form}_option_scores", spy)
    handle = model.vlm.register_forward_pre_hook(lambda *_: ran.__setitem__("forwards", ran["forwards"] + 1))
    try:
        shared = score_options(model, processor, TASK, images, use_tsm=use_tsm, batch_size=len(images))
    finally:
        handle.remove()
    full = score_options(model, processor, TASK, images, use_tsm=use_tsm, shared_prompt=False)
    return shared, full, ran


@pytest.mark.parametrize("use_tsm", [False, True])
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_packed_options_equal_full_sequences(name, use_tsm, tsm, digits, monkeypatch):
    model, processor = _model(name, tsm)
    images = digits["test"]["image"][:3]
    labels = VITaskCollator(processor, TASK)([{"image": images[0], "label": c} for c in range(3)])["labels"]
    lengths = (labels != IGNORE_INDEX).sum(1).tolist()
    assert len(set(lengths)) == 3, lengths  # three different response lengths
    shared, full, ran = _score(model, processor, images, monkeypatch, use_tsm)
    # one prompt forward, one forward of all the responses, and no per-response copy of the cache
    assert ran == {"packed": 1, "copied": 0, "forwards": 2}
    assert shared.shape == (3, 3) and shared.std() > 0.1
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3", "mllama"])
def test_packed_options_take_an_additive_mask_under_eager_attention(name, tsm, digits, monkeypatch):
    model, processor = _model(name, tsm, attention="eager")
    shared, full, ran = _score(model, processor, digits["test"]["image"][:3], monkeypatch, use_tsm=True)
    assert ran["packed"] == 1 and ran["copied"] == 0
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_into_the_prompt_gets_one_mask_per_layer_type(tsm, digits, monkeypatch, caplog):
    """Tiny Gemma 3 with 6 layers: 5 with a 16-token window (shorter than the prompt), 1 global.
    The packed form hands the decoder a window mask and a full mask; a family without
    ``layer_type_masks`` copies the cache per response instead. Both equal full sequences."""
    model, processor = _model("gemma3", tsm, num_layers=6)
    config = model.vlm.config.get_text_config()
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    masks = []
    real = passes._packed_option_masks
    monkeypatch.setattr(passes, "_packed_option_masks", lambda *a: masks.append(real(*a)) or masks[-1])
    images = digits["test"]["image"][:3]
    shared, full, ran = _score(model, processor, images, monkeypatch)
    assert ran["packed"] == 1 and set(masks[0]) == {"full_attention", "sliding_attention"}
    sliding, whole = masks[0]["sliding_attention"], masks[0]["full_attention"]
    assert sliding.shape[-1] == config.sliding_window - 1 + sliding.shape[-2] < whole.shape[-1]
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)

    monkeypatch.setattr(
        model, "family", dataclasses.replace(families.get_family("gemma3"), layer_type_masks=False)
    )
    monkeypatch.setattr(passes, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=passes.__name__):
        copied, _, ran = _score(model, processor, images, monkeypatch)
    assert ran["packed"] == 0 and ran["copied"] == 1
    assert "copies the prompt's KV cache per response" in caplog.text
    torch.testing.assert_close(copied, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "mllama"])
def test_attention_without_custom_masks_copies_the_cache_per_option(name, tsm, digits, monkeypatch):
    """Flash kernels take no 4-D mask: the per-response copies of the prompt's cache, still exact."""
    model, processor = _model(name, tsm)
    monkeypatch.setattr(passes, "_MASKED_ATTENTION", ("eager",))
    shared, full, ran = _score(model, processor, digits["test"]["image"][:3], monkeypatch, use_tsm=True)
    assert ran == {"packed": 0, "copied": 1, "forwards": 2}
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
