"""The data of a configuration (``DataArguments``): its source(s) loaded and checked, and the task(s)
they define, in one call (:func:`load_data_and_tasks`), for the CLI and the pipeline."""

from __future__ import annotations

from pathlib import Path

from hf_vitask.config import DataArguments
from hf_vitask.task import TaskSpec


def load_data(data_args: DataArguments):
    """The DatasetDict of the configured source(s), with ``image`` and ``label`` columns (and ``task``,
    the task index, when ``dataset_paths`` names several tasks)."""
    return load_data_and_tasks(data_args)[0]


def load_data_and_tasks(data_args: DataArguments) -> tuple:
    """``(data, tasks)`` of a configuration: the DatasetDict of its source(s) and its TaskSpec (a list
    of them, one per path, with a ``task`` column in the data, when ``dataset_paths`` names several)."""
    from datasets import DatasetDict, Value, concatenate_datasets

    from hf_vitask.data.digits import load_digits_dataset

    if data_args.dataset_paths:
        parts = [_load_one(data_args, path) for path in data_args.dataset_paths]
        tasks = [
            _task_for(data_args, part, name=Path(path).stem)
            for part, path in zip(parts, data_args.dataset_paths)
        ]
        splits = set.intersection(*(set(p) for p in parts))
        data = DatasetDict(
            {
                split: concatenate_datasets(
                    [
                        part[split]
                        .cast_column("label", Value("int64"))
                        .add_column("task", [i] * len(part[split]))
                        for i, part in enumerate(parts)
                    ]
                )
                for split in sorted(splits)
            }
        )
    else:
        if data_args.dataset == "digits":
            data = load_digits_dataset(image_size=data_args.image_size, seed=data_args.data_seed_split)
        elif data_args.dataset == "textures":
            from hf_vitask.data.synthetic import load_textures_dataset

            data = load_textures_dataset(image_size=data_args.image_size, seed=data_args.data_seed_split)
        elif not data_args.dataset_path:
            raise ValueError(
                f"dataset={data_args.dataset!r} needs dataset_path (or dataset_paths for several tasks)"
            )
        else:
            data = _load_one(data_args, data_args.dataset_path)
        tasks = _task_for(data_args, data)
    if data_args.train_split not in data:
        raise ValueError(f"The data has no {data_args.train_split!r} split; splits: {list(data)}")
    if data_args.max_samples is not None:
        train = data[data_args.train_split]
        data[data_args.train_split] = train.shuffle(seed=data_args.data_seed_split).select(
            range(min(data_args.max_samples, len(train)))
        )
    return data, tasks


def _load_one(data_args: DataArguments, path):
    """One source through its loader, with the configured columns, class order and split seed."""
    from hf_vitask.data.sources import SOURCES, load_data_files, load_source

    source = data_args.dataset.lower()
    kwargs = {}
    if source not in (
        "npz",
        "medmnist",
    ):  # MedMNIST files come split; other sources are split here, reproducibly
        kwargs["seed"] = data_args.data_seed_split
    if data_args.class_names is not None and not data_args.dataset_paths:
        kwargs["class_names"] = data_args.class_names  # labels encoded in the task's class order
    if source == "hf" or source not in SOURCES:  # the sources read from tables, whose columns are named
        kwargs.update(
            image_column=data_args.dataset_image_column, label_column=data_args.dataset_label_column
        )
    if source in SOURCES:
        return load_source(source, path, **kwargs)
    return load_data_files(source, path, **kwargs)


def _task_for(data_args: DataArguments, data, name: str | None = None) -> TaskSpec:
    from hf_vitask.data.digits import digits_task
    from hf_vitask.data.sources import class_names_of

    if data_args.dataset == "digits" and data_args.class_names is None and not data_args.dataset_paths:
        task = digits_task()
        return (
            task
            if data_args.question is None
            else TaskSpec(**{**task.to_dict(), "question": data_args.question})
        )
    names = (None if data_args.dataset_paths else data_args.class_names) or class_names_of(data)
    if not names:
        raise ValueError("The dataset has no ClassLabel names: set class_names in the config")
    kwargs = {"class_names": list(names), "question": data_args.question}
    if name or data_args.task_name:
        kwargs["name"] = name or data_args.task_name
    if data_args.modality:
        kwargs["modality"] = data_args.modality
    return TaskSpec(**kwargs)


__all__ = ["load_data", "load_data_and_tasks"]
