"""A transformers image classifier as the TSM: features, training, save/load, VITask and the plug-in path."""

import pytest
import torch

from hf_vitask.models.tsm import TaskSpecificModel, TransformersTSM


def tiny_vit(seed: int = 0, hidden: int = 32) -> TransformersTSM:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=10,
    )
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return TransformersTSM(ViTForImageClassification(config), processor)


def test_the_exemplar_is_what_the_classification_head_sees(digits):
    tsm = tiny_vit().eval()
    pixels = tsm.preprocess(digits["train"]["image"][:3])
    assert pixels.shape == (3, 3, 32, 32) and tsm.feature_dim == 32 and tsm.num_classes == 10
    features = tsm.features(pixels)
    assert features.shape == (3, 32)
    torch.testing.assert_close(tsm.model.classifier(features), tsm(pixels))
    with pytest.raises(ValueError, match="pooled feature only"):
        tsm.features(pixels, kind="patch")


def test_it_trains_saves_and_loads_like_a_timm_tsm(digits, tmp_path):
    from hf_vitask import train_tsm

    tsm = tiny_vit()
    before = {k: v.clone() for k, v in tsm.state_dict().items()}
    history = train_tsm(
        tsm,
        digits["train"],
        eval_dataset=digits["validation"],
        epochs=3,
        batch_size=16,
        learning_rate=3e-3,
        progress=False,
    )
    assert len(history["train_loss"]) == 3 and history["train_loss"][-1] < history["train_loss"][0]
    assert any(not torch.equal(before[k], v) for k, v in tsm.state_dict().items())
    tsm.save_pretrained(tmp_path / "tsm")
    loaded = TaskSpecificModel.from_pretrained(tmp_path / "tsm")
    assert isinstance(loaded, TransformersTSM)
    pixels = tsm.preprocess(digits["test"]["image"][:4])
    torch.testing.assert_close(loaded(pixels), tsm.eval()(pixels))


def test_it_feeds_vitask_and_plugs_in_at_evaluation(digits, task, tmp_path):
    from hf_vitask import VITaskConfig, VITaskTrainer, evaluate_vlm, load_vitask
    from hf_vitask.models.tiny import build_tiny_vlm

    vlm, processor = build_tiny_vlm("llava")
    args = VITaskConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        lora_r=4,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = VITaskTrainer(
        model=vlm,
        args=args,
        processing_class=processor,
        train_dataset=digits["train"],
        task=task,
        tsm=tiny_vit(),
    )
    trainer.train()
    assert trainer.model.connector.config.tsm_dim == 32
    trainer.save_model(str(tmp_path / "bundle"))
    model, processor, task = load_vitask(tmp_path / "bundle")
    assert isinstance(model.tsm, TransformersTSM)
    own = evaluate_vlm(
        model,
        processor,
        task,
        digits["test"],
        use_tsm=True,
        methods=("likelihood",),
        max_samples=4,
        progress=False,
    )
    plugged = evaluate_vlm(
        model,
        processor,
        task,
        digits["test"],
        use_tsm=True,
        tsm=tiny_vit(seed=1),
        methods=("likelihood",),
        max_samples=4,
        progress=False,
    )
    assert own["num_samples"] == plugged["num_samples"] == 4
    assert isinstance(model.tsm, TransformersTSM) and model.tsm is not None  # restored after the plug-in
