"""load_vlm (full precision and QLoRA 4-bit), prepare_for_training, lora_config — on tiny models, CPU.

bitsandbytes runs NF4 layers on CPU, so the real quantised path (from_pretrained with a
BitsAndBytesConfig, peft's k-bit preparation, LoRA, Trainer) is exercised here, not mocked.
"""

import sys

import pytest
import torch
from torch import nn

from hf_vitask.models import loading
from hf_vitask.models.families import get_family
from hf_vitask.models.loading import (
    QuantizationUnavailableError,
    bitsandbytes_available,
    is_quantized,
    load_vlm,
    lora_config,
    lora_target_names,
    prepare_for_training,
)
from hf_vitask.models.tiny import build_tiny_vlm, save_tiny_vlm, tiny_family

BNB_OK, BNB_REASON = bitsandbytes_available()
needs_bnb = pytest.mark.skipif(not BNB_OK, reason=f"4-bit cannot run here: {BNB_REASON}")
FAMILIES = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: extra threads only add contention (10x slower on a busy 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: save_tiny_vlm(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def batches(tiny_dirs):
    """One collated 2-row digits batch per family (model inputs only)."""
    from transformers import AutoProcessor

    from hf_vitask import VITaskCollator
    from hf_vitask.data.digits import digits_task, load_digits_dataset

    rows = load_digits_dataset(max_samples=48)["train"].select(range(2))
    out = {}
    for family, path in tiny_dirs.items():
        batch = VITaskCollator(AutoProcessor.from_pretrained(path), digits_task())(list(rows))
        out[family] = {k: v for k, v in batch.items() if k not in ("class_ids", "images", "tsm_pixel_values")}
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _assert_quantised_layout(model, family_name: str) -> None:
    import bitsandbytes as bnb

    family = get_family(family_name)
    language = {
        n: m
        for n, m in model.named_modules()
        if ".language_model.layers." in f".{n}" and ".lora_" not in n and isinstance(m, nn.Linear)
    }
    assert language, "no language-model linear layers found"
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in language.values()), [
        n for n, m in language.items() if not isinstance(m, bnb.nn.Linear4bit)
    ]
    kept = {n: m for n, m in model.named_modules() if _under(n, family.vision_modules)}
    kept_linear = {n: m for n, m in kept.items() if isinstance(m, nn.Linear)}
    assert "lm_head" in kept_linear and len(kept_linear) > 3
    for name, module in kept_linear.items():
        assert type(module) is nn.Linear, f"{name} was quantised ({type(module).__name__})"
        assert module.weight.dtype == torch.float32, f"{name}: {module.weight.dtype}"
        assert type(module.weight).__name__ != "Params4bit", name
    for name, param in model.named_parameters():
        if _under(name, family.vision_modules):
            assert param.dtype.is_floating_point and param.dtype == torch.float32, f"{name}: {param.dtype}"


# -- bitsandbytes availability ---------------------------------------------------------------------------
def test_bitsandbytes_runs_4bit_on_this_machine():
    ok, reason = bitsandbytes_available()
    assert isinstance(ok, bool) and reason
    if ok:
        assert "bitsandbytes" in reason and "4-bit" in reason


def test_bitsandbytes_reported_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ModuleNotFoundError
    ok, reason = bitsandbytes_available()
    assert not ok and "not installed" in reason


def test_bitsandbytes_reported_without_backend(monkeypatch):
    import bitsandbytes.functional as bnbf

    def no_backend(*args, **kwargs):
        raise NotImplementedError("no kernel registered for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", no_backend)
    loading._probe_4bit.cache_clear()
    try:
        ok, reason = bitsandbytes_available("cpu")
    finally:
        loading._probe_4bit.cache_clear()
    assert not ok and "cannot run 4-bit" in reason and "no kernel registered" in reason


@pytest.mark.parametrize(
    "reason", ["bitsandbytes is not installed", "bitsandbytes 0.1 cannot run 4-bit layers on cpu (x)"]
)
def test_load_in_4bit_fails_clearly_without_bitsandbytes(monkeypatch, tiny_dirs, reason):
    monkeypatch.setattr(loading, "bitsandbytes_available", lambda device=None: (False, reason))
    for name in (tiny_dirs["llava"], "tiny-llava"):
        with pytest.raises(QuantizationUnavailableError) as err:
            load_vlm(name, load_in_4bit=True)
        message = str(err.value)
        assert reason in message and "pip install -U bitsandbytes" in message
        assert "full precision" in message and "CUDA" in message


# -- full precision ----------------------------------------------------------------------------------
def test_full_precision_load_passes_options_and_keeps_remote_code_off(monkeypatch, tiny_dirs):
    from transformers import AutoModelForImageTextToText

    calls = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    model, processor = load_vlm(tiny_dirs["llava"], torch_dtype="bfloat16", attn_implementation="eager")
    assert calls[0]["trust_remote_code"] is False and "quantization_config" not in calls[0]
    assert calls[0]["dtype"] is torch.bfloat16 and calls[0]["attn_implementation"] == "eager"
    assert model.dtype == torch.bfloat16 and not is_quantized(model)
    assert processor.tokenizer is not None
    load_vlm(tiny_dirs["llava"], dtype=torch.float32)  # the transformers-5 keyword is accepted too
    assert calls[1]["dtype"] is torch.float32


def test_tiny_names_accept_both_spellings():
    assert tiny_family("tiny-qwen2_vl") == tiny_family("tiny-qwen2-vl") == "qwen2_vl"
    with pytest.raises(ValueError, match="Unknown tiny model"):
        tiny_family("tiny-gpt")


# -- LoRA targets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_regex_never_matches_a_vision_module(family):
    model, _ = build_tiny_vlm(family)
    config = lora_config(model)
    assert config.task_type == "CAUSAL_LM" and (config.r, config.lora_alpha, config.lora_dropout) == (
        16,
        32,
        0.05,
    )
    targets = lora_target_names(model, config)
    assert len(targets) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(".language_model.layers." in f".{t}" for t in targets)
    vision = get_family(family).vision_modules
    assert not [t for t in targets if _under(t, vision)]
    # why a regex: the bare names also hit the vision tower (CLIP q/k/v; Qwen2-VL's fc layers differ)
    naive = lora_target_names(model, lora_config(model, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    assert any(_under(t, vision) for t in naive)


# -- 4-bit ---------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_quantises_language_model_only(tiny_dirs, family):
    model, processor = load_vlm(tiny_dirs[family], load_in_4bit=True)
    assert is_quantized(model) and model.is_loaded_in_4bit
    qc = model.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert set(qc["llm_int8_skip_modules"]) == set(get_family(family).vision_modules)
    _assert_quantised_layout(model, family)
    assert processor is not None


@needs_bnb
@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_forward_backward_trains_only_lora(tiny_dirs, batches, family):
    from peft import get_peft_model

    model, _ = load_vlm(tiny_dirs[family], load_in_4bit=True)
    model = prepare_for_training(model, gradient_checkpointing=True, quantized=True)
    assert model.is_gradient_checkpointing
    peft_model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    lora_names = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    vision = tuple(f"base_model.model.{m}" for m in get_family(family).vision_modules)
    assert lora_names and not [n for n in lora_names if _under(n, vision)]
    out = peft_model(**batches[family])
    loss, labels = out.loss, batches[family]["labels"]
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert loss.item() == pytest.approx(
        expected.item(), rel=1e-4
    )  # the 4-bit model's loss is its own response CE
    loss.backward()
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            assert param.requires_grad and param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"base parameter {name} received a gradient"
    # lora_B starts at zero, so its gradient is the informative one
    assert any(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_prepare_for_training_full_precision_checkpointing_still_reaches_lora(batches):
    from peft import get_peft_model

    model, _ = build_tiny_vlm("llava")
    model = prepare_for_training(model, gradient_checkpointing=True, quantized=False)
    assert model.is_gradient_checkpointing
    peft_model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    peft_model(**batches["llava"]).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


@needs_bnb
def test_qlora_vitask_trainer_three_steps(tmp_path, tiny_dirs):
    from peft import get_peft_model
    from transformers import AutoProcessor

    from hf_vitask import VITaskConfig, VITaskTrainer
    from hf_vitask.data.digits import digits_task, load_digits_dataset

    model, _ = load_vlm("tiny-llava", load_in_4bit=True)  # the saved-to-temp-dir path for tiny names
    assert model.name_or_path == "tiny-llava"
    _assert_quantised_layout(model, "llava")
    model = prepare_for_training(model, gradient_checkpointing=False, quantized=True)
    model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    args = VITaskConfig(
        output_dir=str(tmp_path),
        ep_weight=0,
        rda_weight=0,
        max_steps=3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=2,
        logging_steps=1,
    )
    trainer = VITaskTrainer(
        model=model,
        args=args,
        processing_class=AutoProcessor.from_pretrained(tiny_dirs["llava"]),
        train_dataset=load_digits_dataset(max_samples=48)["train"],
        task=digits_task(),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    # vanilla: each step's loss is its response cross-entropy, and the run's loss their mean
    assert result.global_step == 3 and len(losses) == 3
    assert losses == pytest.approx(
        [log["loss_van"] for log in trainer.state.log_history if "loss_van" in log], rel=1e-5
    )
    assert result.training_loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "LoRA weights did not move"
    _assert_quantised_layout(trainer.model.vlm.get_base_model(), "llava")


def test_a_checkpoint_without_chat_template_gets_its_family_default(tmp_path):
    """PaliGemma checkpoints ship no chat template: load_vlm gives the processor the family's."""
    from hf_vitask import VITaskCollator
    from hf_vitask.data.digits import digits_task, load_digits_dataset
    from hf_vitask.models.families import PALIGEMMA_CHAT_TEMPLATE

    model, processor = build_tiny_vlm("paligemma")
    processor.chat_template = None
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_vlm(str(tmp_path))
    assert loaded_processor.chat_template == PALIGEMMA_CHAT_TEMPLATE
    rows = list(load_digits_dataset(max_samples=48)["train"].select(range(2)))
    batch = VITaskCollator(loaded_processor, digits_task())(rows)
    learnt = batch["labels"][0][batch["labels"][0] != -100]
    assert loaded_processor.tokenizer.decode(learnt) == digits_task().response(rows[0]["label"]) + "<eos>"
