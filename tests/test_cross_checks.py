"""Mismatches are errors at construction or load, naming what does not fit (never silent)."""

from __future__ import annotations

import pytest

from hf_vitask import TaskSpecificModel, VITaskModel, VITaskTrainer
from hf_vitask.models.tiny import build_tiny_vlm

from .test_trainer import _args, _trainer


def test_a_tsm_for_other_classes_is_refused(tmp_path, digits, task):
    four = TaskSpecificModel("test_resnet", num_classes=4, pretrained=False, img_size=32)
    with pytest.raises(ValueError, match=r"TSM has 4 output classes but the task\(s\) 'digits' \(10\) have 10"):
        _trainer(tmp_path, digits, task, four)


def test_stage_2_needs_a_trained_connector(tmp_path, digits, task, tsm):
    vlm, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="connector was never trained"):
        VITaskTrainer(model=vlm, args=_args(tmp_path, stage=2), processing_class=processor,
                      train_dataset=digits["train"], task=task, tsm=tsm)
    allowed = VITaskTrainer(model=vlm, args=_args(tmp_path, stage=2, freeze_connector=False),
                            processing_class=processor, train_dataset=digits["train"], task=task, tsm=tsm)
    assert all(p.requires_grad for p in allowed.model.connector.parameters())
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=1)
    stage1.train()
    stage2 = VITaskTrainer(model=stage1.model, args=_args(tmp_path / "s2", stage=2), processing_class=processor,
                           train_dataset=digits["train"], task=task)
    assert not any(p.requires_grad for p in stage2.model.connector.parameters())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, digits, task, tsm):
    root = tmp_path_factory.mktemp("bundle")
    trainer = _trainer(root, digits, task, tsm, max_steps=1)
    trainer.train()
    trainer.save_model(str(root / "bundle"))
    return root / "bundle"


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json", "exemplar_connector.safetensors"])
def test_a_missing_bundle_file_is_named(bundle, tmp_path, missing):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"bundle .* is incomplete: missing .*{missing}"):
        VITaskModel.from_pretrained(copy)


def test_a_bundle_on_a_base_of_another_family_is_refused(bundle):
    loaded = VITaskModel.from_pretrained(bundle)  # its own base: fine
    assert loaded.connector.trained
    qwen, _ = build_tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="trained on a llava model .* base_model given is a qwen2_vl model"):
        VITaskModel.from_pretrained(bundle, base_model=qwen)


def test_evaluating_with_the_tsm_needs_one(tmp_path, digits, task):
    from hf_vitask import pipeline
    from hf_vitask.config import DataArguments, EvalArguments

    vanilla = _trainer(tmp_path, digits, task, None, max_steps=1, ep_weight=0.0, rda_weight=0.0)
    vanilla.train()
    vanilla.save_model(str(tmp_path / "vanilla"))
    args = EvalArguments(model_path=str(tmp_path / "vanilla"), eval_use_tsm="yes", eval_max_samples=4)
    with pytest.raises(ValueError, match="eval_use_tsm=yes, but the bundle .* has no exemplar connector"):
        pipeline.run_evaluate(args, DataArguments(max_samples=48), str(tmp_path))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only case")
def test_fp16_on_cpu_is_an_error_like_bf16(tmp_path):
    from hf_vitask import InstructionFreeConfig, VITaskConfig

    for config in (VITaskConfig, InstructionFreeConfig):
        with pytest.raises(ValueError, match="fp16=True needs a GPU"):
            config(output_dir=str(tmp_path), fp16=True, report_to="none")


def test_a_bundle_with_broken_processor_files_is_named(bundle, tmp_path):
    import shutil

    from hf_vitask import load_vitask

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "tokenizer.json").write_text("{ not json")
    with pytest.raises(FileNotFoundError, match=r"Cannot load the processor saved in .*copy"):
        load_vitask(copy)
