"""VITaskModel on the tiny VLMs of both families: EP and no-EP paths, generation, save/load."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

from hf_vitask.data.collator import VITaskCollator
from hf_vitask.losses import token_ce
from hf_vitask.models.families import get_family
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tiny import save_tiny_vlm
from tests.conftest import make_image


def _batch(processor, task, tsm, n=3):
    rows = [{"image": make_image(i), "label": i % task.num_classes} for i in range(n)]
    batch = VITaskCollator(processor, task, tsm=tsm)(rows)
    batch.pop("class_ids")
    return batch


def _lora(model):
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=get_family(model).lora_target_modules)
    )


def test_no_exemplar_path_is_the_plain_vlm(tiny, task, tsm):
    model, processor = tiny
    batch = _batch(processor, task, tsm)
    tsm_pixels = batch.pop("tsm_pixel_values")
    wrapped = VITaskModel.from_vlm(model, processor, tsm=tsm).eval()
    plain = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    out = wrapped(**batch)
    assert torch.equal(out.logits, plain)
    ep = wrapped(**batch, tsm_pixel_values=tsm_pixels)
    # one exemplar token per row: one more position, same responses, different predictions
    assert ep.logits.shape[1] == plain.shape[1] + 1
    assert ep.response_logits.shape == out.response_logits.shape
    assert torch.equal(ep.response_targets, out.response_targets)
    assert not torch.allclose(ep.response_logits, out.response_logits)
    for o in (ep, out):  # the loss is the mean response cross-entropy
        torch.testing.assert_close(o.loss, token_ce(o.response_logits, o.response_targets).mean())


def test_exemplar_tokens_sit_after_the_image_block(tiny, task, tsm):
    model, processor = tiny
    batch = _batch(processor, task, tsm)
    wrapped = VITaskModel.from_vlm(model, processor, tsm=tsm, num_exemplar_tokens=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    expanded, slots = wrapped.open_exemplar_slots(inputs, torch.zeros(3, 2, 1))
    ids = expanded["input_ids"]
    for row in range(3):
        where = slots[row].nonzero().flatten()
        assert where.tolist() == [where[0].item(), where[0].item() + 1]
        before = ids[row, where[0] - 1].item()
        expected = (
            wrapped.image_end_token_id if wrapped.image_end_token_id is not None else wrapped.image_token_id
        )
        assert before == expected
        assert (ids[row, where[-1] + 1 :] != wrapped.image_token_id).all()


def test_gradient_reaches_connector_and_lora_not_tsm(tiny, task, tsm):
    model, processor = tiny
    wrapped = VITaskModel.from_vlm(_lora(model), processor, tsm=tsm)
    tsm.requires_grad_(False)
    out = wrapped(**_batch(processor, task, tsm))
    out.loss.backward()
    assert wrapped.connector.fc1.weight.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in wrapped.vlm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for p in tsm.parameters())


def test_patch_feature_connector(tiny, task, tsm):
    model, processor = tiny
    wrapped = VITaskModel.from_vlm(model, processor, tsm=tsm, exemplar_feature="patch", num_exemplar_tokens=3)
    out = wrapped(**_batch(processor, task, tsm))
    torch.testing.assert_close(out.loss, token_ce(out.response_logits, out.response_targets).mean())


def test_tsm_input_without_tsm_is_an_error(tiny, task, tsm):
    model, processor = tiny
    wrapped = VITaskModel.from_vlm(model, processor, tsm_dim=tsm.feature_dim)
    with pytest.raises(ValueError, match="no TSM"):
        wrapped(**_batch(processor, task, tsm))
    bare = VITaskModel.from_vlm(model, processor, with_connector=False)
    with pytest.raises(ValueError, match="no exemplar connector"):
        bare(**_batch(processor, task, tsm))


def test_generate_with_and_without_tsm(tiny, task, tsm):
    from hf_vitask.data.collator import build_prompts

    model, processor = tiny
    wrapped = VITaskModel.from_vlm(model, processor, tsm=tsm).eval()
    images = [make_image(1), make_image(2)]
    prompts = build_prompts(processor, task, images)
    plain = wrapped.generate(**prompts, max_new_tokens=4, do_sample=False)
    with_tsm = wrapped.generate(
        **prompts, tsm_pixel_values=tsm.preprocess(images), max_new_tokens=4, do_sample=False
    )
    assert plain.shape[0] == with_tsm.shape[0] == 2
    assert 1 <= plain.shape[1] <= 4 and 1 <= with_tsm.shape[1] <= 4


def test_save_and_reload(tmp_path, family, task, tsm):
    base_dir = save_tiny_vlm(tmp_path / "base", family)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    wrapped = VITaskModel.from_vlm(_lora(base), None, tsm=tsm)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    wrapped = VITaskModel.from_vlm(
        _lora(AutoModelForImageTextToText.from_pretrained(base_dir)), processor, tsm=tsm
    )
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in wrapped.vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    wrapped.eval()
    batch = _batch(processor, task, tsm)
    tsm_pixels = batch.pop("tsm_pixel_values")
    want_plain = wrapped(**batch).logits
    want_ep = wrapped(**batch, tsm_pixel_values=tsm_pixels).logits
    wrapped.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "exemplar_connector.safetensors",
        "vitask_config.json",
        "tsm",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)

    loaded = VITaskModel.from_pretrained(tmp_path / "out").eval()  # base found via the adapter config
    assert torch.allclose(loaded(**batch).logits, want_plain, atol=1e-5)
    assert torch.allclose(loaded(**batch, tsm_pixel_values=tsm_pixels).logits, want_ep, atol=1e-5)
    # the adapter alone is the no-TSM model, loadable without hf_vitask
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base_dir), tmp_path / "out"
    ).eval()
    plain = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(plain, want_plain, atol=1e-5)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vitask_config.json"):
        VITaskModel.from_pretrained(tmp_path)
