"""Data sources: image folders, MedMNIST .npz files, Hugging Face datasets, dispatch, checks.

Every input is generated in `tmp_path`; nothing is downloaded.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_vitask.data.digits import load_digits_dataset
from hf_vitask.data.sources import (
    MEDMNIST_CLASS_NAMES,
    SOURCES,
    check_dataset,
    class_names_of,
    load_hf_dataset,
    load_image_folder,
    load_medmnist_npz,
    load_source,
)

FOLDER_CLASSES = ("cat", "dog", "owl")


def _png(path: Path, value: int, size: int = 8) -> Path:
    """A small solid-colour PNG; `value` makes each file's pixels distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (size, size), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(path)
    return path


def _make_folder(root: Path, per_class: int, classes=FOLDER_CLASSES, start: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{name}_{i:02d}.png", start + 10 * c + i)
    return root


def _paths(split: Dataset) -> list[str]:
    """File paths behind the image column, read without decoding."""
    return [item["path"] for item in split.cast_column("image", Image(decode=False))["image"]]


def _label_sets(splits: DatasetDict) -> dict[str, set[int]]:
    return {name: set(split["label"]) for name, split in splits.items()}


@pytest.fixture
def flat_folder(tmp_path):
    return _make_folder(tmp_path / "flat", per_class=10)


@pytest.fixture
def split_folder(tmp_path):
    root = tmp_path / "split"
    _make_folder(root / "train", per_class=6, classes=("a", "b"))
    _make_folder(root / "val", per_class=2, classes=("a", "b"), start=100)
    _make_folder(root / "test", per_class=3, classes=("a", "b"), start=200)
    return root


# --- image folders -----------------------------------------------------------------------


def test_image_folder_flat_layout_is_split_stratified(flat_folder):
    ds = load_image_folder(flat_folder)
    assert list(ds) == ["train", "validation", "test"]
    assert {name: len(split) for name, split in ds.items()} == {"train": 21, "validation": 3, "test": 6}
    assert class_names_of(ds) == list(FOLDER_CLASSES)
    assert isinstance(ds["train"].features["image"], Image)
    assert all(labels == {0, 1, 2} for labels in _label_sets(ds).values()), "every class in every split"
    assert Counter(ds["test"]["label"]) == {0: 2, 1: 2, 2: 2}
    # Each file lands in exactly one split, with the label of its directory.
    paths = [p for split in ds.values() for p in _paths(split)]
    assert sorted(paths) == sorted(str(p) for p in flat_folder.glob("*/*.png"))
    for split in ds.values():
        for path, label in zip(_paths(split), split["label"]):
            assert Path(path).parent.name == FOLDER_CLASSES[label]


def test_image_folder_decodes_lazily_to_pil(flat_folder):
    item = load_image_folder(flat_folder)["train"][0]
    assert isinstance(item["image"], PILImage.Image) and item["image"].size == (8, 8)


def test_image_folder_split_is_deterministic_by_seed(flat_folder):
    a, b = load_image_folder(flat_folder, seed=1), load_image_folder(flat_folder, seed=1)
    c = load_image_folder(flat_folder, seed=2)
    assert all(_paths(a[name]) == _paths(b[name]) for name in a)
    assert _paths(a["test"]) != _paths(c["test"])


def test_image_folder_split_layout(split_folder):
    ds = load_image_folder(split_folder)
    assert {name: len(split) for name, split in ds.items()} == {"train": 12, "validation": 4, "test": 6}
    assert class_names_of(ds) == ["a", "b"]
    assert all(Path(p).parts[-3] == "val" for p in _paths(ds["validation"]))


def test_image_folder_split_layout_cuts_missing_validation_from_train(split_folder):
    for path in (split_folder / "val").glob("*/*.png"):
        path.unlink()
    for class_dir in (split_folder / "val").iterdir():
        class_dir.rmdir()
    (split_folder / "val").rmdir()
    ds = load_image_folder(split_folder, validation_size=0.25)
    assert {name: len(split) for name, split in ds.items()} == {"train": 9, "validation": 3, "test": 6}
    assert all(Path(p).parts[-3] == "train" for p in _paths(ds["validation"]))


def test_image_folder_class_names_fix_the_order(flat_folder):
    ds = load_image_folder(flat_folder, class_names=["owl", "cat", "dog", "eel"])
    assert class_names_of(ds) == ["owl", "cat", "dog", "eel"]
    for path, label in zip(_paths(ds["train"]), ds["train"]["label"]):
        assert Path(path).parent.name == ["owl", "cat", "dog"][label]


def test_image_folder_ignores_other_files(flat_folder):
    (flat_folder / "cat" / "notes.txt").write_text("not an image")
    (flat_folder / ".cache").mkdir()
    ds = load_image_folder(flat_folder)
    assert sum(len(split) for split in ds.values()) == 30


def test_image_folder_errors(tmp_path, flat_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class directories"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"\['owl'\] are not in class_names"):
        load_image_folder(flat_folder, class_names=["cat", "dog"])
    (flat_folder / "eel").mkdir()
    with pytest.raises(ValueError, match="class directory .*eel holds no images"):
        load_image_folder(flat_folder)


def test_image_folder_names_a_corrupt_image(flat_folder):
    (flat_folder / "dog" / "garbage.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"PIL cannot open 1 image file\(s\): .*dog/garbage\.png"):
        load_image_folder(flat_folder)


def test_image_folder_names_a_truncated_image(flat_folder):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = flat_folder / "owl" / "truncated.png"
    PILImage.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="owl/truncated.png"):
        load_image_folder(flat_folder)


def test_image_folder_split_dirs_must_share_classes(split_folder):
    _png(split_folder / "test" / "c" / "c_00.png", 1)
    with pytest.raises(
        ValueError, match=r"different classes: 'train' has \['a', 'b'\], 'test' has \['a', 'b', 'c'\]"
    ):
        load_image_folder(split_folder)


def test_image_folder_refuses_split_directories_mixed_with_class_directories(split_folder):
    """imagefolder would read train/val/test and skip 'extra' without a word."""
    _png(split_folder / "extra" / "a" / "a_00.png", 1)
    mixed = r"mixes split directories \['test', 'train', 'val'\] with other directories \['extra'\]"
    with pytest.raises(ValueError, match=mixed):
        load_image_folder(split_folder)


def test_missing_splits_are_cut_by_datasets_stratified_or_shuffled(flat_folder):
    """The cut is `Dataset.train_test_split`: stratified when both sides can hold every class,
    a seeded shuffle split for a request too small to stratify."""
    ds = load_image_folder(flat_folder, seed=3)
    reference = load_image_folder(flat_folder, test_size=0.0, validation_size=0.0)["train"]
    expected = reference.train_test_split(test_size=6, seed=3, stratify_by_column="label")
    assert _paths(ds["test"]) == _paths(expected["test"])
    tiny = load_image_folder(flat_folder, test_size=0.1, validation_size=0.0)  # 3 test images, 3 classes
    assert Counter(tiny["test"]["label"]) == {0: 1, 1: 1, 2: 1}
    smaller = load_image_folder(flat_folder, test_size=0.07, validation_size=0.0)  # 2 images < 3 classes
    assert len(smaller["test"]) == 2 and len(smaller["train"]) == 28


# --- MedMNIST .npz -----------------------------------------------------------------------


def _write_npz(
    path: Path, *, sizes=(20, 6, 8), image_shape=(28, 28), num_classes=2, label_shape=(1,), **override
):
    """A MedMNIST-format file: uint8 images, labels of shape (N, 1) as MedMNIST ships them."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        if label_shape == (1,):
            labels = labels[:, None]
        elif label_shape:  # multi-label, like ChestMNIST: one 0/1 column per class
            labels = rng.integers(0, 2, (n, *label_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path, arrays


def test_medmnist_grayscale_known_flag(tmp_path):
    path, arrays = _write_npz(tmp_path / "pneumoniamnist.npz")
    ds = load_medmnist_npz(path)
    assert {name: len(split) for name, split in ds.items()} == {"train": 20, "validation": 6, "test": 8}
    assert class_names_of(ds) == ["normal", "pneumonia"]
    assert ds["test"]["label"] == arrays["test_labels"][:, 0].tolist()
    image = ds["validation"][2]["image"]
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert (pixels == arrays["val_images"][2][..., None]).all(), "grey copied to all three channels"


def test_medmnist_rgb_unknown_stem_and_resize(tmp_path):
    path, arrays = _write_npz(
        tmp_path / "my_scans.npz", image_shape=(28, 28, 3), num_classes=3, label_shape=()
    )
    ds = load_medmnist_npz(path)
    assert class_names_of(ds) == ["class_0", "class_1", "class_2"]
    assert (np.asarray(ds["train"][5]["image"]) == arrays["train_images"][5]).all()
    resized = load_medmnist_npz(path, image_size=64, class_names=["x", "y", "z"])
    assert resized["train"][0]["image"].size == (64, 64)
    assert class_names_of(resized) == ["x", "y", "z"]


def test_medmnist_plus_size_suffix_finds_the_flag(tmp_path):
    path, _ = _write_npz(
        tmp_path / "bloodmnist_64.npz", image_shape=(8, 8, 3), num_classes=8, sizes=(16, 8, 8)
    )
    assert class_names_of(load_medmnist_npz(path))[:2] == ["basophil", "eosinophil"]


def test_medmnist_table_matches_the_medmnist_info():
    expected_sizes = {
        "pathmnist": 9,
        "dermamnist": 7,
        "octmnist": 4,
        "pneumoniamnist": 2,
        "retinamnist": 5,
        "breastmnist": 2,
        "bloodmnist": 8,
        "tissuemnist": 8,
        "organamnist": 11,
        "organcmnist": 11,
        "organsmnist": 11,
    }
    assert {flag: len(names) for flag, names in MEDMNIST_CLASS_NAMES.items()} == expected_sizes
    assert MEDMNIST_CLASS_NAMES["dermamnist"][4] == "melanoma"
    assert MEDMNIST_CLASS_NAMES["octmnist"][-1] == "normal"
    assert "chestmnist" not in MEDMNIST_CLASS_NAMES


def test_medmnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_medmnist_npz(tmp_path / "dermamnist.npz")
    path, _ = _write_npz(tmp_path / "chestmnist.npz", num_classes=2, label_shape=(14,))
    with pytest.raises(ValueError, match=r"multi-label tasks \(ChestMNIST\) are not supported"):
        load_medmnist_npz(path)
    path, _ = _write_npz(tmp_path / "partial.npz", test_labels=None)
    with pytest.raises(ValueError, match=r"missing arrays \['test_labels'\]; keys found: \[.*'train_images'"):
        load_medmnist_npz(path)
    path, _ = _write_npz(tmp_path / "pneumoniamnist.npz", num_classes=3)
    with pytest.raises(ValueError, match=r"pneumoniamnist.npz\[train\]: row 2 has label 2, outside \[0, 2\)"):
        load_medmnist_npz(path)
    path, _ = _write_npz(tmp_path / "volumes.npz", image_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="3D MedMNIST volumes are not supported"):
        load_medmnist_npz(path)
    with pytest.raises(ValueError, match="image_size"):
        load_medmnist_npz(path, image_size=0)


# --- Hugging Face datasets ---------------------------------------------------------------


def _images(n: int) -> list[PILImage.Image]:
    return [PILImage.new("RGB", (4, 4), (i, 0, 0)) for i in range(n)]


@pytest.fixture
def saved_classlabel(tmp_path):
    """A single saved `Dataset` with a ClassLabel: 3 classes x 10 rows."""
    names = ["benign", "malignant", "normal"]
    ds = Dataset.from_dict(
        {"image": _images(30), "label": [i % 3 for i in range(30)]},
        features=Features({"image": Image(), "label": ClassLabel(names=names)}),
    )
    ds.save_to_disk(str(tmp_path / "classlabel"))
    return tmp_path / "classlabel"


@pytest.fixture
def saved_string_labels(tmp_path):
    """A saved `DatasetDict` with other column names, string labels and a "valid" split."""

    def split(n, offset):
        return Dataset.from_dict(
            {
                "patient_id": list(range(offset, offset + n)),
                "diagnosis": [("pneumonia", "normal")[i % 2] for i in range(n)],
                "img": _images(n),
            },
            features=Features({"patient_id": Value("int64"), "diagnosis": Value("string"), "img": Image()}),
        )

    DatasetDict({"train": split(12, 0), "valid": split(4, 100)}).save_to_disk(str(tmp_path / "strings"))
    return tmp_path / "strings"


def test_hf_saved_dataset_with_classlabel_gets_stratified_splits(saved_classlabel):
    ds = load_hf_dataset(str(saved_classlabel))
    assert list(ds) == ["train", "validation", "test"]
    assert {name: len(split) for name, split in ds.items()} == {"train": 21, "validation": 3, "test": 6}
    assert class_names_of(ds) == ["benign", "malignant", "normal"]
    assert all(labels == {0, 1, 2} for labels in _label_sets(ds).values())
    assert ds["train"].column_names == ["image", "label"]
    again, other = load_hf_dataset(saved_classlabel, seed=0), load_hf_dataset(saved_classlabel, seed=5)
    red = lambda split: [np.asarray(x)[0, 0, 0] for x in split["image"]]  # noqa: E731
    assert red(again["test"]) == red(ds["test"])
    assert red(other["test"]) != red(ds["test"])


def test_hf_class_names_rename_a_classlabel(saved_classlabel):
    plain = load_hf_dataset(saved_classlabel)
    renamed = load_hf_dataset(saved_classlabel, class_names=["b", "m", "n"])
    assert class_names_of(renamed) == ["b", "m", "n"]
    assert renamed["train"]["label"] == plain["train"]["label"]
    with pytest.raises(ValueError, match="class_names has 2 names but the label ClassLabel has 3"):
        load_hf_dataset(saved_classlabel, class_names=["b", "m"])


def test_hf_string_labels_renamed_columns_and_split_alias(saved_string_labels):
    ds = load_hf_dataset(saved_string_labels, image_column="img", label_column="diagnosis", test_size=0.25)
    assert list(ds) == ["train", "validation", "test"]
    assert {name: len(split) for name, split in ds.items()} == {"train": 9, "validation": 4, "test": 3}
    assert class_names_of(ds) == ["normal", "pneumonia"]
    assert all(split.column_names == ["image", "label"] for split in ds.values())
    assert ds["validation"]["label"] == [1, 0, 1, 0]  # pneumonia, normal, ...
    assert isinstance(ds["validation"][0]["image"], PILImage.Image)

    fixed = load_hf_dataset(
        saved_string_labels, image_column="img", label_column="diagnosis", class_names=["pneumonia", "normal"]
    )
    assert class_names_of(fixed) == ["pneumonia", "normal"]
    assert fixed["validation"]["label"] == [0, 1, 0, 1]


def test_hf_missing_column_is_named_with_the_available_ones(saved_string_labels):
    with pytest.raises(
        ValueError, match=r"no column 'image'; available columns: \['patient_id', 'diagnosis', 'img'\]"
    ):
        load_hf_dataset(saved_string_labels, label_column="diagnosis")


def test_hf_unknown_string_label(saved_string_labels):
    with pytest.raises(ValueError, match=r"labels \['pneumonia'\] are not in class_names"):
        load_hf_dataset(
            saved_string_labels, image_column="img", label_column="diagnosis", class_names=["normal"]
        )


def test_hf_label_outside_classlabel_range(tmp_path):
    ds = Dataset.from_dict({"image": _images(5), "label": [0, 1, 0, 2, 1]})
    ds = ds.cast_column("label", ClassLabel(names=["a", "b"]))  # the cast does not check the range
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"\[train\]: row 3 has label 2, outside \[0, 2\)"):
        load_hf_dataset(tmp_path / "bad")


def test_hf_integer_labels_and_path_images(tmp_path):
    paths = [str(_png(tmp_path / "img" / f"{i}.png", i)) for i in range(10)]
    Dataset.from_dict({"file": paths, "y": [i % 2 for i in range(10)]}).save_to_disk(str(tmp_path / "ints"))
    ds = load_hf_dataset(tmp_path / "ints", image_column="file", label_column="y", validation_size=0.2)
    assert class_names_of(ds) == ["class_0", "class_1"]
    assert isinstance(ds["train"].features["image"], Image)
    assert ds["train"][0]["image"].size == (8, 8)
    with pytest.raises(ValueError, match="row 1 has label 1, outside"):
        load_hf_dataset(tmp_path / "ints", image_column="file", label_column="y", class_names=["only"])


# --- dispatch and checks -----------------------------------------------------------------


def test_load_source_dispatches(tmp_path, flat_folder, saved_classlabel):
    digits = load_source("digits", max_samples=50)
    assert digits["test"]["label"] == load_digits_dataset(max_samples=50)["test"]["label"]
    assert _paths(load_source("imagefolder", flat_folder)["test"]) == _paths(
        load_image_folder(flat_folder)["test"]
    )
    npz, _ = _write_npz(tmp_path / "dermamnist.npz", num_classes=7, sizes=(14, 7, 7))
    for alias in ("npz", "medmnist", "MedMNIST"):
        assert class_names_of(load_source(alias, npz))[0] == "actinic keratoses and intraepithelial carcinoma"
    assert len(load_source("hf", str(saved_classlabel), test_size=0.5)["test"]) == 15


def test_load_source_errors(flat_folder):
    with pytest.raises(
        ValueError,
        match=r"unknown data source 'csv'; choose one of \['digits', 'textures', 'imagefolder', 'npz'",
    ):
        load_source("csv", "data.csv")
    assert set(SOURCES) == {"digits", "textures", "imagefolder", "npz", "medmnist", "hf"}
    with pytest.raises(ValueError, match="needs a path"):
        load_source("imagefolder")
    with pytest.raises(ValueError, match="takes no path"):
        load_source("digits", flat_folder)
    with pytest.raises(TypeError):
        load_source("imagefolder", flat_folder, image_size=32)


def _labelled(labels, image="missing.png"):
    # A path that does not exist: check_dataset must not decode images.
    return Dataset.from_dict({"image": [image] * len(labels), "label": labels}).cast_column("image", Image())


def test_check_dataset_accepts_good_data_without_decoding_images():
    assert check_dataset(_labelled([0, 1, 2, 1]), num_classes=3) is None
    assert (
        check_dataset(DatasetDict({"train": _labelled([0]), "test": _labelled([1])}), num_classes=2) is None
    )


def test_check_dataset_errors_name_the_row():
    with pytest.raises(ValueError, match=r"train_set: row 3 has label 5, outside \[0, 3\) \(2 row"):
        check_dataset(_labelled([0, 1, 2, 5, 7]), num_classes=3, name="train_set")
    with pytest.raises(ValueError, match=r"row 1 has label -1"):
        check_dataset(_labelled([0, -1]), num_classes=3)
    with pytest.raises(ValueError, match=r"ds\[test\]: row 0 has label 4"):
        check_dataset(
            DatasetDict({"train": _labelled([0]), "test": _labelled([4])}), num_classes=2, name="ds"
        )
    strings = Dataset.from_dict({"image": ["a", "b"], "label": ["cat", "dog"]}).cast_column("image", Image())
    with pytest.raises(ValueError, match=r"row 0 has label 'cat'; labels must be integer"):
        check_dataset(strings, num_classes=2)


def test_check_dataset_empty_and_missing_columns():
    with pytest.raises(ValueError, match="val_set is empty"):
        check_dataset(_labelled([]), num_classes=2, name="val_set")
    with pytest.raises(ValueError, match=r"no column 'target'; available columns: \['image', 'label'\]"):
        check_dataset(_labelled([0]), num_classes=2, label_column="target")
    with pytest.raises(ValueError, match="num_classes"):
        check_dataset(_labelled([0]), num_classes=0)


@pytest.mark.parametrize("loader", [load_image_folder, load_hf_dataset])
def test_invalid_split_sizes(loader, tmp_path):
    with pytest.raises(ValueError, match="validation_size"):
        loader(tmp_path, validation_size=0.5, test_size=0.5)


def test_hf_split_names_are_canonical(tmp_path, caplog):
    def part(n):
        return Dataset.from_dict({"image": _images(n), "label": [i % 2 for i in range(n)]})

    DatasetDict({"train": part(10), "dev": part(4), "unsupervised": part(2)}).save_to_disk(
        str(tmp_path / "a")
    )
    with caplog.at_level("WARNING", logger="hf_vitask.data.sources"):
        ds = load_hf_dataset(tmp_path / "a", test_size=0.0)
    assert {name: len(split) for name, split in ds.items()} == {"train": 10, "validation": 4}
    assert "ignoring split 'unsupervised'" in caplog.text
    DatasetDict({"train": part(10), "val": part(2), "validation": part(2)}).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="splits 'val' and 'validation' are both 'validation'"):
        load_hf_dataset(tmp_path / "b")


def test_a_stray_test_label_is_named_not_a_new_class(tmp_path):
    """The classes of an unknown .npz come from its train split: one label 9 in the test split is an
    error naming the split and row (it used to grow the task to 10 classes)."""
    test_labels = (np.arange(8) % 4).astype(np.uint8)[:, None]
    test_labels[5] = 9
    path, _ = _write_npz(tmp_path / "lesions.npz", num_classes=4, test_labels=test_labels)
    with pytest.raises(
        ValueError, match=r"lesions.npz\[test\]: row 5 has label 9, outside \[0, 4\).*class_names"
    ):
        load_medmnist_npz(path)
    # a class absent from the train split is fine when class_names lists it
    train_labels = (np.arange(20) % 3).astype(np.uint8)[:, None]  # no class 3 in train
    path, _ = _write_npz(tmp_path / "rare.npz", num_classes=4, train_labels=train_labels)
    with pytest.raises(ValueError, match=r"rare.npz\[validation\]: row 3 has label 3"):
        load_medmnist_npz(path)
    ds = load_medmnist_npz(path, class_names=["a", "b", "c", "d"])
    assert (
        class_names_of(ds) == ["a", "b", "c", "d"]
        and 3 in ds["test"]["label"]
        and 3 not in ds["train"]["label"]
    )


def test_textures_are_generated_offline_the_same_for_a_seed():
    from hf_vitask.data.synthetic import TEXTURE_NAMES, load_textures_dataset

    a = load_textures_dataset(samples_per_class=10, seed=1)
    b = load_source("textures", samples_per_class=10, seed=1)
    assert class_names_of(a) == list(TEXTURE_NAMES) and {k: len(v) for k, v in a.items()} == {
        "train": 28,
        "validation": 4,
        "test": 8,
    }
    assert a["test"]["label"] == b["test"]["label"] and np.array_equal(
        np.asarray(a["test"][0]["image"]), np.asarray(b["test"][0]["image"])
    )
    assert sorted(set(a["train"]["label"])) == [0, 1, 2, 3] and a["train"][0]["image"].size == (32, 32)
    with pytest.raises(ValueError, match="takes no path"):
        load_source("textures", "somewhere")


# --- data files (json, csv, parquet) through load_data_files and the pipeline -----------------


def _load_data_files(*args, **kwargs):
    from hf_vitask.data.sources import load_data_files

    return load_data_files(*args, **kwargs)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _png_bytes(value: int, size: int = 6) -> bytes:
    import io

    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jsonl_file_with_relative_paths_and_string_labels_is_split_stratified(tmp_path):
    """The most common user data: one JSONL file of (relative image path, class name) rows."""
    root = tmp_path / "lesions"
    names = ("owl", "cat", "dog")
    rows = [{"image": f"img/{i}.png", "label": names[i % 3]} for i in range(30)]
    for i in range(30):
        _png(root / "img" / f"{i}.png", i)
    data = _load_data_files("json", _jsonl(root / "data.jsonl", rows))
    assert list(data) == ["train", "validation", "test"]
    assert {name: len(split) for name, split in data.items()} == {"train": 21, "validation": 3, "test": 6}
    assert class_names_of(data) == ["cat", "dog", "owl"]  # sorted
    assert all(labels == {0, 1, 2} for labels in _label_sets(data).values()), "every class in every split"
    for split in data.values():  # each image keeps its own row's label, its path made absolute
        for path, label in zip(_paths(split), split["label"]):
            assert Path(path).is_absolute() and Path(path).parent == root / "img"
            assert class_names_of(data)[label] == names[int(Path(path).stem) % 3]
    assert data["test"][0]["image"].size == (8, 8)
    # the same file named as an 'hf' source is read the same way, never looked up on the Hub
    assert _paths(load_source("hf", str(root / "data.jsonl"))["test"]) == _paths(data["test"])


def test_csv_split_mapping_with_integer_labels_and_class_names(tmp_path):
    def table(name, ids):  # absolute image paths, integer labels
        rows = [[str(_png(tmp_path / "images" / f"{i}.png", i)), i % 2] for i in ids]
        return _csv(tmp_path / name, ["file", "y"], rows)

    files = {"train": table("train.csv", range(20)), "val": table("val.csv", range(20, 24))}
    columns = {"image_column": "file", "label_column": "y"}
    data = _load_data_files("csv", files, **columns, class_names=["normal", "pneumonia"], test_size=0.25)
    assert {name: len(split) for name, split in data.items()} == {"train": 15, "validation": 4, "test": 5}
    assert class_names_of(data) == ["normal", "pneumonia"]
    assert data["validation"]["label"] == [0, 1, 0, 1]
    assert _paths(data["validation"]) == [str(tmp_path / "images" / f"{i}.png") for i in range(20, 24)]
    assert class_names_of(_load_data_files("csv", files, **columns)) == ["class_0", "class_1"]
    with pytest.raises(ValueError, match=r"train.csv \[train\]: row 1 has label 1, outside \[0, 1\)"):
        _load_data_files("csv", files, **columns, class_names=["only"])


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = ["benign", "malignant"] * 5
    as_dicts = [{"bytes": _png_bytes(10 * i), "path": None} for i in range(10)]
    pq.write_table(pa.table({"img": as_dicts, "dx": labels}), tmp_path / "dicts.parquet")
    as_bytes = [_png_bytes(10 * i) for i in range(10)]
    pq.write_table(pa.table({"img": as_bytes, "dx": labels}), tmp_path / "raw.parquet")
    for name in ("dicts.parquet", "raw.parquet"):
        columns = {"image_column": "img", "label_column": "dx"}
        data = _load_data_files("parquet", tmp_path / name, **columns, validation_size=0.2, test_size=0.2)
        assert {split: len(rows) for split, rows in data.items()} == {"train": 6, "validation": 2, "test": 2}
        assert isinstance(data["train"].features["image"], Image)
        for row in data["test"]:
            assert row["image"].size == (6, 6)
            assert row["label"] == row["image"].getpixel((0, 0))[0] // 10 % 2  # red 10*i <-> labels[i]


def test_pipeline_honours_column_names_class_order_and_split_files(tmp_path, flat_folder):
    from hf_vitask.config import DataArguments
    from hf_vitask.pipeline import load_data_and_tasks

    folder = tmp_path / "cxr"
    names = ("normal", "pneumonia")
    for split, ids in (("train", range(20)), ("test", range(20, 26))):
        # images in sub-folders named like the splits, next to the split files
        rows = [{"file": f"{split}/{i}.png", "diagnosis": names[i % 2], "site": "a"} for i in ids]
        _jsonl(folder / f"{split}.jsonl", rows)
        for i in ids:
            _png(folder / split / f"{i}.png", i)
    args = DataArguments(
        dataset="json",
        dataset_path=str(folder),
        dataset_image_column="file",
        dataset_label_column="diagnosis",
        class_names=["pneumonia", "normal"],
    )
    data, task = load_data_and_tasks(args)
    assert {name: len(split) for name, split in data.items()} == {"train": 18, "validation": 2, "test": 6}
    assert task.class_names == class_names_of(data) == ["pneumonia", "normal"]
    assert all(split.column_names == ["image", "label"] for split in data.values())
    assert data["test"]["label"] == [1, 0, 1, 0, 1, 0]  # 20.png is "normal", the class at index 1

    # a {split: file} mapping, as written in YAML
    mapping = {"train": str(folder / "train.jsonl"), "dev": str(folder / "test.jsonl")}
    columns = {"dataset_image_column": "file", "dataset_label_column": "diagnosis"}
    data, _ = load_data_and_tasks(DataArguments(dataset="json", dataset_path=mapping, **columns))
    assert {name: len(split) for name, split in data.items()} == {"train": 16, "validation": 6, "test": 4}

    # class_names fix the label order of every source, not only the task's
    data, task = load_data_and_tasks(
        DataArguments(dataset="imagefolder", dataset_path=str(flat_folder), class_names=["owl", "cat", "dog"])
    )
    assert task.class_names == class_names_of(data) == ["owl", "cat", "dog"]
    assert all(
        Path(path).parent.name == task.class_names[label]
        for path, label in zip(_paths(data["test"]), data["test"]["label"])
    )
    with pytest.raises(ValueError, match="the 'imagefolder' source has none"):
        DataArguments(dataset="imagefolder", dataset_path=str(flat_folder), dataset_label_column="y")


def test_dataset_path_is_a_string_on_the_command_line_and_a_mapping_in_yaml():
    from transformers import HfArgumentParser

    from hf_vitask.config import DataArguments

    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--dataset", "csv", "--dataset_path", "labels.csv", "--dataset_image_column", "file"]
    )
    assert (args.dataset_path, args.dataset_image_column) == ("labels.csv", "file")
    parser.set_defaults(dataset_path={"train": "a.csv", "test": "b.csv"})  # how the CLI applies a YAML file
    (args,) = parser.parse_args_into_dataclasses(args=[])
    assert args.dataset_path == {"train": "a.csv", "test": "b.csv"}


def test_data_file_errors_name_the_file_split_and_row(tmp_path, monkeypatch):
    import datasets

    from hf_vitask.config import DataArguments
    from hf_vitask.pipeline import load_data

    _png(tmp_path / "img" / "0.png", 0)
    rows = [{"image": "img/0.png", "label": "a"}, {"image": "img/gone.png", "label": "b"}]
    missing = _jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(FileNotFoundError, match=r"data.jsonl \[train\]: row 1 names the image file 'img/go"):
        _load_data_files("json", missing)
    train = _jsonl(tmp_path / "train.jsonl", [{"image": "img/0.png", "label": "a"}] * 4)
    test = _jsonl(tmp_path / "test.jsonl", [{"image": "img/0.png", "label": label} for label in "aab"])
    with pytest.raises(ValueError, match=r"test.jsonl \[test\]: row 2 has label 'b', not in class_names"):
        _load_data_files("json", {"train": train, "test": test}, class_names=["a"])
    with pytest.raises(ValueError, match=r"no column 'path'; available columns: \['image', 'label'\]"):
        _load_data_files("json", train, image_column="path")

    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match=r"empty.jsonl \[train\]: the file is empty"):
        _load_data_files("json", tmp_path / "empty.jsonl")
    header_only = _csv(tmp_path / "header.csv", ["image", "label"], [])
    with pytest.raises(ValueError, match=r"header.csv \[train\]: no rows read as 'csv'"):
        _load_data_files("csv", header_only)
    with pytest.raises(FileNotFoundError, match="holds no parquet files"):
        _load_data_files("parquet", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'nowhere.jsonl' \(train split\) is missing"):
        _load_data_files("json", "nowhere.jsonl")
    _jsonl(tmp_path / "extra.jsonl", [{"image": "img/0.png", "label": "a"}])
    with pytest.raises(ValueError, match=r"split of \['data.jsonl', 'empty.jsonl', 'extra.jsonl'\]"):
        _load_data_files("json", tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("load_dataset must not be called for an unknown file format")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(ValueError, match=r"unknown data source or file format 'jsonx'.*'csv', .*'json', "):
        _load_data_files("jsonx", train)
    with pytest.raises(ValueError, match="unknown data source or file format 'jsonx'"):
        load_data(DataArguments(dataset="jsonx", dataset_path=str(train)))
