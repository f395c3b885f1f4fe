"""QLoRA on a GPU: 4-bit base + LoRA through VITask stage 1 and 2 (skipped without CUDA)."""

import pytest
import torch

import hf_vitask
from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.models.loading import load_vlm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_qlora_stage1_and_stage2_on_cuda(tmp_path, family):
    import bitsandbytes as bnb

    model, processor = load_vlm(f"tiny-{family}", load_in_4bit=True, torch_dtype="bfloat16")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    vision = [
        n
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and ("vision" in n or "visual" in n)
    ]
    assert not vision, vision
    data = load_digits_dataset(max_samples=96)
    task = digits_task()
    tsm = hf_vitask.TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    hf_vitask.train_tsm(tsm, data["train"], epochs=2, progress=False)
    args = dict(
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        bf16=True,
        gradient_checkpointing=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )
    stage1 = hf_vitask.VITaskTrainer(
        model=model,
        args=hf_vitask.VITaskConfig(output_dir=str(tmp_path / "s1"), **args),
        processing_class=processor,
        train_dataset=data["train"],
        task=task,
        tsm=tsm,
    )
    stage1.train()
    stage2 = hf_vitask.VITaskTrainer(
        model=stage1.model,
        args=hf_vitask.VITaskConfig(output_dir=str(tmp_path / "s2"), stage=2, **args),
        processing_class=processor,
        train_dataset=data["train"],
        task=task,
    )
    stage2.train()
    losses = [e["loss"] for e in stage2.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    stage2.save_model(str(tmp_path / "bundle"))
    preds = hf_vitask.predict_classes(stage2.model, processor, task, data["test"]["image"][:4], use_tsm=True)
    assert len(preds) == 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate runs FSDP only across two or more GPUs")
def test_fsdp_trains_like_one_process_and_saves_a_loadable_bundle(tmp_path):
    """FSDP through transformers' own path: the bundle is written from the gathered state dict and
    loads; the weights match a single-process run with the same global batch."""
    from .test_distributed import _run

    args = ("--job", "stage1", "--max_steps", "4")
    one = _run(tmp_path / "one", 1, *args)
    two = _run(tmp_path / "fsdp", 2, *args, "--fsdp", "full_shard")
    assert two["fsdp"] and two["world_size"] == 2, "FSDP was not enabled"
    for name, weight in one["weights"].items():
        torch.testing.assert_close(
            two["weights"][name].float().cpu(), weight.float().cpu(), atol=1e-3, rtol=1e-3, msg=name
        )
