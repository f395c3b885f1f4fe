"""The VITask pipeline as plain functions over the config dataclasses; the CLI is a thin shell on top.

A run directory holds one sub-directory per step, so every step can be re-run alone::

    <output_dir>/tsm        train-tsm
    <output_dir>/vanilla    train --method vanilla
    <output_dir>/stage1     train --stage 1   (EP + RDA)
    <output_dir>/stage2     train --stage 2   (+ CRT): the final bundle
    <output_dir>/eval       evaluate: results.json
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

from hf_vitask import distributed
from hf_vitask.config import DataArguments, EvalArguments, ModelArguments, TSMArguments, VITaskConfig
from hf_vitask.data.from_config import load_data, load_data_and_tasks
from hf_vitask.data.images import IMAGE_EXTENSIONS
from hf_vitask.files import TSM_CONFIG_FILE
from hf_vitask.task import TaskSpec

logger = logging.getLogger(__name__)

METHODS = ("vitask", "vanilla")


# -- data and task ---------------------------------------------------------------------------------
def task_list(tasks) -> list[TaskSpec]:
    return [tasks] if isinstance(tasks, TaskSpec) else list(tasks)


def _split(data, name: str, max_samples: int | None = None):
    if name not in data:
        raise ValueError(f"The data has no {name!r} split; splits: {list(data)}")
    ds = data[name]
    return ds.select(range(min(max_samples, len(ds)))) if max_samples is not None else ds


# -- stage 0: TSM ----------------------------------------------------------------------------------
def tsm_dir(tsm_args: TSMArguments, output_dir: str) -> Path:
    return Path(tsm_args.tsm_path or Path(output_dir) / "tsm")


def run_train_tsm(
    data_args: DataArguments, tsm_args: TSMArguments, output_dir: str, seed: int = 0, progress=True
):
    """Train the TSM on the train split (best validation epoch kept) and save it. Under several
    processes it trains with DDP, ``tsm_batch_size`` rows per step in all (split between the
    processes), and the main process saves it."""
    from hf_vitask.models.tsm import TaskSpecificModel
    from hf_vitask.task import save_tasks
    from hf_vitask.trainers.tsm import train_tsm

    out = tsm_dir(tsm_args, output_dir)
    _, processes = distributed.rank_and_size()
    data, tasks = load_data_and_tasks(data_args)
    sizes = [t.num_classes for t in task_list(tasks)]
    import torch

    with (
        torch.random.fork_rng()
    ):  # the new head (or a whole random model) is drawn from the seed: reproducible
        torch.manual_seed(seed)
        tsm = TaskSpecificModel(
            tsm_args.tsm_model,
            num_classes=sum(sizes),
            pretrained=tsm_args.tsm_pretrained,
            img_size=tsm_args.tsm_img_size,
        )
    history = train_tsm(
        tsm,
        data[data_args.train_split],
        eval_dataset=data.get(data_args.validation_split),
        epochs=tsm_args.tsm_epochs,
        batch_size=max(1, tsm_args.tsm_batch_size // processes),
        learning_rate=tsm_args.tsm_learning_rate,
        seed=seed,
        task_sizes=sizes if len(sizes) > 1 else None,
        progress=progress,
    )
    if distributed.is_main_process():
        tsm.save_pretrained(out)
        save_tasks(tasks, out)
        (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    distributed.wait_for_everyone()
    return tsm, history


def load_trained_tsm(tsm_args: TSMArguments, output_dir: str):
    from hf_vitask.models.tsm import TaskSpecificModel

    path = tsm_dir(tsm_args, output_dir)
    if not (path / TSM_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"No trained TSM in {path}: run `hf-vitask train-tsm` first (or set tsm_path)"
        )
    return TaskSpecificModel.from_pretrained(path)


def _model_kwargs(model_args: ModelArguments) -> dict:
    return {
        "torch_dtype": model_args.torch_dtype,
        "trust_remote_code": model_args.trust_remote_code,
        "load_in_4bit": model_args.load_in_4bit,
        "attn_implementation": model_args.attn_implementation,
    }


# -- stages 1 and 2 --------------------------------------------------------------------------------
def run_train(
    model_args: ModelArguments,
    data_args: DataArguments,
    tsm_args: TSMArguments,
    train_args: VITaskConfig,
    *,
    stages: tuple[int, ...] = (1, 2),
    method: str = "vitask",
) -> Path:
    """Train the VLM (vanilla, or VITask stages) and return the directory of the final bundle."""
    from hf_vitask.models.loading import load_vlm
    from hf_vitask.models.modeling import VITaskModel
    from hf_vitask.trainers.vitask import VITaskTrainer

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    root = Path(train_args.output_dir)
    data, task = load_data_and_tasks(data_args)
    train_ds = data[data_args.train_split]
    eval_ds = data[data_args.validation_split] if train_args.eval_strategy != "no" else None
    if method == "vanilla":
        stages = (1,)
    resume = resume_target(train_args.resume_from_checkpoint)
    model = processor = None
    out = root
    for i, stage in enumerate(stages):
        if method == "vanilla":
            out = root / "vanilla"
            args = train_args.for_stage(1, output_dir=str(out), ep_weight=0.0, rda_weight=0.0, crt_weight=0.0)
            tsm = None
        else:
            out = root / f"stage{stage}"
            args = train_args.for_stage(stage, output_dir=str(out))
            if resume and i + 1 < len(stages) and _finished(out, resume):
                logger.info(f"Resuming: stage {stage} is finished ({out}); continuing with the next stage")
                continue
            tsm = load_trained_tsm(tsm_args, str(root)) if model is None else None
        if model is None and stage == 2:
            previous = root / "stage1"
            if not (previous / "vitask_config.json").is_file():
                raise FileNotFoundError(
                    f"Stage 2 starts from stage 1: no model in {previous} (run --stage 1 first)"
                )
            model = VITaskModel.from_pretrained(previous, is_trainable=True, **_model_kwargs(model_args))
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(previous))
            tsm = None
        if model is None:
            model, processor = load_vlm(model_args.model_name_or_path, **_model_kwargs(model_args))
        trainer = VITaskTrainer(
            model=model,
            args=args,
            processing_class=processor,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            task=task,
            tsm=tsm,
        )
        trainer.train(resume_from_checkpoint=_checkpoint_in(out, resume))
        trainer.save_model(str(out))
        model = trainer.model
    return out


def resume_target(value) -> bool | Path | None:
    """``resume_from_checkpoint`` of a CLI run: None (fresh), True (the newest complete checkpoint of
    the stage being trained) or the path of one checkpoint."""
    if value in (None, "", False) or (isinstance(value, str) and value.lower() in ("false", "no", "0")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "1")):
        return True
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint directory")
    return path


def _finished(stage_dir: Path, resume) -> bool:
    """Whether a stage needs no training on resume: its bundle is written and the checkpoint asked for
    (if a path) is not inside it."""
    if isinstance(resume, Path) and stage_dir.resolve() in resume.resolve().parents:
        return False
    return (stage_dir / "vitask_config.json").is_file()


def _checkpoint_in(stage_dir: Path, resume):
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets for this stage."""
    from hf_vitask.trainers.checkpoints import last_complete_checkpoint

    if resume is True:
        found = last_complete_checkpoint(stage_dir)
        return str(found) if found is not None else None  # nothing saved yet: the stage starts afresh
    if isinstance(resume, Path) and stage_dir.resolve() in resume.resolve().parents:
        return str(resume)
    return None


# -- evaluation and prediction -----------------------------------------------------------------------
def default_model_path(output_dir: str) -> Path:
    for name in ("stage2", "stage1", "vanilla"):
        if (Path(output_dir) / name / "vitask_config.json").is_file():
            return Path(output_dir) / name
    raise FileNotFoundError(
        f"No trained model under {output_dir}: run `hf-vitask train` first (or set model_path)"
    )


def _variants(choice: str, yes: str, no: str) -> list[bool]:
    return {"both": [True, False], yes: [True], no: [False]}[choice]


def run_evaluate(
    eval_args: EvalArguments,
    data_args: DataArguments,
    output_dir: str,
    tsm_args: TSMArguments | None = None,
    progress: bool = True,
):
    """Evaluate a saved bundle on ``eval_split``: every (TSM yes/no) x (complete/incomplete) x method.

    A multi-task bundle is evaluated task by task (``per_task``); the top-level numbers are then
    the mean over tasks, as in the paper's 12-dataset table."""
    from hf_vitask.hub import load_vitask
    from hf_vitask.models.tsm import TaskSpecificModel
    from hf_vitask.task import load_tasks

    path = Path(eval_args.model_path) if eval_args.model_path else default_model_path(output_dir)
    model, processor, _ = load_vitask(path)
    data, configured = load_data_and_tasks(data_args)
    tasks = task_list(load_tasks(path) or configured)
    dataset = _split(data, eval_args.eval_split, None if len(tasks) > 1 else eval_args.eval_max_samples)
    plugin = TaskSpecificModel.from_pretrained(eval_args.plugin_tsm) if eval_args.plugin_tsm else None
    from hf_vitask.trainers.vitask import check_tsm_matches_tasks

    for which, tsm in (("the bundle's TSM", model.tsm), ("plugin_tsm", plugin)):
        try:
            check_tsm_matches_tasks(tsm, tasks)
        except ValueError as err:
            raise ValueError(f"{which}: {err}") from None
    if eval_args.eval_use_tsm == "yes" and (
        model.connector is None or (model.tsm is None and plugin is None)
    ):
        missing = (
            "no exemplar connector (trained without EP)" if model.connector is None else f"no {path / 'tsm'}"
        )
        raise ValueError(
            f"eval_use_tsm=yes, but the bundle {path} has {missing}: evaluate with eval_use_tsm=no, "
            "or give a TSM with plugin_tsm"
        )
    results: dict = {
        "model_path": str(path),
        "split": eval_args.eval_split,
        "num_samples": len(dataset),
        "option_score": eval_args.option_score,
    }
    if len(tasks) == 1:
        results.update(
            _evaluate_task(model, processor, tasks[0], dataset, eval_args, plugin, progress=progress)
        )
    else:
        sizes = [t.num_classes for t in tasks]
        per_task = {}
        for i, task in enumerate(tasks):
            subset = dataset.filter(lambda t, i=i: t == i, input_columns="task")
            if eval_args.eval_max_samples is not None:
                subset = subset.select(range(min(eval_args.eval_max_samples, len(subset))))
            per_task[task.name] = _evaluate_task(
                model, processor, task, subset, eval_args, plugin, i, sizes, progress=progress
            )
        results["per_task"] = per_task
        results.update(_mean_over_tasks(list(per_task.values())))
    if distributed.is_main_process():
        out = Path(output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _evaluate_task(
    model,
    processor,
    task,
    dataset,
    eval_args,
    plugin,
    task_index=None,
    task_sizes=None,
    progress: bool = True,
) -> dict:
    from hf_vitask.evaluation import evaluate_tsm, evaluate_vlm

    results: dict = {}
    tsm = plugin or model.tsm
    if tsm is not None:
        results["tsm"] = (
            evaluate_tsm(tsm, dataset, split_between_processes=True)
            if task_sizes is None
            else _evaluate_tsm_in_task(tsm, dataset, task_index, task_sizes)
        )
    can_use_tsm = model.connector is not None and tsm is not None
    for use_tsm in _variants(eval_args.eval_use_tsm, "yes", "no"):
        if use_tsm and not can_use_tsm:
            continue
        for complete in _variants(eval_args.eval_instructions, "complete", "incomplete"):
            key = f"{'with' if use_tsm else 'without'}_tsm/{'complete' if complete else 'incomplete'}"
            results[key] = evaluate_vlm(
                model,
                processor,
                task,
                dataset,
                use_tsm=use_tsm,
                complete_instruction=complete,
                methods=tuple(eval_args.eval_methods),
                batch_size=eval_args.eval_batch_size,
                tsm=plugin,
                option_score=eval_args.option_score,
                split_between_processes=True,
                progress=progress,
            )
    return results


def _evaluate_tsm_in_task(tsm, dataset, task_index: int, task_sizes: list[int]) -> dict:
    """TSM metrics of one task of a shared multi-task head (softmax restricted to the task's classes)."""
    import torch

    from hf_vitask.metrics import classification_metrics
    from hf_vitask.models.tsm import task_offsets, tsm_predict

    start = task_offsets(task_sizes)[task_index]
    block = distributed.my_block(len(dataset))
    probs = distributed.gather_rows(
        tsm_predict(tsm, dataset.select(block), task_sizes=task_sizes)
        if len(block)
        else torch.zeros(0, sum(task_sizes))
    )[:, start : start + task_sizes[task_index]]
    labels = torch.tensor(dataset["label"])
    metrics = classification_metrics(probs.argmax(-1).tolist(), labels.tolist(), scores=probs.numpy())
    return {"num_samples": len(dataset), **metrics}


def _mean_over_tasks(per_task: list[dict]) -> dict:
    """Mean of every numeric leaf over tasks (keys present in all of them)."""
    first = per_task[0]
    out: dict = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _mean_over_tasks([p[key] for p in per_task if key in p])
        elif isinstance(value, int | float) and all(key in p for p in per_task):
            out[key] = sum(float(p[key]) for p in per_task) / len(per_task)
    return out


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the folders given."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"predict input {item!r} is neither an image file nor a folder")
    if not paths:
        raise ValueError(f"No images found in {inputs}")
    return paths


def run_predict(
    eval_args: EvalArguments,
    output_dir: str,
    use_tsm: bool = False,
    method: str = "likelihood",
    task_name: str | None = None,
    progress: bool = True,
) -> Path:
    """Predict a class for each input image and write a CSV (path, prediction, per-class probabilities).

    A multi-task bundle needs ``task_name`` to say which task's question to ask."""
    import torch

    from hf_vitask.evaluation import generate_answers, score_options
    from hf_vitask.hub import load_vitask

    if not eval_args.predict_inputs:
        raise ValueError("predict needs predict_inputs: image files and/or folders")
    path = Path(eval_args.model_path) if eval_args.model_path else default_model_path(output_dir)
    from hf_vitask.task import load_tasks

    model, processor, _ = load_vitask(path)
    task = load_tasks(path)
    if task is None:
        raise FileNotFoundError(f"{path} has no task.json")
    if not isinstance(task, TaskSpec):
        by_name = {t.name: t for t in task}
        if task_name not in by_name:
            raise ValueError(f"{path} holds several tasks {sorted(by_name)}: choose one with task_name")
        task = by_name[task_name]
    files = collect_images(eval_args.predict_inputs)
    images, unreadable = _readable(
        [files[i] for i in distributed.my_block(len(files))]
    )  # each process: a block
    out = Path(eval_args.predictions_file)
    rows: list[list[str]] = []
    from tqdm.auto import tqdm

    from hf_vitask.evaluation import row_batches

    paths, decoded = list(images), list(images.values())
    size = max(eval_args.eval_batch_size, 1)
    batches = tqdm(
        row_batches(decoded, range(len(decoded)), None, size),
        total=-(-len(decoded) // size),
        desc="predict",
        unit="batch",
        disable=not progress,
    )
    header = (
        ["path", "prediction", *task.class_names, "error"]
        if method == "likelihood"
        else ["path", "prediction", "answer", "error"]
    )
    for start, batch in zip(range(0, len(decoded), size), batches):
        names = paths[start : start + size]
        if method == "likelihood":
            probs = torch.softmax(
                score_options(
                    model,
                    processor,
                    task,
                    batch,
                    use_tsm=use_tsm,
                    batch_size=size,
                    option_score=eval_args.option_score,
                ),
                -1,
            )
            for f, row in zip(names, probs.tolist()):
                best = task.class_names[max(range(len(row)), key=row.__getitem__)]
                rows.append([str(f), best, *(f"{p:.6f}" for p in row), ""])
        else:
            for f, answer in zip(
                names, generate_answers(model, processor, task, batch, use_tsm=use_tsm, batch_size=size)
            ):
                cls = task.parse(answer)
                rows.append([str(f), "" if cls is None else task.class_names[cls], answer, ""])
    rows += [[str(f), *[""] * (len(header) - 2), error] for f, error in unreadable.items()]
    rows = distributed.gather(rows)
    unreadable = dict(distributed.gather(list(unreadable.items())))
    if not distributed.is_main_process():
        return out
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r[0]])
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, header, rows)
    if unreadable:
        logger.warning(
            f"{len(unreadable)} of {len(files)} inputs could not be read (listed in {out}, column "
            f"'error'): " + "; ".join(f"{f}: {e}" for f, e in unreadable.items())
        )
    return out


def _readable(files: list[Path]):
    """``({path: RGB image}, {path: why it cannot be read})``: one bad file does not stop the others."""
    from hf_vitask.data.collator import load_image

    images, unreadable = {}, {}
    for f in files:
        try:
            images[f] = load_image(str(f), "")
        except ValueError as err:
            unreadable[f] = str(err)
    return images, unreadable


def _write_atomically(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write the CSV next to ``path`` and rename it into place: an earlier file survives any failure."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- instruction-free tuning ------------------------------------------------------------------------
def _instruction_free_data(data_args: DataArguments):
    from hf_vitask.data.digits import add_digit_descriptions

    if data_args.dataset != "digits":
        raise ValueError(
            "From the CLI, instruction-free tuning reads the bundled digits (descriptions are generated from their "
            "attributes). For your own {image, description} rows use hf_vitask.InstructionFreeTrainer in Python."
        )
    return add_digit_descriptions(load_data(data_args))


def run_train_instruction_free(model_args: ModelArguments, data_args: DataArguments, train_args) -> Path:
    """Instruction-free tuning on image-description pairs; saves the adapter (+ proxy) to <output_dir>/instruction_free."""
    from hf_vitask.models.loading import load_vlm
    from hf_vitask.trainers.instruction_free import InstructionFreeTrainer

    data = _instruction_free_data(data_args)
    out = Path(train_args.output_dir) / "instruction_free"
    args = dataclasses.replace(train_args, output_dir=str(out))
    model, processor = load_vlm(model_args.model_name_or_path, **_model_kwargs(model_args))
    trainer = InstructionFreeTrainer(
        model=model, args=args, processing_class=processor, train_dataset=data[data_args.train_split]
    )
    trainer.train(
        resume_from_checkpoint=_checkpoint_in(out, resume_target(train_args.resume_from_checkpoint))
    )
    trainer.save_model(str(out))
    return out


def run_evaluate_instruction_free(eval_args: EvalArguments, data_args: DataArguments, train_args) -> dict:
    """Multiple-choice questions with held-out wordings, answered with a letter, on ``eval_split``."""
    from transformers import AutoProcessor

    from hf_vitask.data.digits import make_mc_questions
    from hf_vitask.evaluation import mc_evaluate
    from hf_vitask.models.modeling import VITaskModel

    path = Path(eval_args.model_path or Path(train_args.output_dir) / "instruction_free")
    model = VITaskModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(str(path))
    dataset = _split(_instruction_free_data(data_args), eval_args.eval_split, eval_args.eval_max_samples)
    questions = make_mc_questions(dataset, seed=train_args.seed)
    results: dict = {"model_path": str(path), "split": eval_args.eval_split, "num_questions": len(questions)}
    for method in eval_args.eval_methods:
        metrics = mc_evaluate(
            model, processor, questions, method=method, batch_size=eval_args.eval_batch_size
        )
        results[method] = {k: v for k, v in metrics.items() if k not in ("predictions", "answers")}
    if distributed.is_main_process():
        out = Path(train_args.output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "instruction_free_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# -- the Hub ------------------------------------------------------------------------------------------
def run_push(eval_args: EvalArguments, model_args: ModelArguments, train_args, output_dir: str) -> str:
    """Upload a saved bundle (default: the last stage) with its model card to ``hub_model_id``."""
    from hf_vitask.hub import is_hub_model_id, push_bundle

    if not train_args.hub_model_id:
        raise ValueError("push needs hub_model_id (e.g. --hub_model_id your-name/vitask-dermamnist)")
    if not distributed.is_main_process():
        return f"{train_args.hub_model_id} (uploaded by the main process)"
    path = Path(eval_args.model_path) if eval_args.model_path else default_model_path(output_dir)
    results_file = Path(output_dir) / "eval" / "results.json"
    metrics = json.loads(results_file.read_text()) if results_file.is_file() else None
    return push_bundle(
        path,
        train_args.hub_model_id,
        private=bool(train_args.hub_private_repo),
        revision=getattr(train_args, "hub_revision", None),
        token=train_args.hub_token,
        metrics=metrics,
        base_model=model_args.model_name_or_path if is_hub_model_id(model_args.model_name_or_path) else None,
    )
