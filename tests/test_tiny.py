"""Tiny offline VLMs and the family registry: the contract every other module builds on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitask.models.families import FAMILIES, VLMFamily, get_family, register_family
from hf_vitask.models.tiny import build_tiny_tokenizer, build_tiny_vlm, save_tiny_vlm

TINY = ("llava", "qwen2_vl")
IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 16}  # per 32x32 image


def _image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model, processor = build_tiny_vlm(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def images():
    return [_image(0), _image(1)]


def _train_batch(processor, images, answers=("seven", "Pneumonia, café 42!")):
    texts = [
        processor.apply_chat_template(_prompt(f"Which digit is this? {i}") + [_answer(a)], tokenize=False)
        for i, a in enumerate(answers)
    ]
    batch = processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def test_processor_expands_image_tokens(tiny, images):
    name, model, processor = tiny
    family = get_family(name)
    batch = _train_batch(processor, images)
    image_id = family.image_token_id(processor.tokenizer)
    assert image_id == model.config.image_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [IMAGE_TOKENS[name]] * 2
    extra = set(batch) - {"input_ids", "attention_mask", "labels"}
    assert extra == set(family.per_token_keys) | set(family.image_keys)
    for key in family.per_token_keys:
        assert batch[key].shape == batch["input_ids"].shape
    end_id = family.image_end_token_id(processor)
    if end_id is None:
        assert family.image_end_token is None
    else:  # the end token directly follows the last image token
        ids = batch["input_ids"][0].tolist()
        last = max(i for i, t in enumerate(ids) if t == image_id)
        assert ids[last + 1] == end_id


def test_forward_backward(tiny, images):
    _, model, processor = tiny
    model.train()
    model.zero_grad()
    batch = _train_batch(processor, images)
    out = model(**batch)
    # the loss is the next-token cross-entropy over the labelled tokens
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    lm_grads = {n: p.grad for n, p in model.named_parameters() if "language_model" in n and "layers" in n}
    assert lm_grads and all(
        g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lm_grads.values()
    )
    model.zero_grad()


@pytest.mark.parametrize("content", ["list", "string"])
def test_chat_template_prefix_and_eos(tiny, content):
    _, _, processor = tiny
    tok = processor.tokenizer
    prompt = [{"role": "system", "content": "You are a helpful assistant."}]
    prompt += (
        _prompt("Analyze the given image.") if content == "list" else [{"role": "user", "content": "Hi"}]
    )
    answer = _answer("normal") if content == "list" else {"role": "assistant", "content": "normal"}
    for renderer in (processor, tok):
        gen = renderer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = renderer.apply_chat_template(prompt + [answer], tokenize=False)
        assert full.startswith(gen)
        assert full[len(gen) :].strip().endswith(tok.eos_token)
        assert "normal" in full[len(gen) :]
        assert gen.count(get_family(tiny[0]).image_token) == (1 if content == "list" else 0)


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_round_trip(name):
    tok = build_tiny_tokenizer(name)
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    for text in ["Pneumonia, café 42!", "Ünïcödé ✓ 🦀 \t\n  spaces", "x" * 50]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    family = get_family(name)
    for special in filter(None, [family.image_token, family.image_end_token, tok.eos_token, tok.pad_token]):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]


def test_get_family(tiny):
    from peft import LoraConfig, get_peft_model

    name, model, _ = tiny
    family = FAMILIES[name]
    assert get_family(name) is family
    assert get_family(model.config) is family
    assert get_family(model) is family
    fresh, _ = build_tiny_vlm(name)
    assert (
        get_family(get_peft_model(fresh, LoraConfig(r=2, target_modules=family.lora_target_modules)))
        is family
    )
    with pytest.raises(ValueError, match=r"gpt2.*add an entry to hf_vitask\.models\.families\.FAMILIES"):
        from transformers import GPT2Config

        get_family(GPT2Config())


def test_register_family_rejects_model_type_clash():
    clash = VLMFamily("other", ("llava",), "<image>", None, ".*", (), (), ("pixel_values",))
    with pytest.raises(ValueError, match="already served"):
        register_family(clash)
    assert "other" not in FAMILIES


def test_select_images_llava(images):
    _, processor = build_tiny_vlm("llava")
    batch = processor(images=[[_image(i)] for i in range(3)], text=["<image> a"] * 3, return_tensors="pt")
    index = torch.tensor([2, 0, 1])
    out = FAMILIES["llava"].select_images(batch, index)
    assert set(out) == {"pixel_values"}
    assert torch.equal(out["pixel_values"], batch["pixel_values"][index])


def test_select_images_qwen2_vl():
    _, processor = build_tiny_vlm("qwen2_vl")
    family = FAMILIES["qwen2_vl"]
    text = processor.apply_chat_template(_prompt("a"), add_generation_prompt=True, tokenize=False)
    batch = processor(images=[[_image(i)] for i in range(3)], text=[text] * 3, return_tensors="pt")
    index = torch.tensor([1, 2, 0])
    out = family.select_images(batch, index)
    per_image = processor(images=[[_image(i)] for i in range(3)][0], text=[text], return_tensors="pt")
    n = int(batch["image_grid_thw"][0].prod())
    assert per_image["pixel_values"].shape[0] == n and batch["pixel_values"].shape[0] == 3 * n
    for row, src in enumerate(index.tolist()):
        assert torch.equal(
            out["pixel_values"][row * n : (row + 1) * n], batch["pixel_values"][src * n : (src + 1) * n]
        )
    assert torch.equal(out["image_grid_thw"], batch["image_grid_thw"][index])

    mixed = processor(
        images=[[_image(0)], [_image(1, (64, 32))]], text=[text] * 2, padding=True, return_tensors="pt"
    )
    assert not torch.equal(mixed["image_grid_thw"][0], mixed["image_grid_thw"][1])
    assert (
        family.select_images(mixed, torch.tensor([0, 1]))["pixel_values"].shape == mixed["pixel_values"].shape
    )
    swapped = family.select_images(mixed, torch.tensor([1, 0]))  # whole images, whatever their grids
    n0 = int(mixed["image_grid_thw"][0].prod())
    assert torch.equal(
        swapped["pixel_values"], torch.cat([mixed["pixel_values"][n0:], mixed["pixel_values"][:n0]])
    )
    assert torch.equal(swapped["image_grid_thw"], mixed["image_grid_thw"].flip(0))


def test_save_and_reload_same_logits(tiny, images, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, _, _ = tiny
    path = save_tiny_vlm(tmp_path_factory.mktemp(name), name, seed=3)
    model, processor = build_tiny_vlm(name, seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    loaded_processor = AutoProcessor.from_pretrained(path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert loaded.dtype == torch.float32 and loaded_processor.chat_template == processor.chat_template
    assert model.name_or_path == f"tiny-{name.replace('_', '-')}"
    batch, loaded_batch = _train_batch(processor, images), _train_batch(loaded_processor, images)
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**loaded_batch).logits)


def test_generate_left_padded_matches_unbatched(tiny, images):
    """Left padding must not change what each row generates (position ids / M-RoPE follow the mask)."""
    _, model, processor = tiny
    prompts = [
        processor.apply_chat_template(_prompt(t), add_generation_prompt=True, tokenize=False)
        for t in ("digit?", "Analyze the given image. The possible diagnoses are: pneumonia, normal.")
    ]
    batch = processor(
        images=[[im] for im in images], text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
            singles = [
                model.generate(**processor(images=[im], text=[p], return_tensors="pt"), **kwargs)
                for im, p in zip(images, prompts)
            ]
    finally:
        model.train()
    length = batch["input_ids"].shape[1]
    assert out.sequences.shape == (2, length + 4)
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    for row, single in enumerate(singles):
        assert torch.equal(out.sequences[row, length:], single.sequences[0, -4:])
        for batched_scores, single_scores in zip(out.scores, single.scores):
            torch.testing.assert_close(batched_scores[row], single_scores[0], atol=1e-4, rtol=1e-4)


def _lora_targets(model, regex):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=regex))
    return [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]


@pytest.mark.parametrize("name", TINY)
def test_lora_regex_hits_language_model_only(name):
    family = FAMILIES[name]
    model, _ = build_tiny_vlm(name, num_layers=2)
    module_names = {n for n, _ in model.named_modules()}
    assert set(family.vision_modules) <= module_names
    targets = _lora_targets(model, family.lora_target_modules)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for target in targets:
        assert ".language_model.layers." in target
        assert not any(f".{v}." in target for v in family.vision_modules)


def test_qwen2_5_vl_shares_the_qwen2_vl_family():
    """Qwen2.5-VL's vision blocks have gate/up/down projections too: the regex must skip them."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text.update(
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
    )
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
    vision.update(patch_size=4, fullatt_block_indexes=[0], window_size=16)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=1, video_token_id=2)
    model = Qwen2_5_VLForConditionalGeneration(config)
    family = get_family(model)
    assert family.name == "qwen2_vl"
    assert set(family.vision_modules) <= {n for n, _ in model.named_modules()}
    assert any(n.startswith("model.visual.") and n.endswith("gate_proj") for n, _ in model.named_modules())
    targets = _lora_targets(model, family.lora_target_modules)
    assert len(targets) == 7 and all("model.visual" not in t for t in targets)


@pytest.mark.parametrize("name", TINY)
def test_build_is_seeded(name):
    a, _ = build_tiny_vlm(name, seed=1)
    b, _ = build_tiny_vlm(name, seed=1)
    c, _ = build_tiny_vlm(name, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.dtype == torch.float32 and a.training
