"""A second bundled dataset, generated offline: noisy synthetic textures with multi-token class names.

The digits are one small dataset of one kind (single-word labels, clean strokes). An ordering of
methods seen there need not hold elsewhere, so ablations also run on this one: four texture
classes whose names are 1 to 7 words long (which exercises option scoring's length handling),
drawn with random frequency, orientation, phase, contrast, colour tint and strong pixel noise so
that neither the task-specific model nor the VLM solves it trivially. Same seed, same images.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

__all__ = ["TEXTURE_NAMES", "load_textures_dataset"]

TEXTURE_NAMES: tuple[str, ...] = (
    "stripes",
    "checkerboard",
    "concentric rings",
    "scattered bright dots on a dark background",
)


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One grey-level pattern in [0, 1] of class ``label``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    if label == 0:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(2.0, 5.0)
        u = x * np.cos(angle) + y * np.sin(angle)
        return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi)))
    if label == 1:  # checkerboard, randomly rotated
        angle = rng.uniform(0, np.pi / 2)
        freq = rng.uniform(2.0, 4.5)
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        phase = rng.uniform(0, 2 * np.pi, 2)
        return 0.5 + 0.5 * np.sign(
            np.sin(2 * np.pi * freq * u + phase[0]) * np.sin(2 * np.pi * freq * v + phase[1])
        )
    if label == 2:  # rings around a random centre
        cy, cx = rng.uniform(0.25, 0.75, 2)
        freq = rng.uniform(3.0, 6.0)
        r = np.hypot(x - cx, y - cy)
        return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * r + rng.uniform(0, 2 * np.pi)))
    # dots
    out = np.zeros((size, size))
    for _ in range(int(rng.integers(6, 16))):
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.03, 0.08)
        out[np.hypot(x - cx, y - cy) < radius] = 1.0
    return out


def _render(label: int, size: int, rng: np.random.Generator, noise: float) -> PILImage.Image:
    grey = _pattern(label, size, rng)
    contrast = rng.uniform(0.35, 1.0)
    tint = rng.uniform(0.4, 1.0, 3)
    rgb = (0.5 + contrast * (grey[..., None] - 0.5)) * tint + rng.normal(0.0, noise, (size, size, 3))
    return PILImage.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def load_textures_dataset(
    *,
    image_size: int = 32,
    samples_per_class: int = 150,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    noise: float = 0.3,
    seed: int = 0,
) -> DatasetDict:
    """Generate ``samples_per_class`` noisy textures per class (:data:`TEXTURE_NAMES`), split
    stratified into train / validation / test (fractions of the total).

    Features: ``{"image": datasets.Image(), "label": datasets.ClassLabel(names=TEXTURE_NAMES)}``.
    """
    if samples_per_class < 3:
        raise ValueError(f"samples_per_class must be >= 3 (one per split), got {samples_per_class}")
    if not 0 <= validation_size < 1 or not 0 <= test_size < 1 or validation_size + test_size >= 1:
        raise ValueError(
            f"validation_size + test_size must be in [0, 1), got {validation_size} + {test_size}"
        )
    rng = np.random.default_rng(seed)
    splits: dict[str, dict[str, list]] = {
        name: {"image": [], "label": []} for name in ("train", "validation", "test")
    }
    n_test = round(test_size * samples_per_class)
    n_val = round(validation_size * samples_per_class)
    for label in range(len(TEXTURE_NAMES)):
        images = [_render(label, image_size, rng, noise) for _ in range(samples_per_class)]
        parts = {
            "test": images[:n_test],
            "validation": images[n_test : n_test + n_val],
            "train": images[n_test + n_val :],
        }
        for name, part in parts.items():
            splits[name]["image"] += part
            splits[name]["label"] += [label] * len(part)
    features = Features({"image": Image(), "label": ClassLabel(names=list(TEXTURE_NAMES))})
    return DatasetDict(
        {
            name: Dataset.from_dict(columns, features=features).shuffle(seed=seed).flatten_indices()
            for name, columns in splits.items()
            if columns["label"]
        }
    )
