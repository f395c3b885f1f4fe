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
