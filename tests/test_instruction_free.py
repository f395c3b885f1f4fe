"""Instruction-free tuning: proxy EMA, straight-through feed, response shuffling, exact resume,
the fixed-instruction baseline, multiple-choice evaluation and the digits attribute demo."""

import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch

from hf_vitask.config import DEFAULT_INSTRUCTION, InstructionFreeConfig
from hf_vitask.data.digits import (
    DIGIT_QUESTION_WORDINGS,
    add_digit_descriptions,
    digit_attributes,
    digit_descriptions,
    digits_stroke_threshold,
    make_mc_questions,
    stroke_intensity,
)
from hf_vitask.data.instruction_free import PROXY_SLOT_MASK, InstructionFreeCollator, shuffle_segments
from hf_vitask.evaluation import _drop_common_suffix, mc_evaluate, mc_prompt, parse_letter
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.proxy import PROXY_FILE, ProxyInstruction, load_proxy, resize_tokens
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.trainers.instruction_free import InstructionFreeTrainer
from tests.conftest import SHORT_RUN

DOC = Path(__file__).resolve().parents[1] / "docs" / "instruction_free.md"


@pytest.fixture(scope="module")
def described(digits):
    return add_digit_descriptions(digits)


def _args(tmp_path, **kw):
    return InstructionFreeConfig(**{**SHORT_RUN, "output_dir": str(tmp_path / "out"), **kw})


def _trainer(tmp_path, dataset, family="llava", **kw):
    model, processor = build_tiny_vlm(family)
    return InstructionFreeTrainer(
        model=model, args=_args(tmp_path, **kw), processing_class=processor, train_dataset=dataset
    )


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# -- the proxy ------------------------------------------------------------------------------------


def test_ema_update_matches_hand_computation():
    proxy = ProxyInstruction(torch.tensor([[1.0, 2.0]]), momentum=0.9)
    assert torch.equal(proxy.ema, proxy.weight.detach()) and int(proxy.step) == 0
    with torch.no_grad():
        proxy.weight.copy_(torch.tensor([[3.0, 4.0]]))
    proxy.update_ema()  # 0.9 * [1, 2] + 0.1 * [3, 4]
    assert torch.allclose(proxy.ema, torch.tensor([[1.2, 2.2]]))
    with torch.no_grad():
        proxy.weight.zero_()
    proxy.update_ema()  # 0.9 * [1.2, 2.2] + 0.1 * 0
    assert torch.allclose(proxy.ema, torch.tensor([[1.08, 1.98]])) and int(proxy.step) == 2
    # the EMA feed shows the EMA values; the raw feed the raw ones
    assert torch.allclose(proxy.fed(), proxy.ema)
    proxy.feed = "raw"
    assert torch.equal(proxy.fed(), proxy.weight)


def test_zero_momentum_is_the_raw_proxy():
    proxy = ProxyInstruction(torch.zeros(2, 3), momentum=0.0, feed="ema")
    with torch.no_grad():
        proxy.weight.add_(torch.randn(2, 3))
    proxy.update_ema()
    assert torch.equal(proxy.ema, proxy.weight.detach()) and torch.equal(proxy.fed(), proxy.weight.detach())


def test_resize_tokens():
    e = torch.arange(6.0).view(3, 2)  # tokens [0,1], [2,3], [4,5]
    assert torch.equal(resize_tokens(e, 3), e)
    five = resize_tokens(e, 5)  # linear, endpoints kept, midpoints blended
    assert torch.allclose(five, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5.0]]))
    two = resize_tokens(e, 2)
    assert torch.equal(two, e[[0, 2]])
    assert torch.equal(resize_tokens(e, 7, "repeat"), e[[0, 1, 2, 0, 1, 2, 0]])
    assert torch.equal(resize_tokens(e, 2, "repeat"), e[:2])
    with pytest.raises(ValueError):
        resize_tokens(e, 2, "cubic")


def test_proxy_init_from_text_uses_its_token_embeddings():
    model, processor = build_tiny_vlm("llava")
    emb = model.get_input_embeddings()
    ids = processor.tokenizer(DEFAULT_INSTRUCTION, add_special_tokens=False)["input_ids"]
    proxy = ProxyInstruction.from_text(emb, processor, DEFAULT_INSTRUCTION, len(ids))
    assert torch.equal(proxy.weight.detach(), emb.weight[ids].detach())
    eight = ProxyInstruction.from_text(emb, processor, DEFAULT_INSTRUCTION, 8)
    assert eight.weight.shape == (8, emb.embedding_dim)
    assert torch.equal(eight.weight[0], emb.weight[ids[0]]) and torch.equal(
        eight.weight[-1], emb.weight[ids[-1]]
    )
    rand = ProxyInstruction.from_text(emb, processor, "", 8, generator=torch.Generator().manual_seed(0))
    assert rand.weight.shape == (8, emb.embedding_dim) and rand.weight.std() > 0


# -- response shuffling ------------------------------------------------------------------------------


def test_shuffle_segments():
    text = "a, b, c, d"
    rng = random.Random(0)
    outs = {shuffle_segments(text, ", ", rng) for _ in range(30)}
    assert len(outs) > 3 and all(sorted(o.split(", ")) == ["a", "b", "c", "d"] for o in outs)
    assert shuffle_segments(text, ", ", random.Random(0), prob=0.0) == text
    same = [shuffle_segments(text, ", ", r) for r in (random.Random(5), random.Random(5))]
    assert same[0] == same[1]
    # sentences: the closing full stop stays at the end
    outs = {shuffle_segments("One. Two. Three.", ". ", random.Random(i)) for i in range(20)}
    assert all(
        o.endswith(".") and not o.endswith("..") and sorted(o[:-1].split(". ")) == ["One", "Three", "Two"]
        for o in outs
    )
    assert shuffle_segments("single", ", ", random.Random(0)) == "single"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_collator_shuffles_responses_and_keeps_masks(family):
    _, processor = build_tiny_vlm(family)
    tok = processor.tokenizer
    segments = ["value: seven", "parity: odd", "stroke: thick"]
    rows = [{"image": _image(i), "description": ", ".join(segments)} for i in range(3)]
    collator = InstructionFreeCollator(processor, num_proxy_tokens=5, seed=1)
    seen = set()
    for _ in range(6):
        batch = collator(rows)
        ids, labels, attn, slots = (
            batch["input_ids"],
            batch["labels"],
            batch["attention_mask"],
            batch[PROXY_SLOT_MASK],
        )
        for r in range(len(rows)):
            learnt = labels[r][labels[r] != IGNORE_INDEX]
            text = tok.decode(learnt, skip_special_tokens=True).strip()
            assert sorted(text.split(", ")) == sorted(segments), text
            seen.add(text)
            # the prompt (image, slots, template) is masked; the learnt tokens are one contiguous tail
            response = (labels[r] != IGNORE_INDEX).nonzero().flatten()
            assert torch.equal(response, torch.arange(int(response[0]), int(response[-1]) + 1))
            assert torch.equal(ids[r, response], labels[r, response])
            # K consecutive slots, in the prompt, after the image
            pos = slots[r].nonzero().flatten()
            assert len(pos) == 5 and int(pos[-1] - pos[0]) == 4 and int(pos[-1]) < int(response[0])
            image_pos = (ids[r] == collator.image_token_id).nonzero().flatten()
            assert int(pos[0]) > int(image_pos[-1]) and (labels[r, pos] == IGNORE_INDEX).all()
            assert (attn[r, pos] == 1).all()
    assert len(seen) >= 2, "shuffling never changed the order"
    # reproducible from the seed and the batch index
    again = InstructionFreeCollator(processor, num_proxy_tokens=5, seed=1)
    first = [again(rows)["input_ids"] for _ in range(2)]
    replay = InstructionFreeCollator(processor, num_proxy_tokens=5, seed=1)
    assert all(torch.equal(a, replay(rows)["input_ids"]) for a in first)
    replay.batch_index = 1  # resume: the second batch's permutation again
    assert torch.equal(replay(rows)["input_ids"], first[1])
    # evaluation: descriptions as written
    replay.training = False
    batch = replay(rows)
    learnt = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tok.decode(learnt, skip_special_tokens=True).strip() == ", ".join(segments)


def test_fixed_instruction_collator_and_row_errors():
    _, processor = build_tiny_vlm("llava")
    collator = InstructionFreeCollator(
        processor, use_proxy=False, instruction_text="Describe the image.", shuffle_prob=0.0
    )
    batch = collator([{"image": _image(0), "description": "value: one, parity: odd"}])
    assert PROXY_SLOT_MASK not in batch
    prompt = batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX]
    assert "Describe the image." in processor.tokenizer.decode(prompt)
    with pytest.raises(KeyError, match="description"):
        collator([{"image": _image(0), "label": 1}])
    with pytest.raises(ValueError, match="Empty or non-text description in row 0"):
        collator([{"image": _image(0), "description": "  "}])


# -- forward and gradient ------------------------------------------------------------------------------


def _capture_embeddings(model):
    """Hook registered after the proxy injector: sees the embeddings the LLM actually gets."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone())
    )
    return seen, handle


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_forward_feeds_the_chosen_copy_and_gradient_reaches_the_proxy(tmp_path, described, family):
    from hf_vitask.losses import token_ce

    trainer = _trainer(tmp_path, described["train"], family=family, shuffle_prob=0.0, proxy_learning_rate=0.1)
    model, proxy = trainer.model, trainer.proxy
    with torch.no_grad():
        proxy.ema.add_(0.5)  # make the two copies differ
    batch = trainer.data_collator([described["train"][i] for i in range(2)])
    slots = batch[PROXY_SLOT_MASK]
    for feed in ("ema", "raw"):
        proxy.feed = feed
        seen, handle = _capture_embeddings(model)
        try:
            loss = trainer.compute_loss(model, batch)
        finally:
            handle.remove()
        written = seen[0][slots].view(2, proxy.num_tokens, -1)
        want = proxy.ema if feed == "ema" else proxy.weight.detach()
        assert torch.allclose(written, want.expand(2, -1, -1)), feed
        model.zero_grad()
        loss.backward()
        grad = proxy.weight.grad.clone()
        assert grad.abs().sum() > 0 and proxy.ema.grad is None
        # straight-through: the raw proxy gets exactly the gradient of the vectors that were fed
        leaf = want.detach().clone().requires_grad_(True)
        inputs = {k: v for k, v in batch.items() if k != PROXY_SLOT_MASK}
        with trainer.model.inject(slots, leaf.unsqueeze(0).expand(2, -1, -1)):
            out = model(**inputs)
        token_ce(out.response_logits, out.response_targets).mean().backward()
        assert torch.allclose(grad, leaf.grad, atol=1e-6), feed
    # the proxy is its own optimizer group: its learning rate, no weight decay
    groups = trainer.create_optimizer().param_groups
    assert (
        groups[-1]["params"] == [proxy.weight] and groups[-1]["lr"] == 0.1 and groups[-1]["weight_decay"] == 0
    )
    assert all(p is not proxy.weight for g in groups[:-1] for p in g["params"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "mllama"])
def test_the_fused_loss_head_gives_the_loss_and_gradients_of_the_logits(
    tmp_path, described, family, monkeypatch
):
    """fused_loss_head (the default) applies the output layer inside the loss on the final hidden
    states: the loss and the gradients of LoRA and the proxy equal those of the logits path. Mllama
    has no stacked single pass; it keeps the logits path."""
    import hf_vitask.trainers.instruction_free as module

    calls = []
    real = module.fused_head_losses
    monkeypatch.setattr(module, "fused_head_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = _trainer(tmp_path, described["train"], family=family, shuffle_prob=0.0)
    model = trainer.model
    batch = trainer.data_collator([described["train"][i] for i in range(3)])
    results = {}
    for fused in (True, False):
        trainer.args.fused_loss_head = fused
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(7))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (loss.detach(), grads | {"proxy": trainer.proxy.weight.grad.clone()})
        trainer.proxy.weight.grad = None
    assert len(calls) == (0 if family == "mllama" else 1)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert set(results[True][1]) == set(results[False][1]) and "proxy" in results[True][1]
    assert any("lora_" in n for n in results[True][1])
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# -- training ---------------------------------------------------------------------------------------------


def test_end_to_end_llava_loss_decreases_and_saves_the_proxy(tmp_path, described):
    train = described["train"].select(range(8))
    trainer = _trainer(tmp_path, train, max_steps=10)
    lora_before, proxy_before = _lora(trainer.model), trainer.proxy.weight.detach().clone()
    trainer.train()
    losses = _logged(trainer, "loss")
    # the loss is the response cross-entropy alone, and it falls (seed 0: the last three steps ~20% below the
    # first three, 7.02 -> 5.21 from the first step to the last)
    assert len(losses) == 10 and losses == pytest.approx(_logged(trainer, "loss_ce"), rel=1e-5)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]) and losses[-1] < 0.9 * losses[0]
    assert _logged(trainer, "proxy_ema_gap")[-1] > 0
    proxy = trainer.proxy
    assert int(proxy.step) == 10 and not torch.equal(proxy.weight.detach(), proxy_before)
    assert not torch.allclose(proxy.ema, proxy.weight.detach())  # momentum lags the raw proxy
    assert any(not torch.equal(p, lora_before[n]) for n, p in _lora(trainer.model).items())
    trainer.save_model(str(tmp_path / "final"))
    saved = load_proxy(tmp_path / "final")
    assert set(saved) == {"proxy", "proxy_ema", "step"} and int(saved["step"]) == 10
    assert torch.equal(saved["proxy_ema"], proxy.ema.cpu())
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    assert not any("proxy" in k for k in load_file(str(tmp_path / "final" / "adapter_model.safetensors")))
    # held-out questions, both scoring modes (real instructions: no proxy involved)
    questions = make_mc_questions(described["test"].select(range(2)), seed=0)
    for method in ("likelihood", "generate"):
        result = mc_evaluate(
            trainer.model, trainer.processing_class, questions, method=method, max_new_tokens=3
        )
        _check_mc_result(result, questions)
        if method == "generate":  # the prediction is the letter the answer names, None when it names none
            assert result["predictions"] == [
                parse_letter(a, len(q["options"])) for a, q in zip(result["answers"], questions)
            ]
        else:
            assert result["parse_failures"] == 0 and None not in result["predictions"]
    # the saved adapter alone is the inference model
    reloaded = VITaskModel.from_pretrained(tmp_path / "final", build_tiny_vlm("llava")[0])
    scores = [
        mc_evaluate(m, trainer.processing_class, questions)["predictions"] for m in (trainer.model, reloaded)
    ]
    assert scores[0] == scores[1]


def test_resume_restores_proxy_ema_and_lora_exactly(tmp_path, described):
    train = described["train"].select(range(6))  # 3 steps per epoch: the resumed run crosses an epoch
    straight = _trainer(
        tmp_path / "a", train, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2
    )
    straight.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    saved = load_proxy(checkpoint)
    assert int(saved["step"]) == 2 and not torch.equal(saved["proxy"], saved["proxy_ema"])
    resumed = _trainer(tmp_path / "b", train, max_steps=4, per_device_train_batch_size=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = straight.proxy, resumed.proxy
    assert int(a.step) == int(b.step) == 4
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.ema, b.ema, atol=1e-6)
    want = _lora(straight.model)
    for n, p in _lora(resumed.model).items():
        assert torch.allclose(p, want[n], atol=1e-6), n
    # each run collated with its own copy: the trainers' collators are as configured
    assert resumed.data_collator.batch_index == straight.data_collator.batch_index == 0
    assert resumed.train_collator is not resumed.data_collator and resumed.train_collator.batch_index > 0


def test_fixed_instruction_baseline_runs(tmp_path, described):
    trainer = _trainer(
        tmp_path,
        described["train"].select(range(4)),
        use_proxy=False,
        max_steps=2,
        per_device_train_batch_size=2,
    )
    assert trainer.proxy is None and not hasattr(trainer.model, "proxy")
    assert trainer.args.instruction_text == DEFAULT_INSTRUCTION
    lora_before = _lora(trainer.model)
    trainer.train()
    assert len(_logged(trainer, "loss")) == 2 and not _logged(trainer, "proxy_ema_gap")
    assert any(not torch.equal(p, lora_before[n]) for n, p in _lora(trainer.model).items())
    trainer.save_model(str(tmp_path / "fixed"))
    assert not (tmp_path / "fixed" / PROXY_FILE).exists()


def test_configuration_errors(tmp_path, described):
    for kw, match in [
        (dict(proxy_momentum=1.0), "proxy_momentum"),
        (dict(proxy_momentum=-0.1), "proxy_momentum"),
        (dict(proxy_feed="both"), "proxy_feed"),
        (dict(num_proxy_tokens=0), "num_proxy_tokens"),
        (dict(shuffle_prob=1.5), "shuffle_prob"),
        (dict(shuffle_separator=""), "shuffle_separator"),
        (dict(proxy_init_resize="cubic"), "proxy_init_resize"),
        (dict(instruction_text="Describe."), "use_proxy=False"),
        (dict(description_column="image"), "both"),
    ]:
        with pytest.raises(ValueError, match=match):
            _args(tmp_path, **kw)
    assert _args(tmp_path, use_proxy=False, instruction_text="").instruction_text == ""
    model, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="no column"):
        InstructionFreeTrainer(
            model=model,
            args=_args(tmp_path),
            processing_class=processor,
            train_dataset=described["train"].remove_columns("description"),
        )
    with pytest.raises(ValueError, match="processing_class"):
        InstructionFreeTrainer(model=model, args=_args(tmp_path), train_dataset=described["train"])


# -- multiple-choice evaluation ------------------------------------------------------------------------------


def test_mc_prompt_and_letter_parsing():
    assert (
        mc_prompt("Which digit?", ["one", "two"]) == "Which digit?\nA. one\nB. two\nAnswer with the letter."
    )
    assert (
        parse_letter("B", 4) == 1
        and parse_letter("Answer: (C).", 4) == 2
        and parse_letter(" d. four", 4) is None
    )
    assert parse_letter("Because A", 4) == 0 and parse_letter("E", 4) is None and parse_letter("", 2) is None
    labels = torch.tensor([[-100, 5, 9], [-100, 6, 9], [-100, -100, 7]])
    dropped = _drop_common_suffix(labels, [2, 1])
    assert dropped.tolist() == [[-100, 5, -100], [-100, 6, -100], [-100, -100, 7]]


def _check_mc_result(result, questions):
    """Accuracy, per-attribute accuracy and parse failures are those of the returned predictions."""
    correct = [p == q["answer"] for p, q in zip(result["predictions"], questions)]
    assert result["num_questions"] == len(questions) == len(result["predictions"])
    assert result["accuracy"] == sum(correct) / len(questions)
    by_attribute = {
        a: [ok for ok, q in zip(correct, questions) if q["attribute"] == a]
        for a in ("value", "parity", "stroke")
    }
    assert result["by_attribute"] == {a: sum(v) / len(v) for a, v in by_attribute.items()}
    assert result["parse_failures"] == sum(p is None for p in result["predictions"])
    assert result["parse_failure_rate"] == result["parse_failures"] / len(questions)


def test_mc_evaluate_plain_vlm_matches_wrapped(described):
    from hf_vitask.data.collator import user_message
    from hf_vitask.evaluation import LETTERS

    model, processor = build_tiny_vlm("qwen2_vl")
    questions = make_mc_questions(described["test"].select(range(1)), seed=3)
    plain = mc_evaluate(model, processor, questions)
    wrapped = mc_evaluate(VITaskModel.from_vlm(model, processor, with_connector=False), processor, questions)
    assert plain["predictions"] == wrapped["predictions"]
    _check_mc_result(plain, questions)
    # by hand: Qwen's letters are one token each, right after the generation prompt, and the end of turn
    # that follows every letter is left out, so each option scores log p(its letter | prompt)
    tokenizer, by_hand = processor.tokenizer, []
    for q in questions:
        text = processor.apply_chat_template(
            user_message(mc_prompt(q["question"], q["options"])), add_generation_prompt=True, tokenize=False
        )
        with torch.no_grad():
            logits = model(**processor(images=[[q["image"]]], text=[text], return_tensors="pt")).logits[0, -1]
        letters = [tokenizer.convert_tokens_to_ids(LETTERS[j]) for j in range(len(q["options"]))]
        by_hand.append(int(logits.log_softmax(-1)[letters].argmax()))
    assert len(questions) == 3 and plain["predictions"] == by_hand
    gen = mc_evaluate(model, processor, questions, method="generate", max_new_tokens=2)
    assert len(gen["answers"]) == len(questions)
    assert gen["predictions"] == [
        parse_letter(a, len(q["options"])) for a, q in zip(gen["answers"], questions)
    ]
    _check_mc_result(gen, questions)
    with pytest.raises(ValueError, match="answer"):
        mc_evaluate(model, processor, [{**questions[0], "answer": 9}])
    with pytest.raises(ValueError, match="method"):
        mc_evaluate(model, processor, questions, method="vote")


# -- the digits demo ------------------------------------------------------------------------------------------


def test_digit_descriptions_and_questions(described, digits):
    row = digits["train"][0]
    text = digit_descriptions(row["label"], row["image"])
    assert re.fullmatch(r"value: \w+, parity: (odd|even), stroke: (thick|thin)", text)
    assert described["train"][0]["description"] == text
    attrs = digit_attributes(7, row["image"], threshold=0.0)
    assert attrs == {"value": "seven", "parity": "odd", "stroke": "thick"}
    assert digit_attributes(4, row["image"], threshold=1.0)["stroke"] == "thin"
    threshold = digits_stroke_threshold(32)
    strokes = [stroke_intensity(img) > threshold for img in digits["train"]["image"]]
    assert 0.25 < sum(strokes) / len(strokes) < 0.75  # median split: both classes well represented
    questions = make_mc_questions(digits["test"].select(range(5)), seed=0)
    assert len(questions) == 15 and questions == make_mc_questions(digits["test"].select(range(5)), seed=0)
    for q in questions:
        assert (
            q["question"] in DIGIT_QUESTION_WORDINGS[q["attribute"]] and q["question"] != DEFAULT_INSTRUCTION
        )
        assert 0 <= q["answer"] < len(q["options"]) and len(set(q["options"])) == len(q["options"])
    truth = digit_attributes(digits["test"][0]["label"], digits["test"][0]["image"])
    first = {q["attribute"]: q["options"][q["answer"]] for q in questions[:3]}
    assert first == truth
    assert (
        len({q["options"].index("odd") for q in questions if q["attribute"] == "parity"}) == 2
    )  # letters vary


def test_docs_cover_every_config_field():
    from transformers import TrainingArguments

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    doc = DOC.read_text()
    own = [
        f
        for f in dataclasses.fields(InstructionFreeConfig)
        if f.name not in base or base[f.name] != f.default
    ]
    assert len(own) > 10
    for f in own:
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f"`{f.name}`" in doc, f"{f.name} is missing from docs/instruction_free.md"


def _image(seed):
    from tests.conftest import make_image

    return make_image(seed)
