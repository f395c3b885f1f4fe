"""Image classification datasets as `DatasetDict(image, label)`, loaded without surprises.

Every loader returns a `datasets.DatasetDict` whose splits are among "train", "validation"
and "test", with features `{"image": datasets.Image(), "label": datasets.ClassLabel(...)}`,
so the rest of the package never has to care where the images came from:

- `load_digits_dataset`: scikit-learn's bundled 8x8 handwritten digits (offline demos, tests);
- `load_image_folder`: `root/<class>/*.png` or `root/<split>/<class>/*.png`;
- `load_medmnist_npz`: a MedMNIST-format `.npz` file the user downloaded;
- `load_hf_dataset`: a Hub dataset or a local `save_to_disk` directory;
- `load_source`: one entry point that picks among them by name (used by configs and the CLI).

Bad input fails here, at load time, with a message that names the file, column or row,
rather than thousands of steps into training (`check_dataset`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.model_selection import train_test_split

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


def load_digits_dataset(
    *,
    image_size: int = 32,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    max_samples: int | None = None,
) -> DatasetDict:
    """Load scikit-learn's 8x8 handwritten digits as RGB PIL images in a `DatasetDict`.

    Each digit is scaled from 0..16 to 0..255 (white digit on black), upscaled to
    `image_size` with bicubic resampling (smooth strokes that stay legible) and converted to
    RGB, which is what VLM processors and timm transforms expect.

    `max_samples` caps the total number of images (drawn stratified) *before* splitting.
    `validation_size` and `test_size` are fractions of that total; the rest is "train".
    A split of size 0 is left out of the returned dict. Splits are stratified by label
    whenever each side of a cut is large enough to hold every class (otherwise a plain
    shuffled split is used, which only happens for tiny `max_samples`).

    Features: {"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)}.
    """
    from sklearn.datasets import load_digits  # local: sklearn.datasets is slow to import

    _check_fraction("validation_size", validation_size)
    _check_fraction("test_size", test_size)
    if validation_size + test_size >= 1:
        raise ValueError(f"validation_size + test_size must be < 1, got {validation_size + test_size}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    pool = np.arange(len(labels))
    if max_samples is not None and max_samples < len(pool):
        _, pool = _stratified_cut(pool, labels, max_samples, seed)

    n_test = round(test_size * len(pool))
    n_val = round(validation_size * len(pool))
    if len(pool) - n_test - n_val < 1:
        raise ValueError(f"no training images left: {len(pool)} images, {n_val} validation, {n_test} test")
    rest, test = _stratified_cut(pool, labels, n_test, seed)
    train, validation = _stratified_cut(rest, labels, n_val, seed)

    features = Features({"image": Image(), "label": ClassLabel(names=list(DIGIT_NAMES))})
    splits = {"train": train, "validation": validation, "test": test}
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {
                    "image": [_to_image(digits.images[i], image_size) for i in idx],
                    "label": labels[idx].tolist(),
                },
                features=features,
            )
            for name, idx in splits.items()
            if len(idx) > 0
        }
    )


def class_names_of(dataset, label_column: str = "label") -> list[str] | None:
    """Return the ClassLabel names of `label_column`, or None when it is not a ClassLabel.

    Accepts a `Dataset` or a `DatasetDict` (whose first split is read).
    """
    if isinstance(dataset, DatasetDict):
        if not dataset:
            return None
        dataset = next(iter(dataset.values()))
    feature = (getattr(dataset, "features", None) or {}).get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _stratified_cut(
    indices: np.ndarray, labels: np.ndarray, n_cut: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (rest, cut) with `len(cut) == n_cut`, stratified when possible.

    sklearn can only stratify when both sides hold at least one item per class and every
    class has two members; tiny requests fall back to a seeded shuffle split.
    """
    if n_cut == 0:
        return indices, indices[:0]
    y = labels[indices]
    classes, counts = np.unique(y, return_counts=True)
    can_stratify = min(n_cut, len(indices) - n_cut) >= len(classes) and counts.min() >= 2
    rest, cut = train_test_split(
        indices, test_size=n_cut, random_state=seed, stratify=y if can_stratify else None
    )
    return np.sort(rest), np.sort(cut)


def _to_image(pixels: np.ndarray, image_size: int) -> PILImage.Image:
    """8x8 array of 0..16 grey levels -> `image_size` x `image_size` RGB image."""
    grey = PILImage.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8))
    if image_size != grey.width:
        grey = grey.resize((image_size, image_size), PILImage.Resampling.BICUBIC)
    return grey.convert("RGB")
