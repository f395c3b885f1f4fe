"""The bundled demo: scikit-learn's 8x8 handwritten digits, offline, as a classification task and
as an instruction-free (image, description) task.

* :func:`load_digits_dataset` and :func:`digits_task`: the VITask quickstart's data and task.
* :func:`digit_descriptions` ("value: seven, parity: odd, stroke: thick"),
  :func:`add_digit_descriptions` and :func:`make_mc_questions` (held-out question wordings about
  the same attributes): the instruction-free demo.

Everything here is demo material; the package's own code paths never depend on it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.model_selection import train_test_split

from hf_vitask.data.collator import load_image
from hf_vitask.data.sources import check_split_sizes
from hf_vitask.task import TaskSpec

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

    check_split_sizes(validation_size, test_size)
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


def digits_task() -> TaskSpec:
    """The task of the bundled digits demo (scikit-learn's 8x8 handwritten digits)."""
    return TaskSpec(
        class_names=list(DIGIT_NAMES),
        name="digits",
        modality="handwritten digit",
        instruction_template="Analyze the given {modality} image. The possible digits are: {options}.",
        extra={"source": "sklearn.datasets.load_digits"},
    )


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


# -- the digits demo: attribute descriptions and held-out questions -------------------------------------

DIGIT_ATTRIBUTES = ("value", "parity", "stroke")

#: Held-out question wordings, never shown in training (which has no instruction text at all).
DIGIT_QUESTION_WORDINGS: dict[str, tuple[str, ...]] = {
    "value": (
        "Which digit is written in this image?",
        "What number does the handwritten character show?",
        "Read the numeral in the picture. Which one is it?",
    ),
    "parity": (
        "Is the number in this image odd or even?",
        "What is the parity of the handwritten digit?",
    ),
    "stroke": (
        "Is the pen stroke of this digit thick or thin?",
        "How heavy is the handwriting in this image?",
    ),
}


def stroke_intensity(image) -> float:
    """Mean grey level of the image in [0, 1]: more ink (white strokes on black) = thicker strokes."""
    img = load_image(image, "").convert("L")
    data = img.tobytes()
    return sum(data) / (255.0 * len(data))


@functools.lru_cache(maxsize=8)
def digits_stroke_threshold(image_size: int = 32) -> float:
    """Median :func:`stroke_intensity` of all 1,797 bundled digits rendered at ``image_size`` pixels,
    as :func:`load_digits_dataset` renders them (computed once, cached)."""
    import statistics

    from sklearn.datasets import load_digits

    images = load_digits().images
    return float(statistics.median(stroke_intensity(_to_image(px, image_size)) for px in images))


def digit_attributes(label: int, image, threshold: float | None = None) -> dict[str, str]:
    """``{"value": "seven", "parity": "odd", "stroke": "thick"|"thin"}`` for a bundled digit.

    Stroke is "thick" when the image's mean grey level is above ``threshold`` (default: the
    median over all bundled digits at this image size, :func:`digits_stroke_threshold`), so the
    two stroke classes are balanced over the whole set.
    """
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"a digit label is 0..9, got {label}")
    img = load_image(image, "")
    if threshold is None:
        threshold = digits_stroke_threshold(img.width)
    return {
        "value": DIGIT_NAMES[label],
        "parity": "even" if label % 2 == 0 else "odd",
        "stroke": "thick" if stroke_intensity(img) > threshold else "thin",
    }


def digit_descriptions(label: int, image, threshold: float | None = None, separator: str = ", ") -> str:
    """The description of a digit: ``"value: seven, parity: odd, stroke: thick"``
    (attributes as in :func:`digit_attributes`, joined by ``separator``)."""
    attrs = digit_attributes(label, image, threshold)
    return separator.join(f"{k}: {attrs[k]}" for k in DIGIT_ATTRIBUTES)


def add_digit_descriptions(
    data,
    threshold: float | None = None,
    *,
    label_column: str = "label",
    image_column: str = "image",
    description_column: str = "description",
):
    """Add a ``description`` column (:func:`digit_descriptions`) to a digits ``Dataset`` or ``DatasetDict``.
    The same threshold serves every split."""

    def describe(row):
        return {description_column: digit_descriptions(row[label_column], row[image_column], threshold)}

    return data.map(describe)


def make_mc_questions(
    dataset,
    seed: int = 0,
    *,
    attributes: Sequence[str] = DIGIT_ATTRIBUTES,
    wordings: dict[str, Sequence[str]] | None = None,
    num_value_options: int = 4,
    threshold: float | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> list[dict]:
    """Multiple-choice questions about the bundled digits, one per (row, attribute).

    Each question is ``{"image", "question", "options", "answer", "attribute", "wording"}``:
    the wording is drawn from ``wordings[attribute]`` (default :data:`DIGIT_QUESTION_WORDINGS`,
    phrasings never used in training), ``options`` are the attribute's values in the words of
    the descriptions ("seven"; "odd"/"even"; "thick"/"thin"), shuffled, with ``num_value_options``
    digit names (the true one and random others) for ``value``; ``answer`` indexes ``options``.
    Seeded: the same ``seed`` gives the same questions.
    """
    wordings = dict(DIGIT_QUESTION_WORDINGS if wordings is None else wordings)
    unknown = [a for a in attributes if a not in DIGIT_ATTRIBUTES or a not in wordings]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; known: {list(DIGIT_ATTRIBUTES)} (with wordings)")
    if not 2 <= num_value_options <= 10:
        raise ValueError(f"num_value_options must be in [2, 10], got {num_value_options}")
    rng = random.Random(seed)
    questions = []
    for i in range(len(dataset)):
        row = dataset[i]
        image = load_image(row[image_column], f" in row {i}")
        truth = digit_attributes(row[label_column], image, threshold)
        for attr in attributes:
            if attr == "value":
                others = [n for n in DIGIT_NAMES if n != truth["value"]]
                options = [truth["value"], *rng.sample(others, num_value_options - 1)]
            elif attr == "parity":
                options = ["odd", "even"]
            else:
                options = ["thick", "thin"]
            rng.shuffle(options)
            wording = rng.randrange(len(wordings[attr]))
            questions.append(
                {
                    "image": image,
                    "question": wordings[attr][wording],
                    "options": options,
                    "answer": options.index(truth[attr]),
                    "attribute": attr,
                    "wording": wording,
                }
            )
    return questions


__all__ = [
    "DIGIT_ATTRIBUTES",
    "DIGIT_NAMES",
    "DIGIT_QUESTION_WORDINGS",
    "add_digit_descriptions",
    "digit_attributes",
    "digit_descriptions",
    "digits_stroke_threshold",
    "digits_task",
    "load_digits_dataset",
    "make_mc_questions",
    "stroke_intensity",
]
