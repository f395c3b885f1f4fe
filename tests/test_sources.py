from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value

from hf_vitask.data.digits import DIGIT_NAMES, load_digits_dataset
from hf_vitask.data.sources import class_names_of

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digit_names():
    assert DIGIT_NAMES == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_default_splits_partition_all_digits(digits):
    from sklearn.datasets import load_digits

    assert list(digits) == ["train", "validation", "test"]
    sizes = {name: len(split) for name, split in digits.items()}
    assert sum(sizes.values()) == N_DIGITS
    assert sizes["test"] == round(0.2 * N_DIGITS)
    assert sizes["validation"] == round(0.1 * N_DIGITS)
    # Every original digit lands in exactly one split: per-class totals match the source.
    totals = Counter()
    for split in digits.values():
        totals.update(split["label"])
    assert totals == Counter(load_digits().target.tolist())


def test_splits_are_stratified(digits):
    overall = Counter(digits["train"]["label"]) + Counter(digits["test"]["label"])
    overall += Counter(digits["validation"]["label"])
    for split in digits.values():
        counts = Counter(split["label"])
        assert set(counts) == set(range(10)), "every class present in every split"
        for label, count in counts.items():
            expected = overall[label] * len(split) / N_DIGITS
            assert abs(count - expected) <= 1.5


def test_features_and_class_names(digits):
    features = digits["train"].features
    assert isinstance(features["image"], Image)
    assert isinstance(features["label"], ClassLabel)
    assert features["label"].names == list(DIGIT_NAMES)
    assert class_names_of(digits) == list(DIGIT_NAMES)
    assert class_names_of(digits["test"]) == list(DIGIT_NAMES)


def test_images_are_rgb_white_on_black(digits):
    image = digits["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() >= 200


def test_image_size():
    ds = load_digits_dataset(image_size=16, max_samples=30)
    assert ds["train"][0]["image"].size == (16, 16)
    assert ds["train"][0]["image"].mode == "RGB"


def test_deterministic_for_a_seed():
    a, b = load_digits_dataset(seed=3, max_samples=200), load_digits_dataset(seed=3, max_samples=200)
    c = load_digits_dataset(seed=4, max_samples=200)
    for name in a:
        assert a[name]["label"] == b[name]["label"]
        assert [np.asarray(x).tobytes() for x in a[name]["image"]] == [
            np.asarray(x).tobytes() for x in b[name]["image"]
        ]
    images = lambda ds: [np.asarray(x).tobytes() for x in ds["train"]["image"]]  # noqa: E731
    assert images(a) != images(c)


def test_max_samples_caps_total_and_stays_stratified():
    ds = load_digits_dataset(max_samples=150, validation_size=0.2, test_size=0.2)
    assert {name: len(split) for name, split in ds.items()} == {"train": 90, "validation": 30, "test": 30}
    totals = Counter()
    for split in ds.values():
        totals.update(split["label"])
        assert set(split["label"]) == set(range(10))
    assert all(count == 15 for count in totals.values())


def test_tiny_max_samples_still_splits():
    ds = load_digits_dataset(max_samples=12)  # too small to stratify 1-2 image splits
    assert sum(len(split) for split in ds.values()) == 12
    assert len(ds["train"]) >= 1


def test_zero_sized_split_is_left_out():
    ds = load_digits_dataset(validation_size=0.0, max_samples=100)
    assert list(ds) == ["train", "test"]
    assert len(ds["train"]) + len(ds["test"]) == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"validation_size": -0.1},
        {"test_size": 1.0},
        {"validation_size": 0.5, "test_size": 0.5},
        {"image_size": 0},
        {"max_samples": 0},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        load_digits_dataset(**kwargs)


def test_class_names_of_without_class_label():
    plain = Dataset.from_dict({"label": [0, 1]}, features=None)
    assert isinstance(plain.features["label"], Value)
    assert class_names_of(plain) is None
    assert class_names_of(Dataset.from_dict({"x": [1]})) is None
    assert class_names_of(DatasetDict()) is None
    assert class_names_of([1, 2, 3]) is None
