"""The VITask bundle on the Hugging Face Hub: load it (local dir or repo id), render its model card, push it.

A bundle is the directory ``VITaskTrainer.save_model`` writes: the LoRA adapter (or full model),
the exemplar connector and the TSM (all safetensors), the processor, ``task.json``,
``vitask_processor.json``, ``vitask_config.json`` and ``training_config.json``. :func:`push_bundle` uploads exactly those
files plus a ``README.md`` model card — never pickles, optimizer / scheduler / RNG state or
``checkpoint-*`` directories.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

from hf_vitask.files import (
    ADAPTER_CONFIG_FILE,
    BUNDLE_LIST_FILE,
    CONNECTOR_FILE,
    EVAL_RESULTS_FILE,
    MANIFEST_FILE,
    README_FILE,
    REPO_ID,
    TASK_FILE,
    TASKS_FILE,
    TRAINING_CONFIG_FILE,
    TSM_CONFIG_FILE,
    TSM_DIR,
    TSM_WEIGHTS_FILE,
    VITASK_CONFIG_FILE,
    VITASK_PROCESSOR_FILE,
    resolve_bundle,
)
from hf_vitask.jsonfile import read_json
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.task import TaskSpec, load_tasks
from hf_vitask.version import __version__

__all__ = [
    "ALLOW_PATTERNS",
    "IGNORE_PATTERNS",
    "LoadedVITask",
    "bundle_files",
    "flatten_metrics",
    "is_hub_model_id",
    "load_vitask",
    "push_bundle",
    "render_model_card",
    "resolve_bundle",
]

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
CARD_TAGS = ("hf_vitask", "vitask", "lora", "image-text-to-text")

#: Files of a bundle that go to the Hub: weights as safetensors, configs, processor / tokenizer
#: files (json, jinja chat template, txt vocab / merges, sentencepiece / tiktoken models), the
#: card. Matched at the top level of the bundle and inside ``tsm/`` only.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", README_FILE)
#: Never uploaded, even when they match :data:`ALLOW_PATTERNS` (a second guard for upload_folder).
IGNORE_PATTERNS = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.npy", "*.npz",
    "optimizer*", "scheduler*", "rng_state*", "trainer_state.json", "training_args*",
    "checkpoint-*", "runs/*", ".*", "*/.*",
    BUNDLE_LIST_FILE, MANIFEST_FILE,  # local bookkeeping of saves
)  # fmt: skip


class LoadedVITask(NamedTuple):
    model: VITaskModel
    processor: Any
    """The bundle's :class:`~hf_vitask.processing.VITaskProcessor` (it also stands in for the VLM's processor)."""
    task: TaskSpec | list[TaskSpec] | None
    """The bundle's TaskSpec; a list of them for a multi-task bundle (the order of ``tasks.json``)."""


def load_vitask(
    path: str | PathLike,
    base_model=None,
    *,
    load_tsm: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    **model_kwargs,
) -> LoadedVITask:
    """Restore ``(model, processor, task)`` from a bundle written by ``VITaskTrainer.save_model``.

    ``task`` is the bundle's :class:`TaskSpec`, the list of them for a multi-task bundle, or None
    (an instruction-free bundle has no task).

    ``path`` is a local directory or a Hub repo id (``user/name``, downloaded with
    ``huggingface_hub.snapshot_download`` at ``revision``). The base VLM is loaded from the
    adapter's ``base_model_name_or_path`` unless ``base_model`` is given; ``model_kwargs`` go to
    :func:`hf_vitask.models.loading.load_vlm` (``torch_dtype``, ``device_map``,
    ``load_in_4bit=True`` for a QLoRA base, ...).

    ``processor`` is the bundle's :class:`~hf_vitask.processing.VITaskProcessor`: ``processor(images=...)``
    gives the inputs of ``model.generate`` and ``processor.parse`` reads the answer; it also goes
    wherever the VLM's processor went (unknown attributes and ``text=`` calls are the VLM processor's).
    """
    from hf_vitask.processing import TSMTransform, VITaskProcessor

    bundle = resolve_bundle(path, revision, token)
    if token is not None and base_model is None:
        model_kwargs.setdefault("token", token)  # a gated base model needs it too
    model = VITaskModel.from_pretrained(bundle, base_model, load_tsm=load_tsm, **model_kwargs)
    processor = VITaskProcessor.from_pretrained(bundle)
    if model.tsm is None or model.connector is None:  # no exemplar without both: no TSM pixels either
        processor.tsm_transform = None
    elif processor.tsm_transform is None:  # a bundle saved before vitask_processor.json
        processor.tsm_transform = TSMTransform.from_tsm(model.tsm)
    return LoadedVITask(model, processor, processor.task)


# -- which files go up ---------------------------------------------------------------------------------
def _allowed(relative: str) -> bool:
    parts = relative.split("/")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != TSM_DIR):
        return False
    name = parts[-1]
    if not any(fnmatch.fnmatchcase(name, p) for p in ALLOW_PATTERNS):
        return False
    return not any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in IGNORE_PATTERNS)


def bundle_files(bundle_dir: str | PathLike) -> list[str]:
    """Relative paths (posix) of the files :func:`push_bundle` uploads from ``bundle_dir``, sorted."""
    root = Path(bundle_dir)
    files = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(f for f in files if _allowed(f))


# -- model card ----------------------------------------------------------------------------------------
def _read_json(path: Path, kind: type = dict) -> Any:
    return read_json(path, kind) if path.is_file() else None


def is_hub_model_id(name: str | None) -> bool:
    """``org/name`` that is not a local path (tiny demo names and local directories are not on the Hub)."""
    return bool(name and REPO_ID.match(name) and name.count("/") == 1 and not Path(name).exists())


_SKIP_METRIC = re.compile(r"(^|_)(runtime|samples_per_second|steps_per_second|num_samples|epoch|step)$")


def flatten_metrics(metrics: Mapping | None, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"a/b/accuracy": value}``; bookkeeping
    entries (runtime, throughput, sample counts, epoch) are left out."""
    flat: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not _SKIP_METRIC.search(str(key))
        ):
            flat[name] = float(value)
    return flat


def _metric_type(name: str) -> str:
    leaf = name.rsplit("/", 1)[-1]
    return leaf[len("eval_") :] if leaf.startswith("eval_") else leaf


def _method_fields(config: Mapping) -> dict:
    """The entries of a saved training config that ``TrainingArguments`` does not have: the
    VITask (or instruction-free) method, LoRA and data fields."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {k: v for k, v in config.items() if k not in base and not k.startswith("_")}


_OPTIMISATION_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "bf16", "seed",
)  # fmt: skip

_FILE_NOTES = {
    "adapter_model.safetensors": "LoRA adapter weights",
    "adapter_config.json": "LoRA config (names the base model)",
    "model.safetensors": "full model weights",
    "model.safetensors.index.json": "index of the sharded full model",
    CONNECTOR_FILE: "exemplar connector (TSM feature -> LLM token)",
    VITASK_CONFIG_FILE: "family, image token ids, connector shape",
    TASK_FILE: "class names and instruction templates (TaskSpec)",
    TASKS_FILE: "the TaskSpecs of a multi-task run",
    VITASK_PROCESSOR_FILE: "VITaskProcessor: the TSM image transform (loads with the processor and task)",
    TRAINING_CONFIG_FILE: "VITaskConfig used for training",
    EVAL_RESULTS_FILE: "last evaluation",
    f"{TSM_DIR}/{TSM_WEIGHTS_FILE}": "task-specific model (timm) weights",
    f"{TSM_DIR}/tsm_config.json": "timm architecture of the TSM",
    "chat_template.jinja": "chat template",
    README_FILE: "this card",
}


def _stage_text(config: dict | None) -> str:
    if not config:
        return "unknown (no training_config.json)"
    if "van_weight" not in config:  # another trainer of the package (e.g. instruction-free tuning)
        return "see the training configuration below"
    weights = {k: float(config.get(f"{k}_weight") or 0) for k in ("van", "ep", "rda", "crt")}
    if weights["ep"] == weights["rda"] == weights["crt"] == 0:
        return "vanilla instruction tuning (no EP / RDA / CRT)"
    names = {"van": "L_van", "ep": "L_EP", "rda": "L_RDA", "crt": "L_CRT"}
    terms = " + ".join(f"{w:g} {names[k]}" for k, w in weights.items() if w > 0)
    stage = config.get("stage")
    name = {1: "stage 1 (EP + RDA)", 2: "stage 2 (+ CRT, connector frozen)"}.get(stage, f"stage {stage}")
    return f"{name}: {terms}"


def _yaml_block(values: dict) -> str:
    import yaml

    return "```yaml\n" + yaml.safe_dump(values, sort_keys=False, default_flow_style=False).rstrip() + "\n```"


def render_model_card(
    bundle_dir: str | PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | str | None = None,
    metrics: Mapping | None = None,
    config: Mapping | None = None,
) -> str:
    """The ``README.md`` model card of a bundle, from ``hf_vitask/templates/model_card.md``.

    YAML front matter (``base_model``, ``library_name: peft``, ``tags``, ``datasets``, and
    ``model-index`` results when ``datasets`` names the evaluation set, else a ``metrics`` list),
    then what was trained, a 5-line loading snippet, the VITask fields of the training config
    and the bundle layout. ``metrics`` (a flat or nested dict, e.g. ``Trainer.evaluate()`` or
    ``hf-vitask evaluate``'s results.json) defaults to ``<bundle>/eval_results.json``; ``config``
    (the training config dict) to ``<bundle>/training_config.json``; ``base_model`` to the
    bundle's ``base_model_name_or_path`` — a local path there is left out of the metadata (the
    Hub expects a repo id), so pass the hub id the base came from.
    """
    from huggingface_hub import EvalResult, ModelCardData

    bundle = Path(bundle_dir)
    vitask_cfg = _read_json(bundle / VITASK_CONFIG_FILE) or {}
    adapter_cfg = _read_json(bundle / ADAPTER_CONFIG_FILE)
    config = dict(config) if config is not None else (_read_json(bundle / TRAINING_CONFIG_FILE) or {})
    if metrics is None:
        metrics = _read_json(bundle / EVAL_RESULTS_FILE)
    flat = flatten_metrics(metrics)
    loaded = load_tasks(bundle)
    tasks = loaded if isinstance(loaded, list) else [] if loaded is None else [loaded]
    task = tasks[0] if len(tasks) == 1 else None
    tsm_cfg = _read_json(bundle / TSM_DIR / TSM_CONFIG_FILE)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])

    base = (
        base_model
        or vitask_cfg.get("base_model_name_or_path")
        or (adapter_cfg or {}).get("base_model_name_or_path")
    )
    base_is_hub = is_hub_model_id(base)
    if base and not base_is_hub and repo_id is not None:  # a card for the Hub: say what will not work there
        warnings.warn(
            f"The base model {base!r} is not a Hub repo id (a local path or a tiny demo model): it is left "
            "out of the card's metadata and load_vitask(repo) will not find it on another machine. "
            "Pass base_model='<org>/<name>' (the Hub id the base came from).",
            stacklevel=2,
        )
    task_name = task.name if task is not None else ("multi-task" if tasks else "task")
    title = (repo_id or bundle.resolve().name).split("/")[-1]
    task_tags = [t.name for t in tasks] or [task_name]
    tags = list(dict.fromkeys([*CARD_TAGS, *task_tags, *(["qlora"] if config.get("load_in_4bit") else [])]))
    eval_results = None
    if flat and datasets:
        eval_results = [
            EvalResult(
                task_type="image-text-to-text",
                task_name=task_name,
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=_metric_type(name),
                metric_value=value,
                metric_name=name,
            )
            for name, value in flat.items()
        ]
    card_data = ModelCardData(
        base_model=base if base_is_hub else None,
        library_name="peft",
        pipeline_tag="image-text-to-text",
        tags=tags,
        datasets=datasets or None,
        metrics=sorted({_metric_type(n) for n in flat}) or None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )

    connector = vitask_cfg.get("connector")
    connector_text = (
        f"MLP {connector['tsm_dim']} -> {connector['llm_dim']}, {connector['num_tokens']} token(s) from the "
        f"TSM's {connector['feature']} feature"
        if connector
        else "none (trained without exemplar prompting)"
    )
    if tsm_cfg:
        size = f", {tsm_cfg['img_size']} px" if tsm_cfg.get("img_size") else ""
        tsm_text = f"timm `{tsm_cfg.get('model_name')}` ({tsm_cfg.get('num_classes')} classes{size}), in `{TSM_DIR}/`"
    else:
        tsm_text = "not included"
    if adapter_cfg:
        targets = adapter_cfg.get("target_modules")
        adapter = f"LoRA r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('lora_alpha')}, on `{targets}`"
    else:
        adapter = "none: full model weights"
    if config.get("load_in_4bit"):
        adapter += " (QLoRA: trained on a 4-bit NF4 base)"
    if len(tasks) == 1:
        classes = f"{task.num_classes}: " + ", ".join(f"`{c}`" for c in task.class_names)
        task_row = f"`{task_name}`" + (f" ({task.modality})" if task.modality else "")
        usage_note = ""
    elif tasks:
        classes = "; ".join(f"`{t.name}`: {t.num_classes}" for t in tasks)
        task_row = f"{len(tasks)} tasks in `{TASKS_FILE}`: " + ", ".join(f"`{t.name}`" for t in tasks)
        usage_note = (
            f"\nThis bundle holds several tasks, so `load_vitask` returns `task` as a list: pick one with "
            f"`task[i]` (the order of `{TASKS_FILE}`).\n"
        )
    else:
        classes, task_row, usage_note = "see `task.json`", f"`{task_name}`", ""

    if flat:
        rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in flat.items())
        metrics_section = f"| metric | value |\n|---|---|\n{rows}"
        if datasets:
            metrics_section = f"On `{datasets[0]}`:\n\n{metrics_section}"
    else:
        metrics_section = "No evaluation results were recorded with this bundle."
    if config:
        vitask = _method_fields(config)
        optimisation = ", ".join(f"{k}={config[k]}" for k in _OPTIMISATION_FIELDS if k in config)
        config_section = (
            "Method fields of `training_config.json` (beyond `TrainingArguments`):\n\n" + _yaml_block(vitask)
        )
        if optimisation:
            config_section += f"\n\nOptimisation: {optimisation}."
    else:
        config_section = "No `training_config.json` in the bundle."
    files = sorted(set(bundle_files(bundle)) | {README_FILE})
    layout = "\n".join(f"- `{f}`" + (f": {_FILE_NOTES[f]}" if f in _FILE_NOTES else "") for f in files)

    base_md = (
        f"[`{base}`](https://huggingface.co/{base})"
        if base_is_hub
        else (f"`{base}`" if base else "an unknown base model")
    )
    cells = {
        "task_row": task_row,
        "classes": classes,
        "stage": _stage_text(config),
        "family": vitask_cfg.get("family", "unknown"),
        "adapter": adapter,
        "connector": connector_text,
        "tsm": tsm_text,
        "version": vitask_cfg.get("hf_vitask_version", __version__),
    }
    values = {
        **{k: v.replace("|", "\\|") for k, v in cells.items()},  # table cells: a bare | splits the cell
        "front_matter": card_data.to_yaml(),
        "title": title,
        "task_name": task_name,
        "base_model_md": base_md,
        "usage_note": usage_note,
        "load_id": repo_id or str(bundle),
        "metrics_section": metrics_section,
        "config_section": config_section,
        "layout": layout,
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)


# -- push ----------------------------------------------------------------------------------------------
def _set_base_model(bundle: Path, base_model: str) -> None:
    """Point the bundle's configs at ``base_model`` (a Hub id), so ``load_vitask(repo)`` finds the
    base on any machine instead of the local path it was trained from."""
    for name in (ADAPTER_CONFIG_FILE, VITASK_CONFIG_FILE):
        data = _read_json(bundle / name)
        if data is not None and data.get("base_model_name_or_path") != base_model:
            data["base_model_name_or_path"] = base_model
            (bundle / name).write_text(json.dumps(data, indent=2) + "\n")


def push_bundle(
    bundle_dir: str | PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    metrics: Mapping | None = None,
    datasets: Sequence[str] | str | None = None,
    base_model: str | None = None,
) -> str:
    """Write the model card into ``bundle_dir`` and upload the bundle to the Hub repo ``repo_id``.

    Creates the repo (``exist_ok``) and, for a ``revision`` other than ``main``, the branch; then
    one ``upload_folder`` commit of :func:`bundle_files` only (safetensors, json, the chat
    template, tokenizer files, ``tsm/``, README.md). Returns the commit URL (the repo URL when
    the Hub gives none).

    ``base_model`` (a Hub id) also replaces ``base_model_name_or_path`` in the bundle's
    ``adapter_config.json`` / ``vitask_config.json`` — pass it when the base was loaded from a
    local path, so ``load_vitask(repo_id)`` works elsewhere. ``metrics`` / ``datasets`` go to the
    card (:func:`render_model_card`). ``token`` defaults to the logged-in user's.
    """
    from huggingface_hub import HfApi

    bundle = Path(bundle_dir)
    if not (bundle / VITASK_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{bundle} is not a VITask bundle (no {VITASK_CONFIG_FILE}); run save_model first"
        )
    weights = [f for f in bundle_files(bundle) if f.endswith(".safetensors") and "/" not in f]
    if not weights:
        raise FileNotFoundError(f"{bundle} holds no safetensors weights at its top level: nothing to push")
    if base_model is not None:
        _set_base_model(bundle, base_model)
    card = render_model_card(
        bundle, repo_id=repo_id, base_model=base_model, datasets=datasets, metrics=metrics
    )
    (bundle / README_FILE).write_text(card)

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # "name" -> "user/name"
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(bundle),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload VITask bundle (hf_vitask)",
        allow_patterns=[glob.escape(f) for f in bundle_files(bundle)],
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return str(getattr(info, "commit_url", None) or repo_url)


def export_merged(
    bundle_dir: str | PathLike, output_dir: str | PathLike, base_model=None, **model_kwargs
) -> Path:
    """Merge the bundle's LoRA adapter into its base and save a plain VLM + processor (safetensors).

    The result loads with ``AutoModelForImageTextToText.from_pretrained(output_dir)`` and answers
    without the TSM (the exemplar path needs hf_vitask and the bundle). Load the base in full
    precision (not 4-bit) for an exact merge.
    """
    from transformers import AutoProcessor

    bundle = Path(bundle_dir)
    model = VITaskModel.from_pretrained(bundle, base_model, load_tsm=False, **model_kwargs)
    if not model.is_peft:
        raise ValueError(f"{bundle} holds no LoRA adapter to merge")
    merged = model.vlm.merge_and_unload()
    out = Path(output_dir)
    merged.save_pretrained(out)
    AutoProcessor.from_pretrained(str(bundle)).save_pretrained(str(out))
    return out
