"""Image classification datasets as `DatasetDict(image, label)`, loaded without surprises.

Every loader returns a `datasets.DatasetDict` whose splits are among "train", "validation"
and "test", with features `{"image": datasets.Image(), "label": datasets.ClassLabel(...)}`,
so the rest of the package never has to care where the images came from:

- `load_digits_dataset`: scikit-learn's bundled 8x8 handwritten digits (offline demos, tests);
- `load_image_folder`: `root/<class>/*.png` or `root/<split>/<class>/*.png`;
- `load_medmnist_npz`: a MedMNIST-format `.npz` file the user downloaded;
- `load_hf_dataset`: a Hub dataset or a local `save_to_disk` directory;
- `load_data_files`: a table of (image, label) rows in a file format `datasets` reads (json, csv,
  parquet, ...): one file, a folder of per-split files, or a {split: file} mapping;
- `load_source`: one entry point that picks among the named sources (used by configs and the CLI;
  file formats go to `load_data_files`).

Bad input fails here, at load time, with a message that names the file, column or row,
rather than thousands of steps into training (`check_dataset`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, concatenate_datasets

# datasets' own registry of file readers: what `load_dataset` resolves offline, and the extensions of each
from datasets.packaged_modules import _EXTENSION_TO_MODULE, _PACKAGED_DATASETS_MODULES
from PIL import Image as PILImage

from hf_vitask.data.images import to_rgb

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("digits", "textures", "imagefolder", "npz", "medmnist", "hf")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Split names seen in the wild, mapped to the three this package uses.
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}

# Label names of the 2D MedMNIST flags, copied verbatim from INFO[flag]["label"] in
# medmnist/info.py of the medmnist package (v3.0.2, github.com/MedMNIST/MedMNIST).
# Left out: chestmnist (multi-label, unsupported) and the 3D flags (volumes, not images).
MEDMNIST_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "tissuemnist": (
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ),
    **dict.fromkeys(
        ("organamnist", "organcmnist", "organsmnist"),
        (
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ),
    ),
}


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


def load_source(source: str, path: str | os.PathLike | None = None, **kwargs) -> DatasetDict:
    """Load a dataset by source name, the one entry point configs and the CLI need.

    `source` is one of `SOURCES`: "digits" (bundled, no path), "textures" (generated, no path), "imagefolder", "npz" (alias
    "medmnist") or "hf" (a Hub name or a `save_to_disk` directory). `kwargs` go to the loader.
    Tables in a file format (json, csv, parquet, ...) load with `load_data_files`.
    """
    key = source.lower()
    if key == "digits":
        if path is not None:
            raise ValueError(
                f"the 'digits' source is bundled with scikit-learn and takes no path, got {path!r}"
            )
        from hf_vitask.data.digits import load_digits_dataset

        return load_digits_dataset(**kwargs)
    if key == "textures":
        from hf_vitask.data.synthetic import load_textures_dataset

        if path is not None:
            raise ValueError(f"the 'textures' source is generated offline and takes no path, got {path!r}")
        return load_textures_dataset(**kwargs)
    loaders = {
        "imagefolder": load_image_folder,
        "npz": load_medmnist_npz,
        "medmnist": load_medmnist_npz,
        "hf": load_hf_dataset,
    }
    if key not in loaders:
        raise ValueError(
            f"unknown data source {source!r}; choose one of {list(SOURCES)} (tables in a file format such as "
            "json, csv or parquet load with load_data_files)"
        )
    if path is None:
        raise ValueError(f"the {source!r} data source needs a path (or a Hub name for 'hf')")
    return loaders[key](path, **kwargs)


def load_hf_dataset(
    name_or_path: str | os.PathLike,
    *,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    **load_kwargs,
) -> DatasetDict:
    """Load a Hugging Face dataset and bring it to the package's (image, label) shape.

    A local directory written by `save_to_disk` (a `Dataset` or a `DatasetDict`) is read with
    `datasets.load_from_disk`; anything else goes to `datasets.load_dataset(name_or_path,
    **load_kwargs)`. Then:

    - splits "val", "valid" and "dev" become "validation"; splits other than train/validation/test
      are dropped (with a log warning); a lone `Dataset` becomes the "train" split;
    - `image_column`/`label_column` are renamed to "image"/"label" and every other column dropped;
    - string labels become a `ClassLabel` (sorted unique names, or `class_names` to fix the order);
      integer labels get `class_names` or "class_0", "class_1", ...; an existing `ClassLabel`
      keeps its names unless `class_names` (same length) renames them;
    - a missing "validation" or "test" split is cut from "train", stratified by label, with
      `validation_size`/`test_size` as fractions of the train split (0 leaves it out).

    Raises ValueError naming the column (and listing the available ones) or the row when a
    column is missing or a label lies outside the class range.

    A local data file (`data.jsonl`, `labels.csv`, ...) goes to `load_data_files` in the format its
    extension names: `load_dataset` would look such a path up on the Hub.
    """
    check_split_sizes(validation_size, test_size)
    if Path(name_or_path).is_file():
        return load_data_files(
            _format_of(Path(name_or_path)),
            name_or_path,
            image_column=image_column,
            label_column=label_column,
            class_names=class_names,
            validation_size=validation_size,
            test_size=test_size,
            seed=seed,
            **load_kwargs,
        )
    source = str(name_or_path)
    splits = _canonical_splits(_read_hf(name_or_path, load_kwargs), source)
    splits = DatasetDict(
        {
            split: _take_columns(dataset, image_column, label_column, f"{source}[{split}]")
            for split, dataset in splits.items()
        }
    )
    splits, names = _encode_labels(splits, class_names, source)
    check_dataset(splits, num_classes=len(names), name=source)
    return _add_missing_splits(splits, validation_size, test_size, seed)


def load_data_files(
    file_format: str,
    data_files: str | os.PathLike | Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    *,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    **load_kwargs,
) -> DatasetDict:
    """(image, label) rows from local json/csv/parquet/... files, the format users bring most, offline.

    `file_format` must be one of `datasets`' packaged readers (any other name would go to the Hub).
    `data_files`: one file (a single table, split here), a folder of files named after their split
    (train.jsonl, val.jsonl, test-00000-of-00002.parquet) or a {split: file(s)} mapping; missing
    validation/test splits are cut from train, stratified, as for an image folder. Images: paths
    relative to their data file, absolute paths or bytes. Labels: as in `load_hf_dataset`. Errors
    name the file, split and row (from 0, a CSV header excluded). `load_kwargs` go to
    `datasets.load_dataset` (e.g. `sep=";"`).
    """
    check_split_sizes(validation_size, test_size)
    file_format = _check_file_format(file_format)
    source = str(data_files)
    columns = (image_column, label_column)
    splits = DatasetDict(
        {
            split: concatenate_datasets(
                [_read_table(file_format, path, split, columns, class_names, load_kwargs) for path in paths]
            )
            for split, paths in _data_files(data_files, file_format).items()
        }
    )
    splits, names = _encode_labels(splits, class_names, source)
    check_dataset(splits, num_classes=len(names), name=source)
    return _add_missing_splits(splits, validation_size, test_size, seed)


def load_image_folder(
    root: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
) -> DatasetDict:
    """Load images laid out as `root/<class>/*.png` or `root/<split>/<class>/*.png`.

    `datasets`' imagefolder builder reads the folder (its image extensions, its split directory
    names: train, val|valid|validation|dev, test); missing validation/test splits are then cut
    from train, as is everything in the flat layout (stratified; sizes are fractions of the
    train images). Class names are the sorted class directory names, or `class_names` to fix the
    order (it may list classes without a directory; a directory missing from it is an error).

    What the builder would accept silently fails here, by name: an empty class directory, split
    directories mixed with class directories, splits with different classes, and a corrupt image
    (every file is checked with PIL's `verify()` now, not in a dataloader worker mid-training).
    The "image" column stores file paths and `datasets.Image` decodes them lazily.
    """
    check_split_sizes(validation_size, test_size)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    split_dirs = _folder_split_dirs(root) or {"train": root}
    class_dirs = {split: _class_dirs(directory) for split, directory in split_dirs.items()}
    splits = _canonical_splits(_read_image_folder(root), str(root))
    paths = {split: _image_paths(dataset) for split, dataset in splits.items()}
    _check_class_dirs(class_dirs, paths)
    _verify_images([Path(path) for split_paths in paths.values() for path in split_paths])
    splits = _rename_folder_classes(splits, class_names)
    return _add_missing_splits(splits, validation_size, test_size, seed)


def load_medmnist_npz(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
) -> DatasetDict:
    """Load a MedMNIST-format `.npz` file (downloaded by the user; this never downloads).

    The file holds `{train,val,test}_images` (uint8, (N, H, W) grayscale or (N, H, W, 3) RGB)
    and `{train,val,test}_labels` ((N,) or (N, 1)); "val" becomes "validation". Images become
    RGB PIL images, resized to `image_size` x `image_size` (bicubic) when given. Multi-label
    files (labels (N, K>1), e.g. ChestMNIST) are refused: this package classifies one label.

    Class names: `class_names`, else the MedMNIST label names when the file stem is a known
    2D flag ("dermamnist.npz", "pneumoniamnist_224.npz", see `MEDMNIST_CLASS_NAMES`), else
    "class_0", "class_1", ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: download the MedMNIST .npz file first (this package never downloads it)"
        )
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    arrays = _read_npz(path)
    flag = _medmnist_flag(path)
    if class_names is not None:
        names = list(class_names)
    elif flag in MEDMNIST_CLASS_NAMES:
        names = list(MEDMNIST_CLASS_NAMES[flag])
    else:  # the training labels define the classes: a stray label elsewhere must not add one
        train = arrays.get("train", next(iter(arrays.values())))[1]
        names = [f"class_{i}" for i in range(int(train.max(initial=0)) + 1)]
    for split, (_, labels) in arrays.items():
        try:
            _check_label_range(labels, len(names), f"{path.name}[{_SPLIT_ALIASES[split]}]")
        except ValueError as err:
            if class_names is None and flag not in MEDMNIST_CLASS_NAMES:
                raise ValueError(
                    f"{err} (the classes are those of the train split, {len(names)}; if that split lacks "
                    "some, list every class in class_names)"
                ) from None
            raise

    features = _features(names)
    return DatasetDict(
        {
            _SPLIT_ALIASES[split]: Dataset.from_dict(
                {"image": [_npz_to_image(pixels, image_size) for pixels in images], "label": labels.tolist()},
                features=features,
            )
            for split, (images, labels) in arrays.items()
        }
    )


def check_dataset(
    dataset: Dataset | DatasetDict,
    *,
    num_classes: int,
    name: str = "dataset",
    image_column: str = "image",
    label_column: str = "label",
) -> None:
    """Fail early, naming the problem, on data that would only break training much later.

    Checks that the dataset is not empty, has both columns and that every label is an integer
    in [0, num_classes) (the error names the first bad row). Cheap: it reads the label column
    only and decodes no image. A `DatasetDict` is checked split by split.
    """
    if isinstance(dataset, DatasetDict):
        for split, part in dataset.items():
            check_dataset(
                part,
                num_classes=num_classes,
                name=f"{name}[{split}]",
                image_column=image_column,
                label_column=label_column,
            )
        return
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} has no column {missing[0]!r}; available columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    _check_label_range(_label_array(dataset[label_column], name), num_classes, name)


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_split_sizes(validation_size: float, test_size: float) -> None:
    _check_fraction("validation_size", validation_size)
    _check_fraction("test_size", test_size)
    if validation_size + test_size >= 1:
        raise ValueError(f"validation_size + test_size must be < 1, got {validation_size + test_size}")


def _features(class_names: Sequence[str]) -> Features:
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    return Features({"image": Image(), "label": ClassLabel(names=list(class_names))})


def _label_array(values, name: str) -> np.ndarray:
    """Labels as an int64 array, or a ValueError naming the first row that is not an int."""
    labels = np.asarray(values)
    if labels.dtype.kind in "iu" and labels.ndim == 1:
        return labels.astype(np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"{name}: expected one label per row, got labels of shape {labels.shape}")
    row = next(
        (i for i, v in enumerate(labels) if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), 0
    )
    raise ValueError(
        f"{name}: row {row} has label {labels.tolist()[row]!r}; labels must be integer class ids"
    )


def _check_label_range(labels: np.ndarray, num_classes: int, name: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(
            f"{name}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {num_classes}) "
            f"({len(bad)} row(s) out of range in all)"
        )


def _add_missing_splits(
    splits: DatasetDict, validation_size: float, test_size: float, seed: int
) -> DatasetDict:
    """Cut absent "validation"/"test" splits from "train" with `Dataset.train_test_split`.

    Sizes are fractions of the train split; a size that rounds to 0 leaves the split out.
    The cut is stratified by label whenever each side can hold every class.
    """
    if "train" not in splits:
        return splits
    rest = splits["train"]
    n_test = 0 if "test" in splits else round(test_size * len(rest))
    n_val = 0 if "validation" in splits else round(validation_size * len(rest))
    if n_test == n_val == 0:
        return splits
    if len(rest) - n_test - n_val < 1:
        raise ValueError(f"no training images left: {len(rest)} images, {n_val} validation, {n_test} test")
    out = dict(splits)
    for split, size in (("test", n_test), ("validation", n_val)):
        if size:
            rest, out[split] = _cut(rest, size, seed)
    out["train"] = rest
    return DatasetDict({split: out[split] for split in SPLITS if split in out})


def _cut(dataset: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, cut) with `len(cut) == size`, stratified by label when each side can hold every class.

    `datasets` stratifies only when every class has two members and both sides hold at least
    one item per class; tiny requests fall back to a seeded shuffle split.
    """
    counts = np.bincount(_label_array(dataset["label"], "train"))
    counts = counts[counts > 0]
    can_stratify = min(size, len(dataset) - size) >= len(counts) and counts.min() >= 2
    parts = dataset.train_test_split(
        test_size=size, seed=seed, stratify_by_column="label" if can_stratify else None
    )
    return parts["train"], parts["test"]


# --- Hugging Face datasets ---------------------------------------------------------------


def _read_hf(name_or_path: str | os.PathLike, load_kwargs: dict) -> DatasetDict:
    """`load_from_disk` for a `save_to_disk` directory, `load_dataset` for anything else."""
    path = Path(name_or_path)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
    else:
        from datasets import load_dataset

        data = load_dataset(str(name_or_path), **load_kwargs)
    if isinstance(data, Dataset):
        return DatasetDict({"train": data})
    if isinstance(data, DatasetDict):
        return data
    raise TypeError(
        f"{str(name_or_path)!r} loaded as {type(data).__name__}; only Dataset and DatasetDict are supported "
        "(no streaming)"
    )


def _canonical_splits(data: DatasetDict, source: str) -> DatasetDict:
    """Rename splits to train/validation/test (val, valid, dev -> validation); drop the rest."""
    found: dict[str, str] = {}
    for name in data:
        canonical = _SPLIT_ALIASES.get(name.lower())
        if canonical is None:
            logger.warning("%s: ignoring split %r (not train/validation/test)", source, name)
        elif canonical in found:
            raise ValueError(f"{source}: splits {found[canonical]!r} and {name!r} are both {canonical!r}")
        else:
            found[canonical] = name
    if not found:
        raise ValueError(f"{source}: no train/validation/test split among {list(data)}")
    return DatasetDict({split: data[found[split]] for split in SPLITS if split in found})


def _take_columns(dataset: Dataset, image_column: str, label_column: str, where: str) -> Dataset:
    """Keep only the image and label columns, named "image" and "label", the image a `datasets.Image`."""
    return _as_image(_select_columns(dataset, image_column, label_column, where))


def _select_columns(dataset: Dataset, image_column: str, label_column: str, where: str) -> Dataset:
    """Keep only the image and label columns, renamed "image" and "label"."""
    if image_column == label_column:
        raise ValueError(f"image_column and label_column are both {image_column!r}")
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"{where} has no column {column!r}; available columns: {dataset.column_names}")
    dataset = dataset.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset


def _as_image(dataset: Dataset) -> Dataset:
    """Cast the "image" column (paths, bytes or {"bytes", "path"} dicts) to a lazily decoded `Image`."""
    if not isinstance(dataset.features["image"], Image):
        dataset = dataset.cast_column("image", Image())
    return dataset


def _encode_labels(
    splits: DatasetDict, class_names: Sequence[str] | None, source: str
) -> tuple[DatasetDict, list[str]]:
    """Give every split the same `ClassLabel`; return the splits and the class names."""
    kinds = {split: _label_kind(dataset.features["label"]) for split, dataset in splits.items()}
    if len({str(kind) for kind in kinds.values()}) > 1:
        raise ValueError(f"{source}: splits disagree on the label type: {kinds}")
    kind = next(iter(kinds.values()))
    if isinstance(kind, ClassLabel):
        names = list(kind.names)
        if class_names is not None and len(class_names) != len(names):
            raise ValueError(
                f"{source}: class_names has {len(class_names)} names but the label ClassLabel has "
                f"{len(names)}: {names}"
            )
    elif kind == "string":
        values = {value for dataset in splits.values() for value in dataset["label"]}
        if None in values:
            raise ValueError(f"{source}: some labels are missing (None)")
        names = sorted(values)
        unknown = sorted(values - set(class_names or values))
        if unknown:
            raise ValueError(f"{source}: labels {unknown} are not in class_names {list(class_names)}")
    else:  # integer ids
        top = max(
            (int(_label_array(d["label"], f"{source}[{s}]").max(initial=-1)) for s, d in splits.items()),
            default=-1,
        )
        names = [f"class_{i}" for i in range(top + 1)]
    names = list(class_names) if class_names is not None else names
    target = _features(names)["label"]
    encoded = DatasetDict({split: dataset.cast_column("label", target) for split, dataset in splits.items()})
    return encoded, names


def _label_kind(feature) -> ClassLabel | str:
    """The label feature itself when it is a ClassLabel, else "string" or "int"."""
    if isinstance(feature, ClassLabel):
        return feature
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "string"
    if isinstance(dtype, str) and dtype.startswith(("int", "uint")):
        return "int"
    raise ValueError(f"the label column must hold integers, strings or a ClassLabel, got {feature}")


# --- data files (json, csv, parquet, ...) ------------------------------------------------


def _check_file_format(file_format: str) -> str:
    """The reader's name, lower-cased; any other name would send `load_dataset` to the Hub."""
    key = file_format.lower()
    if key not in _PACKAGED_DATASETS_MODULES or key in SOURCES:
        formats = sorted(set(_PACKAGED_DATASETS_MODULES) - set(SOURCES))
        raise ValueError(
            f"unknown data source or file format {file_format!r}; choose one of {list(SOURCES)} or a file "
            f"format that datasets reads: {formats}"
        )
    return key


def _format_of(path: Path) -> str:
    """The `datasets` reader of a data file, from its extension."""
    reader = _EXTENSION_TO_MODULE.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: datasets has no reader for the extension {path.suffix!r}")
    return reader[0]


def _data_files(data_files, file_format: str) -> dict[str, list[Path]]:
    """{split: existing files} from one file, a folder or a {split: file(s)} mapping."""
    if isinstance(data_files, Mapping):
        found = _mapped_data_files(data_files)
    elif Path(data_files).is_dir():
        found = _folder_data_files(Path(data_files), file_format)
    else:
        found = {"train": [Path(data_files)]}
    for split, paths in found.items():
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"data file {str(path)!r} ({split} split) is missing or not a file")
    return found


def _mapped_data_files(mapping: Mapping) -> dict[str, list[Path]]:
    """A user's {split: file or files} with canonical split names (val, valid, dev -> validation)."""
    found: dict[str, tuple[str, list[Path]]] = {}
    for name, files in mapping.items():
        split = _SPLIT_ALIASES.get(str(name).lower())
        if split is None:
            raise ValueError(f"unknown split {name!r} in {dict(mapping)}; use train, validation or test")
        if split in found:
            raise ValueError(f"splits {found[split][0]!r} and {name!r} are both {split!r}")
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        found[split] = (name, [Path(path) for path in paths])
    return {split: found[split][1] for split in SPLITS if split in found}


def _folder_data_files(folder: Path, file_format: str) -> dict[str, list[Path]]:
    """The folder's own files of the format, by the split their name starts with.

    Hand-made rather than `datasets`' split inference, which also matches image sub-folders
    named train/ or test/. One file, or files without split names, are a single table ("train").
    """
    extensions = {ext.lower() for ext, (reader, _) in _EXTENSION_TO_MODULE.items() if reader == file_format}
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions and p.name[0] != "."
    )
    if not files:
        raise FileNotFoundError(f"{folder} holds no {file_format} files (extensions {sorted(extensions)})")
    split_of = {p: _SPLIT_ALIASES.get(re.split(r"[-._ ]", p.stem.lower(), maxsplit=1)[0]) for p in files}
    if len(files) == 1 or not any(split_of.values()):
        return {"train": files}
    unnamed = [path.name for path, split in split_of.items() if split is None]
    if unnamed:
        raise ValueError(
            f"{folder}: cannot tell the split of {unnamed}; name each file after its split "
            "(train, val, test) or give a {split: file} mapping"
        )
    found = set(split_of.values())
    return {split: [p for p in files if split_of[p] == split] for split in SPLITS if split in found}


def _read_table(
    file_format: str,
    path: Path,
    split: str,
    columns: tuple[str, str],
    class_names: Sequence[str] | None,
    load_kwargs: dict,
) -> Dataset:
    """One data file as (image, label) rows, its image paths resolved and its labels checked."""
    from datasets import load_dataset

    where = f"{path} [{split}]"
    if path.stat().st_size == 0:
        raise ValueError(f"{where}: the file is empty")
    reader = _EXTENSION_TO_MODULE.get(path.suffix.lower(), (None, {}))
    kwargs = (reader[1] if reader[0] == file_format else {}) | load_kwargs  # e.g. sep="\t" for a .tsv file
    try:
        table = load_dataset(file_format, data_files=str(path), split="train", **kwargs)
    except (StopIteration, ValueError) as err:  # what datasets raises for a table without rows
        raise ValueError(f"{where}: no rows read as {file_format!r} ({type(err).__name__}: {err})") from err
    if len(table) == 0:
        raise ValueError(f"{where}: the file holds no rows")
    table = _select_columns(table, *columns, where)
    _check_known_labels(table, class_names, where)
    return _as_image(_resolve_image_paths(table, path.resolve().parent, where))


def _resolve_image_paths(dataset: Dataset, folder: Path, where: str) -> Dataset:
    """Make string image paths absolute (relative ones are read from `folder`) and check every file now."""
    feature = dataset.features["image"]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return dataset  # bytes or {"bytes": ...} dicts carry the image itself
    paths = []
    for row, value in enumerate(dataset["image"]):
        if value is None:
            raise ValueError(f"{where}: row {row} has no image")
        path = folder / value  # an absolute value stays as it is
        if not path.is_file():
            raise FileNotFoundError(
                f"{where}: row {row} names the image file {value!r}, not found ({path}; relative paths start "
                f"at the data file's folder)"
            )
        paths.append(path)
    _verify_images(paths)
    dataset = dataset.remove_columns("image").add_column("image", [str(path) for path in paths])
    return dataset.select_columns(["image", "label"])


def _check_known_labels(dataset: Dataset, class_names: Sequence[str] | None, where: str) -> None:
    """Name the first row whose label is missing or not among `class_names`, file by file."""
    try:
        kind = _label_kind(dataset.features["label"])
    except ValueError as err:  # e.g. a CSV column of integers with a blank cell reads as floats
        raise ValueError(f"{where}: {err}") from None
    if kind == "string":
        known = None if class_names is None else set(class_names)
        for row, label in enumerate(dataset["label"]):
            if label is None:
                raise ValueError(f"{where}: row {row} has no label")
            if known is not None and label not in known:
                raise ValueError(
                    f"{where}: row {row} has label {label!r}, not in class_names {list(class_names)}"
                )
    elif kind == "int" and class_names is not None:
        _check_label_range(_label_array(dataset["label"], where), len(class_names), where)


# --- image folders -----------------------------------------------------------------------


def _folder_split_dirs(root: Path) -> dict[str, Path] | None:
    """{split: directory} when every sub-directory of `root` is a split name, else None."""
    subdirs = _subdirs(root)
    if not subdirs:
        raise ValueError(
            f"{root}: no class directories (expected root/<class>/*.png or root/<split>/<class>/*.png)"
        )
    is_split = [directory.name.lower() in _SPLIT_ALIASES for directory in subdirs]
    if not any(is_split):
        return None
    if not all(is_split):  # the builder would read the split directories and skip the others
        raise ValueError(
            f"{root} mixes split directories {[d.name for d, s in zip(subdirs, is_split) if s]} with other "
            f"directories {[d.name for d, s in zip(subdirs, is_split) if not s]}: use root/<class>/*.png or "
            "root/<split>/<class>/*.png"
        )
    found: dict[str, Path] = {}
    for directory in subdirs:
        split = _SPLIT_ALIASES[directory.name.lower()]
        if split in found:
            raise ValueError(
                f"{root}: directories {found[split].name!r} and {directory.name!r} are both {split!r}"
            )
        found[split] = directory
    return found


def _class_dirs(directory: Path) -> list[Path]:
    class_dirs = _subdirs(directory)
    if not class_dirs:
        raise ValueError(f"{directory}: no class directories (expected {directory}/<class>/*.png)")
    return class_dirs


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image_folder(root: Path) -> DatasetDict:
    from datasets import load_dataset

    try:
        data = load_dataset("imagefolder", data_dir=str(root))
    except FileNotFoundError as err:  # the builder found no image file at all
        raise ValueError(f"{root}: no image files in its class directories ({err})") from None
    if "label" not in next(iter(data.values())).features:
        raise ValueError(f"{root}: images must sit in class directories (root/<class>/*.png)")
    return data


def _image_paths(dataset: Dataset) -> list[str]:
    """The file behind each row of the image column, read without decoding."""
    return [item["path"] for item in dataset.cast_column("image", Image(decode=False))["image"]]


def _check_class_dirs(class_dirs: dict[str, list[Path]], paths: dict[str, list[str]]) -> None:
    """Every class directory holds an image, and every split directory holds the same classes."""
    for split, directories in class_dirs.items():
        used = {Path(path).parent for path in paths.get(split, [])}
        for directory in directories:
            if directory not in used:
                raise ValueError(f"class directory {directory} holds no images")
    (first_split, first), *others = [
        (split, sorted(d.name for d in class_dirs[split])) for split in SPLITS if split in class_dirs
    ]
    for split, classes in others:
        if classes != first:
            raise ValueError(
                f"split directories hold different classes: {first_split!r} has {first}, {split!r} has {classes}"
            )


def _rename_folder_classes(splits: DatasetDict, class_names: Sequence[str] | None) -> DatasetDict:
    """Re-number the builder's sorted directory classes in the order of `class_names`."""
    if class_names is None:
        return splits
    found = class_names_of(splits)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"class directories {unknown} are not in class_names {list(class_names)}")
    features = _features(class_names)
    new_id = [list(class_names).index(name) for name in found]
    return DatasetDict(
        {
            split: dataset.map(
                lambda batch: {"label": [new_id[label] for label in batch["label"]]},
                batched=True,
                features=features,
            )
            for split, dataset in splits.items()
        }
    )


def _verify_images(paths: list[Path]) -> None:
    """Open every image with PIL now, so a corrupt file never reaches training."""
    bad = []
    for path in paths:
        try:
            with PILImage.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... by format
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"PIL cannot open {len(bad)} image file(s): {'; '.join(bad[:3])}{more}")


# --- MedMNIST .npz -----------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"val"|"test": (images, int64 labels)}, validated."""
    with np.load(path) as npz:
        keys = [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")]
        missing = [key for key in keys if key not in npz.files]
        if missing:
            raise ValueError(f"{path.name}: missing arrays {missing}; keys found: {sorted(npz.files)}")
        arrays = {}
        for split in ("train", "val", "test"):
            images = _npz_images(npz[f"{split}_images"], f"{path.name}:{split}_images")
            labels = _npz_labels(npz[f"{split}_labels"], f"{path.name}:{split}_labels")
            if len(images) == 0:
                raise ValueError(f"{path.name}: {split}_images is empty")
            if len(images) != len(labels):
                raise ValueError(
                    f"{path.name}: {len(images)} {split}_images but {len(labels)} {split}_labels"
                )
            arrays[split] = (images, labels)
    return arrays


def _npz_images(images: np.ndarray, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{key}: expected uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3):
        return images
    raise ValueError(
        f"{key}: expected (N, H, W) grayscale or (N, H, W, 3) RGB images, got shape {images.shape} "
        "(3D MedMNIST volumes are not supported)"
    )


def _npz_labels(labels: np.ndarray, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise ValueError(
            f"{key} has shape {labels.shape}: multi-label tasks (ChestMNIST) are not supported; "
            "use a multi-class or binary MedMNIST flag"
        )
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{key}: expected integer labels of shape (N,) or (N, 1), got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def _medmnist_flag(path: Path) -> str:
    """'pneumoniamnist' for pneumoniamnist.npz and for MedMNIST+ sizes like pneumoniamnist_224.npz."""
    return re.sub(r"_\d+$", "", path.stem.lower())


def _npz_to_image(pixels: np.ndarray, image_size: int | None) -> PILImage.Image:
    image = to_rgb(PILImage.fromarray(pixels))
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), PILImage.Resampling.BICUBIC)
    return image
