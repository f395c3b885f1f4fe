"""Shared fixtures: tiny VLMs, the bundled digits, a trained tiny TSM. All offline, built once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.models.tiny import build_tiny_vlm  # noqa: E402
from hf_vitask.models.tsm import TaskSpecificModel  # noqa: E402
from hf_vitask.trainers.tsm import train_tsm  # noqa: E402

FAMILIES = ["llava", "qwen2_vl"]

#: Trainer arguments of a short run on a tiny model (a test adds the output dir and what it is about).
SHORT_RUN = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    learning_rate=5e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    seed=0,
    disable_tqdm=True,
)
#: Trainer arguments of a run meant to learn (the loss falls over its steps).
LEARNING_RUN = dict(
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lora_r=8,
    lora_alpha=16,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=0,
    disable_tqdm=True,
)


@pytest.fixture(scope="session")
def digits():
    """96 real digits: 67 train / 9 validation / 20 test, every class in every split."""
    return load_digits_dataset(max_samples=96, seed=0)


@pytest.fixture(scope="session")
def task():
    return digits_task()


@pytest.fixture(scope="session")
def tsm(digits):
    """A tiny CNN TSM trained for a few seconds (reaches well above chance on digits)."""
    model = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    train_tsm(model, digits["train"], epochs=6, batch_size=8, learning_rate=3e-3, progress=False)
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture()
def tiny(family):
    """A fresh tiny (model, processor) of the parametrised family."""
    return build_tiny_vlm(family, seed=0)


def make_image(seed: int = 0, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def sklearn_metrics(predictions, references, scores=None) -> dict:
    """The classification metrics recomputed with scikit-learn, independently of ``hf_vitask.metrics``:
    accuracy; macro-F1 over the classes in the references or the predictions; one-vs-rest macro AUC of
    the softmax of ``scores`` (N, C) over the classes in the references. ``None`` predictions (parse
    failures) are wrong answers; ``parse_failure_rate`` is added when there are any."""
    from sklearn.metrics import f1_score, roc_auc_score

    references = np.asarray([int(r) for r in references])
    failures = sum(p is None for p in predictions)
    ids = np.asarray([-1 if p is None else int(p) for p in predictions])
    labels = sorted(set(references.tolist()) | {int(p) for p in ids if p >= 0})
    out = {
        "accuracy": float((ids == references).mean()),
        "macro_f1": float(f1_score(references, ids, labels=labels, average="macro", zero_division=0)),
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out["auc"] = float(
            np.mean([roc_auc_score(references == c, probs[:, c]) for c in np.unique(references)])
        )
    if failures:
        out["parse_failure_rate"] = failures / len(references)
    return out


@pytest.fixture(scope="session")
def random_image():
    """``random_image(seed, size=32)`` -> a random RGB PIL image."""
    return make_image


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (not failed) on CPU machines such as CI."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
