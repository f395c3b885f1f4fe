"""The whole pipeline on real digits, for each family: TSM -> stage 1 -> stage 2 -> save -> reload -> predict."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vitask import TaskSpecificModel, VITaskConfig, VITaskTrainer, load_vitask, predict_classes, train_tsm
from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.models.tiny import save_tiny_vlm
from tests.conftest import FAMILIES, LEARNING_RUN


def _config(out, stage, steps):
    return VITaskConfig(**LEARNING_RUN, output_dir=str(out), stage=stage, max_steps=steps)


def _falls(losses):
    k = max(len(losses) // 3, 1)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


@pytest.mark.parametrize("family", FAMILIES)
def test_vitask_pipeline(tmp_path, family):
    data, task = load_digits_dataset(max_samples=91, seed=1), digits_task()
    assert len(data["train"]) == 64
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    history = train_tsm(tsm, data["train"], epochs=4, batch_size=8, learning_rate=3e-3, progress=False)
    assert history["train_loss"][-1] < history["train_loss"][0]

    base_dir = save_tiny_vlm(tmp_path / "base", family)  # the real from_pretrained path, from disk
    vlm = AutoModelForImageTextToText.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)

    stage1 = VITaskTrainer(
        model=vlm,
        args=_config(tmp_path / "s1", 1, 12),
        processing_class=processor,
        train_dataset=data["train"],
        task=task,
        tsm=tsm,
    )
    stage1.train()
    losses1 = [e["loss"] for e in stage1.state.log_history if "loss" in e]
    assert _falls(losses1), losses1

    stage2 = VITaskTrainer(
        model=stage1.model,
        args=_config(tmp_path / "s2", 2, 8),
        processing_class=processor,
        train_dataset=data["train"],
        task=task,
    )
    stage2.train()
    crt = [e["loss_crt"] for e in stage2.state.log_history if "loss_crt" in e]
    van = [e["loss_van"] for e in stage2.state.log_history if "loss_van" in e]
    assert len(crt) == 8 and _falls(van), van
    out = tmp_path / "final"
    stage2.save_model(str(out))

    model, processor2, task2 = load_vitask(out)
    assert task2 == task and model.tsm is not None and model.connector is not None
    images = data["test"]["image"][:4]
    # The reloaded model (its TSM and connector too) scores, predicts and answers as the trained one did,
    # and the adapter alone is the no-TSM model.
    from hf_vitask import score_options
    from hf_vitask.evaluation import generate_answers

    for use_tsm in (True, False):
        trained = score_options(stage2.model, processor, task, images, use_tsm=use_tsm)
        assert torch.allclose(
            score_options(model, processor2, task2, images, use_tsm=use_tsm), trained, atol=1e-4
        )
        preds = predict_classes(model, processor2, task2, images, use_tsm=use_tsm)
        assert preds == trained.argmax(-1).tolist()
        answers = generate_answers(stage2.model, processor, task, images, use_tsm=use_tsm)
        assert generate_answers(model, processor2, task2, images, use_tsm=use_tsm) == answers
        generated = predict_classes(model, processor2, task2, images, use_tsm=use_tsm, method="generate")
        assert generated == [task.parse(a) for a in answers]
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), str(out))
    from hf_vitask.models.modeling import VITaskModel

    assert torch.allclose(
        score_options(
            VITaskModel.from_vlm(plain, processor2, with_connector=False), processor2, task2, images
        ),
        trained,
        atol=1e-4,
    )
