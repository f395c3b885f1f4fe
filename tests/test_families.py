"""The contract every supported VLM family meets, on its tiny random model.

Parametrised over every family with a tiny builder (``hf_vitask.models.tiny.TINY_FAMILIES``):
adding a family to that tuple runs all of this for it. Images of two sizes share a batch, so
families that tile images (InternVL) or size their grid by the image (Qwen2-VL) get rows with
different numbers of image tokens.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitask import (
    InstructionFreeConfig,
    InstructionFreeTrainer,
    VITaskConfig,
    VITaskTrainer,
    load_vitask,
    predict_classes,
    score_options,
)
from hf_vitask.config import PASS_MODES
from hf_vitask.data.collator import VITaskCollator
from hf_vitask.data.digits import add_digit_descriptions
from hf_vitask.evaluation import generate_answers
from hf_vitask.losses import IGNORE_INDEX, crt_loss, fused_head_losses, rda_kl, token_ce
from hf_vitask.models import passes as passes_module
from hf_vitask.models.checkpointing import checkpointed_layers
from hf_vitask.models.families import get_family
from hf_vitask.models.head import output_layer
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.passes import run_passes
from hf_vitask.models.tiny import TINY_FAMILIES, build_tiny_vlm
from hf_vitask.trainers.base import wrap_lora
from tests.conftest import LEARNING_RUN

pytestmark = pytest.mark.parametrize("name", TINY_FAMILIES)


def _image(seed: int, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _rows(digits, n=6, mixed=True):
    """Digit rows; with ``mixed`` every third image is 64x32 (another tile count / grid)."""
    rows = []
    for i in range(n):
        row = dict(digits["train"][i])
        if mixed and i % 3 == 1:
            row["image"] = row["image"].convert("RGB").resize((64, 32))
        rows.append(row)
    rows[1] = dict(rows[1], label=rows[0]["label"])  # two rows share a class
    return rows


def _model(name, tsm, dropout=0.0):
    vlm, processor = build_tiny_vlm(name, seed=0)
    args = VITaskConfig(output_dir="unused", lora_dropout=dropout, report_to="none")
    model = VITaskModel.from_vlm(wrap_lora(vlm, args), processor, tsm=tsm)
    with torch.no_grad():  # LoRA B starts at 0: make the adapter matter, so its gradients are compared too
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.05)
    return model.train(), processor


def _losses(model, batch, mode):
    batch = dict(batch)
    tsm_pixels = batch.pop("tsm_pixel_values")
    negative_index = batch.pop("crt_negative_index")
    batch.pop("class_ids")
    exemplar = model.exemplar_embeds(tsm_pixels)
    out = run_passes(model, batch, exemplar=exemplar, negative_index=negative_index, mode=mode)
    keep = (negative_index >= 0)[torch.nonzero(batch["labels"][:, 1:] != IGNORE_INDEX)[:, 0]]
    plain, ep, neg = out.plain, out.ep, out.negative
    terms = {
        "van": token_ce(plain.response_logits, plain.response_targets).mean(),
        "ep": token_ce(ep.response_logits, ep.response_targets).mean(),
        "rda": rda_kl(plain.response_logits, ep.response_logits).mean(),
        "crt": crt_loss(
            plain.response_logits[keep], neg.response_logits, plain.response_targets[keep]
        ).mean(),
    }
    model.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, {k: v.item() for k, v in terms.items()}, grads


def _assert_same(got, ref):
    (passes, losses, grads), (ref_passes, ref_losses, ref_grads) = got, ref
    for which in ("plain", "ep", "negative"):
        a, b = getattr(passes, which), getattr(ref_passes, which)
        assert torch.equal(a.response_targets, b.response_targets), which
        torch.testing.assert_close(a.response_logits, b.response_logits, atol=2e-5, rtol=1e-4)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    assert set(grads) == set(ref_grads)
    assert any("lora" in n for n in grads) and any("connector" in n for n in grads)
    for param_name, grad in ref_grads.items():
        torch.testing.assert_close(grads[param_name], grad, atol=1e-5, rtol=1e-3, msg=param_name)


# -- data ------------------------------------------------------------------------------------------------
def test_collator_masks_exactly_the_response(name, task, digits):
    _, processor = build_tiny_vlm(name)
    tok = processor.tokenizer
    rows = _rows(digits)
    batch = VITaskCollator(processor, task)(rows)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    family = get_family(name)
    for key in family.per_token_keys:
        assert batch[key].shape[:2] == ids.shape, key
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    for i, row in enumerate(rows):
        learnt = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        start, end = int(learnt[0]), int(learnt[-1]) + 1
        assert len(learnt) == end - start, "the learnt tokens are one block"
        assert torch.equal(labels[i, start:end], ids[i, start:end])
        assert end == int(mask[i].sum()), "the response runs to the end of the row"
        assert tok.decode(ids[i, start:end]).strip() == task.response(row["label"]) + tok.eos_token
        assert start > int((ids[i] == family.image_token_id(tok)).nonzero().max())


def test_a_negative_is_a_whole_image(name, tsm, task, digits):
    """Row i's text with ALL of row j's image (tiles, grid patches): what the processor makes of that pair."""
    model, processor = _model(name, tsm)
    collator = VITaskCollator(processor, task)
    rows = _rows(digits, n=3)
    batch = collator(rows)
    index = torch.tensor([1, 0, 1])
    negative = passes_module.negative_rows(model, batch, index, torch.arange(3))
    expected = collator([dict(rows[i], image=rows[int(j)]["image"]) for i, j in enumerate(index)])
    for key, value in negative.items():
        want = expected[key]
        if key in get_family(name).token_keys:  # the splice is padded like the processor pads
            width = min(value.shape[1], want.shape[1])
            assert torch.equal(value[:, :width], want[:, :width]), key
        else:
            assert torch.equal(value, want), key


# -- fused passes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [m for m in PASS_MODES if m != "none"])
@pytest.mark.parametrize("mixed", [False, True], ids=["same-size", "mixed-size"])
def test_fused_passes_equal_the_reference_or_fall_back_once(name, tsm, task, digits, mode, mixed, caplog):
    model, processor = _model(name, tsm)
    collator = VITaskCollator(processor, task, tsm=tsm, with_negatives=True, seed=1)
    batch = collator(_rows(digits, mixed=mixed))
    assert (batch["crt_negative_index"] >= 0).sum() >= 2
    reference = _losses(model, batch, "none")
    passes_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger=passes_module.__name__):
        got = _losses(model, batch, mode)
        _losses(model, batch, mode)
    warnings = [r for r in caplog.records if r.name == passes_module.__name__]
    family = get_family(name)
    if mode in family.fusion_modes and not (mode == "prefix" and mixed):
        assert got[0].mode == mode  # what the support matrix promises
    if got[0].mode == mode:
        assert not warnings
    else:
        assert len(warnings) == 1 and f"pass_fusion='{mode}'" in warnings[0].getMessage()
    _assert_same(got, reference)


@pytest.mark.parametrize("mixed", [False, True], ids=["same-size", "mixed-size"])
def test_gradient_checkpointing_keeps_the_fused_step_exact(name, tsm, task, digits, mixed):
    """Under activation checkpointing the shared prefix still runs once (its KV cache passes through
    the checkpointed layers), with the logits, losses and gradients of separate passes."""
    model, processor = _model(name, tsm)
    batch = VITaskCollator(processor, task, tsm=tsm, with_negatives=True, seed=1)(_rows(digits, mixed=mixed))
    reference = _losses(model, batch, "none")
    model.gradient_checkpointing_enable()
    try:
        got = _losses(model, batch, "prefix")
        layers = checkpointed_layers(model.vlm)
    finally:
        model.gradient_checkpointing_disable()
    assert layers, "checkpointing is on for the decoder layers"
    assert all(not layer.__dict__.get("_can_checkpoint_with_cache", False) for layer, _ in layers), (
        "left as it was"
    )
    if not mixed and "prefix" in get_family(name).fusion_modes:
        assert got[0].mode == "prefix"
    _assert_same(got, reference)


def test_the_deferred_output_layer_gives_the_losses_and_gradients_of_the_logits(name, tsm, task, digits):
    """The fused passes hand back final hidden states and fused_head_losses applies the output layer
    itself: the four terms and every gradient equal those of the separate passes' logits."""
    _assert_deferred_head_matches_logits(*_model(name, tsm), name, tsm, task, digits)


def _assert_deferred_head_matches_logits(model, processor, name, tsm, task, digits):
    batch = VITaskCollator(processor, task, tsm=tsm, with_negatives=True, seed=1)(_rows(digits, mixed=False))
    _, ref_losses, ref_grads = _losses(model, batch, "none")
    layer = output_layer(model.vlm, model.family)
    assert layer is not None, "every built-in family defers its output layer"
    batch = dict(batch)
    tsm_pixels, negative_index = batch.pop("tsm_pixel_values"), batch.pop("crt_negative_index")
    batch.pop("class_ids")
    out = run_passes(model, batch, exemplar=model.exemplar_embeds(tsm_pixels), negative_index=negative_index,
                     mode=get_family(name).fusion_modes[0], logits=False)  # fmt: skip
    assert out.plain.response_logits is None and out.plain.response_hidden is not None
    keep = (negative_index >= 0)[torch.nonzero(batch["labels"][:, 1:] != IGNORE_INDEX)[:, 0]]
    n, m = len(keep), int(keep.sum())
    model.zero_grad(set_to_none=True)
    total, terms = fused_head_losses(
        layer.weight, layer.bias, out.plain.response_hidden, out.plain.response_targets,
        {"van": 1 / n, "ep": 1 / n, "rda": 1 / n, "crt": 1 / m}, teacher=out.ep.response_hidden,
        negative=out.negative.response_hidden, keep=keep, softcap=layer.softcap,
    )  # fmt: skip
    total.backward()
    assert {k: v.mean().item() for k, v in terms.items()} == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for param_name, grad in ref_grads.items():
        torch.testing.assert_close(grads[param_name], grad, atol=1e-5, rtol=1e-3, msg=param_name)


# -- training, saving, scoring, generation ----------------------------------------------------------------
def _config(out, stage, steps, **kw):
    return VITaskConfig(**LEARNING_RUN, output_dir=str(out), stage=stage, max_steps=steps, **kw)


def _falls(values):
    k = max(len(values) // 4, 1)
    return sum(values[-k:]) / k < sum(values[:k]) / k


def test_train_save_load_score_generate(name, tmp_path, tsm, task, digits):
    vlm, processor = build_tiny_vlm(name, seed=0)
    train = digits["train"]
    stage1 = VITaskTrainer(
        model=vlm,
        args=_config(tmp_path / "s1", 1, 24),
        processing_class=processor,
        train_dataset=train,
        task=task,
        tsm=tsm,
    )
    stage1.train()
    losses = [e["loss"] for e in stage1.state.log_history if "loss" in e]
    assert len(losses) == 24 and _falls(losses), losses
    stage2 = VITaskTrainer(
        model=stage1.model,
        args=_config(tmp_path / "s2", 2, 24),
        processing_class=processor,
        train_dataset=train,
        task=task,
    )
    stage2.train()
    van = [e["loss_van"] for e in stage2.state.log_history if "loss_van" in e]
    assert len(van) == 24 and _falls(van), van
    assert len([e for e in stage2.state.log_history if "loss_crt" in e]) == 24

    images = [_image(0), _image(1, (64, 32)), *digits["test"]["image"][:2]]
    trained = stage2.model
    shared = score_options(trained, processor, task, images, batch_size=4)
    full = score_options(trained, processor, task, images, batch_size=4, shared_prompt=False)
    assert shared.shape == (4, task.num_classes) and shared.std() > 0
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)

    stage2.save_model(str(tmp_path / "final"))
    model, processor2, task2 = load_vitask(tmp_path / "final")
    assert model.family is get_family(name) and task2 == task
    for use_tsm in (False, True):
        torch.testing.assert_close(
            score_options(model, processor2, task2, images, use_tsm=use_tsm),
            score_options(trained, processor, task, images, use_tsm=use_tsm),
            atol=1e-4,
            rtol=1e-4,
        )
        # greedy answers too: the reloaded bundle answers as the trained model did
        answers = generate_answers(trained, processor, task, images, use_tsm=use_tsm)
        assert generate_answers(model, processor2, task2, images, use_tsm=use_tsm) == answers
        generated = predict_classes(model, processor2, task2, images, use_tsm=use_tsm, method="generate")
        assert generated == [task.parse(a) for a in answers]


def test_instruction_free_trains(name, tmp_path, digits):
    vlm, processor = build_tiny_vlm(name, seed=0)
    args = InstructionFreeConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        lora_r=4,
        lora_alpha=8,
        seed=0,
        disable_tqdm=True,
    )
    train = add_digit_descriptions(digits)["train"].select(range(8))
    trainer = InstructionFreeTrainer(model=vlm, args=args, processing_class=processor, train_dataset=train)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # the loss is the description cross-entropy; the second epoch over the same 8 rows is cheaper than the first
    # (seed 0: by 1.3% for PaliGemma, 1.6% for InternVL, 10% to 23% for the others)
    assert len(losses) == 4 and losses == pytest.approx(
        [e["loss_ce"] for e in trainer.state.log_history if "loss_ce" in e], rel=1e-5
    )
    assert losses[2] + losses[3] < 0.995 * (losses[0] + losses[1]), losses
    assert int(trainer.proxy.step) == 4


# -- 4-bit --------------------------------------------------------------------------------------------------
def test_4bit_keeps_vision_projector_and_head_unquantised(name):
    import bitsandbytes as bnb

    from hf_vitask.models.loading import load_vlm

    model, _ = load_vlm(f"tiny-{name}", load_in_4bit=True)
    family = get_family(name)
    modules = dict(model.named_modules())
    for kept in family.vision_modules:
        assert kept in modules, kept
        inside = [m for n, m in modules.items() if n == kept or n.startswith(kept + ".")]
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in inside), kept
    quantised = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(not any(n.startswith(k) for k in family.vision_modules) for n in quantised)


def test_lora_targets_the_text_decoder_only(name):
    from peft import LoraConfig, get_peft_model

    family = get_family(name)
    vlm, _ = build_tiny_vlm(name, num_layers=2)
    adapted = get_peft_model(vlm, LoraConfig(r=2, target_modules=family.lora_target_modules))
    targets = [n for n, m in adapted.named_modules() if hasattr(m, "lora_A")]
    layers = vlm.config.get_text_config().num_hidden_layers  # Mllama adds a cross-attention layer
    assert len(targets) == layers * 7  # q, k, v, o (self- or cross-attention), gate, up, down per layer
    assert not any(f".{kept}." in t for t in targets for kept in family.vision_modules)


def test_processor_renders_the_collators_batch_and_the_generation_prompt(name, digits, task, tsm):
    from hf_vitask.data.collator import build_prompts, generation_prompts
    from hf_vitask.processing import VITaskProcessor

    _, processor = build_tiny_vlm(name, seed=0)
    vp = VITaskProcessor(processor, task, tsm)
    rows = _rows(digits, n=3)
    images, labels = [r["image"] for r in rows], [r["label"] for r in rows]
    batch = vp(images=images, responses=labels)
    expected = VITaskCollator(processor, task, tsm=tsm)(rows)
    expected.pop("class_ids")
    assert sorted(batch) == sorted(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    for i, (image, label) in enumerate(zip(images, labels)):
        prompt = generation_prompts(processor, [image], [task.instruction()])["input_ids"][0]
        ids, row_labels = batch["input_ids"][i], batch["labels"][i]
        length = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :length].all()  # right padding
        assert torch.equal(ids[: len(prompt)], prompt)  # the training prompt is the generation prompt
        assert (row_labels[: len(prompt)] == IGNORE_INDEX).all()
        assert (row_labels[length:] == IGNORE_INDEX).all()
        assert torch.equal(row_labels[len(prompt) : length], ids[len(prompt) : length])
        learnt = processor.tokenizer.decode(ids[len(prompt) : length], skip_special_tokens=True)
        assert learnt.strip().startswith(task.response(label)), (learnt, task.response(label))
    inputs = vp(images=images)
    assert torch.equal(inputs.pop("tsm_pixel_values"), tsm.preprocess(images))
    prompts = build_prompts(processor, task, images)
    assert sorted(inputs) == sorted(prompts)
    for key in prompts:
        assert torch.equal(inputs[key], prompts[key]), key
