"""TaskSpecificModel on timm's tiny `test_*` architectures (random init, no downloads)."""

import json
import os
import random

import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from hf_vitask.data.digits import load_digits_dataset
from hf_vitask.models.tsm import CONFIG_NAME, WEIGHTS_NAME, TaskSpecificModel, tsm_predict
from hf_vitask.trainers.tsm import train_tsm

# test_resnet reaches ~80-90% validation accuracy on 96 digits in 8 epochs at 32 px (seeds
# 0-3: 0.81-0.88, about 2 s on 2 CPU cores); the threshold leaves a wide margin over chance (0.1).
MIN_DIGIT_ACCURACY = 0.5
CNN_32PX = {"pretrained_cfg_overlay": {"input_size": (3, 32, 32)}}


def make_vit(num_classes=10):
    # 32 px with 8 px patches -> 16 patch tokens + 1 class token, 64-dim.
    return TaskSpecificModel("test_vit", num_classes, img_size=32, patch_size=8)


def make_cnn(num_classes=10):
    return TaskSpecificModel("test_resnet", num_classes, **CNN_32PX)


@pytest.fixture(scope="module")
def digits():
    # 96 train / 32 validation / 32 test, every class in every split.
    return load_digits_dataset(max_samples=160, validation_size=0.2, test_size=0.2, seed=0)


def test_vit_shapes():
    tsm = make_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    assert tsm.feature_dim == 64 and tsm.num_prefix_tokens == 1
    assert tsm(x).shape == (2, 10)
    assert tsm.features(x).shape == (2, 64)
    assert tsm.features(x, kind="patch").shape == (2, 16, 64)
    assert tsm.data_config["input_size"] == (3, 32, 32)


def test_pooled_feature_is_what_the_head_sees():
    tsm = make_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tsm.model.get_classifier()(tsm.features(x)), tsm(x))


def test_cnn_shapes():
    tsm = make_cnn().eval()
    assert tsm.num_prefix_tokens == 0 and tsm.feature_dim == 96
    assert tsm.data_config["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 64, 64)  # stride 32 -> 2x2 feature map
    assert tsm(x).shape == (2, 10)
    assert tsm.features(x).shape == (2, 96)
    assert tsm.features(x, kind="patch").shape == (2, 4, 96)


def test_unknown_feature_kind():
    with pytest.raises(ValueError, match="unknown feature kind 'cls'"):
        make_vit().features(torch.randn(1, 3, 32, 32), kind="cls")


def test_img_size_on_a_cnn_sets_the_preprocessing_size(tmp_path):
    tsm = TaskSpecificModel("test_resnet", 2, img_size=32)
    assert tsm.data_config["input_size"] == (3, 32, 32)
    assert tsm.preprocess([Image.new("L", (8, 8))]).shape == (1, 3, 32, 32)
    tsm.save_pretrained(tmp_path)
    assert TaskSpecificModel.from_pretrained(tmp_path).data_config["input_size"] == (3, 32, 32)


def test_config_never_stores_pretrained():
    tsm = make_vit(3)
    assert tsm.config == {
        "model_name": "test_vit",
        "num_classes": 3,
        "img_size": 32,
        "timm_kwargs": {"patch_size": 8},
    }


@pytest.mark.parametrize("make", [make_vit, make_cnn])
def test_save_load_round_trip(tmp_path, make):
    tsm = make().eval()
    tsm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    loaded = TaskSpecificModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config == json.loads(json.dumps(tsm.config))
    assert loaded.data_config == tsm.data_config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), tsm(x))
        assert torch.equal(loaded.features(x, kind="patch"), tsm.features(x, kind="patch"))


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        TaskSpecificModel.from_pretrained(tmp_path)
    make_vit().save_pretrained(tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        TaskSpecificModel.from_pretrained(tmp_path)


def test_preprocess_converts_any_mode():
    tsm = make_vit()
    images = [
        Image.new("L", (8, 8), 128),
        Image.new("RGBA", (40, 20), (255, 0, 0, 128)),
        Image.new("P", (32, 32)),
        Image.new("RGB", (32, 32), (0, 255, 0)),
    ]
    batch = tsm.preprocess(images)
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.allclose(batch[0, 0], batch[0, 1])  # grey stays grey in all channels
    assert tsm.preprocess(images, train=True).shape == (4, 3, 32, 32)


def test_preprocess_rejects_non_images():
    tsm = make_vit()
    with pytest.raises(ValueError, match="item 1 is a ndarray"):
        tsm.preprocess([Image.new("RGB", (32, 32)), torch.zeros(3, 32, 32).numpy()])
    with pytest.raises(ValueError, match="no images"):
        tsm.preprocess([])


def test_train_tsm_learns_digits(digits):
    torch.manual_seed(0)
    tsm = make_cnn()
    history = train_tsm(
        tsm,
        digits["train"],
        eval_dataset=digits["validation"],
        epochs=8,
        batch_size=8,
        learning_rate=3e-3,
        seed=0,
        progress=False,
    )
    losses, accuracies = history["train_loss"], history["eval_accuracy"]
    assert len(losses) == len(accuracies) == 8
    assert losses[-1] < 0.5 * losses[0]
    assert max(accuracies) >= MIN_DIGIT_ACCURACY
    assert accuracies[history["best_epoch"]] == max(accuracies)
    assert not tsm.training
    # The best epoch's weights are the ones kept.
    probs = tsm_predict(tsm, digits["validation"])
    kept = (probs.argmax(-1) == torch.tensor(digits["validation"]["label"])).float().mean().item()
    assert kept == pytest.approx(max(accuracies))


def test_train_tsm_is_deterministic_and_keeps_global_rng(digits):
    small = digits["train"].select(range(33))  # 33 = 4 batches of 8 + a single row merged in
    torch.manual_seed(0)
    state = make_vit().state_dict()
    runs = []
    for _ in range(2):
        tsm = make_vit()
        tsm.load_state_dict(state)
        rng_before, python_rng_before = torch.get_rng_state(), random.getstate()
        history = train_tsm(tsm, small, epochs=2, batch_size=8, seed=7, progress=False)
        assert torch.equal(torch.get_rng_state(), rng_before) and random.getstate() == python_rng_before
        runs.append((history, tsm.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert h1 == h2 and "eval_accuracy" not in h1 and h1["best_epoch"] == 1
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_tsm_predict_probabilities(digits):
    tsm = make_vit()
    probs = tsm_predict(tsm, digits["test"], batch_size=10)
    assert probs.shape == (len(digits["test"]), 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(digits["test"])))


def _tiny_dataset(labels):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    images = [Image.new("L", (8, 8), 30 * i) for i in range(len(labels))]
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_train_tsm_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"row 2 has label 12"):
        train_tsm(make_vit(), _tiny_dataset([0, 1, 12]), progress=False)
    with pytest.raises(ValueError, match=r"eval_dataset row 0 has label -1"):
        train_tsm(make_vit(), _tiny_dataset([0, 1]), eval_dataset=_tiny_dataset([-1]), progress=False)


def test_train_tsm_rejects_empty_and_missing_columns(digits):
    with pytest.raises(ValueError, match="empty"):
        train_tsm(make_vit(), digits["train"].select([]), progress=False)
    with pytest.raises(ValueError, match="no column"):
        train_tsm(make_vit(), digits["train"], label_column="target", progress=False)


def test_the_tsm_trains_through_the_trainer_with_checkpoints_and_resume(digits, tmp_path):
    """A TSMTrainer run checkpoints the TSM in its own format and resumes to the uninterrupted weights."""
    import shutil

    from transformers import TrainingArguments

    from hf_vitask.trainers.tsm import TSMTrainer

    def run(out, resume=None):
        torch.manual_seed(0)
        tsm = make_cnn()
        args = TrainingArguments(
            output_dir=str(out),
            num_train_epochs=2,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            save_strategy="epoch",
            eval_strategy="epoch",
            logging_strategy="epoch",
            report_to="none",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = TSMTrainer(tsm, args, digits["train"], digits["validation"])
        trainer.train(resume_from_checkpoint=resume)
        return tsm, trainer

    whole, trainer = run(tmp_path / "a")
    checkpoints = sorted((tmp_path / "a").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2 and {CONFIG_NAME, WEIGHTS_NAME} <= {
        p.name for p in checkpoints[-1].iterdir()
    }
    assert [e for e in trainer.state.log_history if "eval_accuracy" in e]  # evaluated every epoch
    reloaded = TaskSpecificModel.from_pretrained(checkpoints[-1])
    for key, value in whole.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / checkpoints[-1].name)  # killed during the second epoch
    resumed, _ = run(tmp_path / "b", resume=True)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)
