"""``hf-vitask``: every pipeline step from one YAML file and/or ``--field value`` flags.

    hf-vitask train-tsm  config.yaml             # stage 0: the timm task-specific model
    hf-vitask train      config.yaml [--stage N] # VITask stages 1 and 2 (or one of them); --method vanilla
    hf-vitask train      config.yaml --method instruction-free   # image-description pairs, proxy instruction
    hf-vitask evaluate   config.yaml             # accuracy / macro-F1 / AUC, with and without the TSM
    hf-vitask predict    config.yaml --predict_inputs img.png folder/ [--use_tsm true]
    hf-vitask push       config.yaml --hub_model_id you/vitask-model   # bundle + model card to the Hub
    hf-vitask quickstart [--fast] [--ablation]   # the whole pipeline on the bundled digits, on CPU
    hf-vitask ablate     config.yaml --seeds 0 1 2   # each VITask component's contribution, with controls

The options of every command are the fields of the config dataclasses: ``hf-vitask COMMAND --help``
lists those the command reads (see :data:`HELP_FIELDS`), ``--help-all`` every one of them; a YAML key
that is not a field is an error, so typos never pass silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = {
    "train-tsm": "Train the task-specific model (timm classifier) on the train split.",
    "train": "Train the VLM: VITask stage 1 then 2 (or --stage N alone), or --method vanilla.",
    "evaluate": "Evaluate a trained bundle: with/without TSM, complete/incomplete instructions.",
    "predict": "Predict classes for image files / folders and write a CSV.",
    "push": "Upload a trained bundle with its model card to the Hub (hub_model_id).",
    "quickstart": "TSM, vanilla and VITask on the bundled digits, compared in one table (CPU, minutes).",
    "ablate": "Vanilla vs RDA / CRT / both (without the TSM), controls and the full model, over seeds; optional alpha x beta sweep.",
    "info": "Print the version, the device and the supported VLM families.",
}


@dataclass
class RunArguments:
    """Options of the commands themselves."""

    method: str = field(
        default="vitask",
        metadata={
            "help": "train / evaluate: 'vitask', 'vanilla' (plain instruction tuning) or 'instruction-free' "
            "(image-description pairs, momentum proxy instruction; reads InstructionFreeConfig fields)."
        },
    )
    use_tsm: bool = field(default=False, metadata={"help": "predict: use the TSM exemplar (EP path)."})
    predict_method: str = field(
        default="likelihood", metadata={"help": "predict: 'likelihood' or 'generate'."}
    )
    fast: bool = field(
        default=False, metadata={"help": "quickstart: a reduced run (seconds), for smoke tests."}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "quickstart / ablate: seeds to run and average."}
    )
    ablation: bool = field(
        default=False,
        metadata={"help": "quickstart: run the ablation (hf-vitask ablate) on the digits instead."},
    )
    sweep_rda_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "ablate: RDA weights (alpha) of the alpha x beta sweep (empty: no sweep)."},
    )
    sweep_crt_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "ablate: CRT weights (beta) of the alpha x beta sweep (empty: no sweep)."},
    )


# -- what `hf-vitask COMMAND --help` shows ---------------------------------------------------------------
# The fields each command reads (pipeline.run_*, quickstart, ablation), the most used first: the full
# listing (--help-all) is ~900 lines, mostly TrainingArguments fields no command needs to be told about.
MODEL = ("model_name_or_path", "torch_dtype", "load_in_4bit", "attn_implementation", "trust_remote_code")
DATA = (
    "dataset",
    "dataset_path",
    "dataset_paths",
    "dataset_image_column",
    "dataset_label_column",
    "max_samples",
    "train_split",
    "validation_split",
    "class_names",
    "question",
    "modality",
    "task_name",
    "image_size",
    "data_seed_split",
)
#: evaluation reads the data source, not the training subset
DATA_SOURCE = tuple(f for f in DATA if f not in ("max_samples", "train_split", "validation_split"))
#: instruction-free tuning from the CLI reads the bundled digits only
DIGITS = ("dataset", "max_samples", "train_split", "image_size", "data_seed_split")
TSM = ("tsm_model", "tsm_pretrained", "tsm_epochs", "tsm_batch_size", "tsm_learning_rate", "tsm_img_size")
#: VITaskConfig fields beyond TrainingArguments that `train` reads (the frozen RDA teacher, its cache and
#: the compute_metrics options are Python-API only: the CLI passes neither a teacher nor compute_metrics)
VITASK = (
    "stage",
    "rda_weight",
    "crt_weight",
    "ep_weight",
    "van_weight",
    "num_exemplar_tokens",
    "exemplar_feature",
    "connector_hidden_dim",
    "freeze_connector",
    "instruction",
    "max_length",
    "pass_fusion",
    "fused_loss_head",
    "crt_negatives",
    "rda_temperature",
    "rda_detach",
    "rda_teacher_dropout",
)
INSTRUCTION_FREE = (
    "use_proxy",
    "num_proxy_tokens",
    "proxy_init_text",
    "proxy_init_resize",
    "proxy_momentum",
    "proxy_feed",
    "proxy_learning_rate",
    "proxy_slot_token",
    "instruction_text",
    "shuffle_prob",
    "shuffle_separator",
    "max_length",
    "fused_loss_head",
)
TRAINING = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "bf16",
    "gradient_checkpointing",
    "logging_steps",
    "save_strategy",
    "save_steps",
    "eval_strategy",
    "report_to",
    "seed",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
    "deepspeed",
    "fsdp",
)
LORA = ("use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
#: ablate sets the stage and the seed itself, and max_steps is each stage's budget (not num_train_epochs)
ABLATE_TRAINING = tuple(
    f
    for f in TRAINING
    if f not in ("num_train_epochs", "seed", "resume_from_checkpoint", "push_to_hub", "hub_model_id")
)
#: help key ("command" or "command --method M") -> heading -> fields, in the order shown
HELP_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "train-tsm": {"data": DATA, "TSM": (*TSM, "tsm_path"), "training": ("output_dir", "seed")},
    "train": {
        "model": MODEL,
        "data": DATA,
        "TSM": ("tsm_path",),
        "VITask method": VITASK,
        "training": TRAINING,
        "LoRA": LORA,
        "command options": ("method",),
    },
    "train --method instruction-free": {
        "model": MODEL,
        "data": DIGITS,
        "instruction-free method": INSTRUCTION_FREE,
        "training": TRAINING,
        "LoRA": LORA,
        "command options": ("method",),
    },
    "evaluate": {
        "evaluation": (
            "model_path",
            "output_dir",
            "eval_split",
            "eval_max_samples",
            "eval_batch_size",
            "eval_methods",
            "option_score",
            "eval_use_tsm",
            "eval_instructions",
            "plugin_tsm",
        ),
        "data": DATA_SOURCE,
        "command options": ("method",),
    },
    "evaluate --method instruction-free": {
        "evaluation": (
            "model_path",
            "output_dir",
            "eval_split",
            "eval_max_samples",
            "eval_batch_size",
            "eval_methods",
            "seed",
        ),
        "data": ("dataset", "image_size", "data_seed_split"),
        "command options": ("method",),
    },
    "predict": {
        "prediction": (
            "predict_inputs",
            "predictions_file",
            "use_tsm",
            "predict_method",
            "option_score",
            "eval_batch_size",
        ),
        "model": ("model_path", "output_dir"),
        "data": ("task_name",),
    },
    "push": {
        "hub": ("hub_model_id", "hub_private_repo", "hub_revision", "hub_token"),
        "model": ("model_path", "output_dir", "model_name_or_path"),
    },
    "quickstart": {
        "command options": (
            "fast",
            "seeds",
            "ablation",
            "sweep_rda_weights",
            "sweep_crt_weights",
            "output_dir",
        )
    },
    "ablate": {
        "command options": ("seeds", "sweep_rda_weights", "sweep_crt_weights", "output_dir"),
        "model": MODEL,
        "data": DATA,
        "TSM": TSM,
        "VITask method": tuple(f for f in VITASK if f != "stage"),
        "training": ABLATE_TRAINING,
        "LoRA": LORA,
        "evaluation": ("eval_split", "eval_max_samples", "eval_batch_size"),
    },
}
HELP_LINES = 110  # the most lines a command's --help prints (help texts are cut to fit)
_TYPE_NAMES = {int: "INT", float: "FLOAT", str: "STR"}


def help_key(command: str, method: str) -> str:
    """The :data:`HELP_FIELDS` entry of a command run with ``--method method``."""
    key = f"{command} --method {method}"
    return key if key in HELP_FIELDS else command


def _signature(action) -> str:
    """``--field TYPE (default: X)``, with the type and default HfArgumentParser gives the field."""
    if action.choices:
        kind = "{" + ",".join(map(str, action.choices)) + "}"
        if len(kind) > 32:
            kind = kind[: kind.rfind(",", 0, 28)] + ",...}"
    elif getattr(action.type, "__name__", "") == "string_to_bool":
        kind = "BOOL"
    else:
        kind = _TYPE_NAMES.get(action.type, "VALUE")
    if action.nargs == "+":
        kind = f"{kind} [{kind} ...]"
    elif action.nargs == "?" and kind != "BOOL":
        kind = f"[{kind}]"
    return f"{action.option_strings[0]} {kind} " + (
        "(required)" if action.required else f"(default: {action.default})"
    )


def short_help(parser, command: str, method: str = "vitask") -> str:
    """``hf-vitask COMMAND --help``: the fields the command reads, grouped. Every field gets one line; the
    spare lines (up to :data:`HELP_LINES` in all) go to longer help texts, the first fields first.
    Defaults are the parser's: a config file's values once it is loaded."""
    key = help_key(command, method)
    options = parser._option_string_actions  # "--field" -> its argparse action
    groups = {
        title: [
            options[f"--{name}"] for name in names if f"--{name}" in options
        ]  # older transformers lack some
        for title, names in HELP_FIELDS[key].items()
    }
    head = [
        f"usage: hf-vitask {command} [config.yaml]{key[len(command) :]} [--field value ...]",
        "",
        COMMANDS[command],
        "Set a field in config.yaml (field: value) or as --field value; a flag overrides the file.",
        "",
    ]
    total = len({a.dest for a in parser._actions if a.option_strings and a.dest != "help"})
    tail = [
        f"hf-vitask {variant} --help shows the fields of that method."
        for variant in HELP_FIELDS
        if variant.startswith(f"{command} --") and key == command
    ]
    tail += [
        f"hf-vitask {command} --help-all lists all {total} fields (every TrainingArguments field included)."
    ]
    actions = [action for fields in groups.values() for action in fields]
    width = min(max(shutil.get_terminal_size((110, 24)).columns, 80), 140)
    column = min(max(len(_signature(a)) for a in actions), 44) + 4  # where help texts start

    def wrap(action, max_lines: int) -> list[str]:
        first = f"  {_signature(action):<{column - 4}}  "
        text = " ".join((action.help or "").split()).replace("%%", "%")  # argparse's escaped percent signs
        return textwrap.wrap(
            text,
            width=max(width, len(first) + 20),
            initial_indent=first,
            placeholder=" ...",
            subsequent_indent=" " * column,
            max_lines=max_lines,
            break_on_hyphens=False,
            break_long_words=False,
        ) or [first.rstrip()]

    needed = [len(wrap(a, 3)) for a in actions]
    shown = [1] * len(actions)
    spare = HELP_LINES - len(head) - len(tail) - 2 * len(groups) - len(actions)
    for lines in (2, 3):
        for i in range(len(actions)):
            if spare > 0 and needed[i] >= lines:
                shown[i], spare = lines, spare - 1
    out, allotted = list(head), iter(shown)  # `actions` is `groups` flattened: same order
    for title, fields in groups.items():
        out += [f"{title}:", *(line for a in fields for line in wrap(a, next(allotted))), ""]
    return "\n".join(out + tail)


def _dataclasses(method: str = "vitask"):
    from hf_vitask.config import (
        DataArguments,
        EvalArguments,
        InstructionFreeConfig,
        ModelArguments,
        TSMArguments,
        VITaskConfig,
    )

    training = InstructionFreeConfig if method == "instruction-free" else VITaskConfig
    return (ModelArguments, DataArguments, TSMArguments, training, EvalArguments, RunArguments)


def _method(argv: list[str], values: dict) -> str:
    """The training method, needed before parsing: it picks the training config class."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return values.get("method", "vitask")


class UsageError(ValueError):
    """A wrong command line or config file (exit code 2)."""


def parse(argv: list[str], command: str | None = None):
    """``[config.yaml] [--field value ...]`` -> the config dataclasses, plus the keys set explicitly.

    ``--help`` prints the fields ``command`` reads (:func:`short_help`), ``--help-all`` every field."""
    import yaml
    from transformers import HfArgumentParser

    explicit: set[str] = set()
    values: dict = {}
    path = None
    if argv and not argv[0].startswith("-"):
        path = Path(argv[0])
        if not path.is_file():
            raise UsageError(f"config file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise UsageError(f"{path} must hold a mapping of field: value")
    method = _method(argv, values)
    classes = _dataclasses(method)
    parser = HfArgumentParser(classes, exit_on_error=False)  # a bad flag value: one line, as other errors
    if path is not None:
        known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(
                f"unknown keys in {path}: {unknown}. "
                f"See `hf-vitask {command or 'train'} --help-all` for the fields."
            )
        # `eval_methods: likelihood` means a one-item list, not the list of its letters
        lists = {f.name for cls in classes for f in dataclasses.fields(cls) if "list[" in str(f.type)}
        values = {k: [v] if k in lists and isinstance(v, str) else v for k, v in values.items()}
        parser.set_defaults(**values)
        explicit |= set(values)
        argv = argv[1:]
    if "--help-all" in argv:  # argparse's own listing of every field, under a one-line usage
        argv = ["--help" if a == "--help-all" else a for a in argv]
        parser.prog = f"hf-vitask {command or 'COMMAND'}"
        parser.usage = f"{parser.prog} [config.yaml] [--field value ...]"
    elif command is not None and {"-h", "--help"} & set(argv):
        print(short_help(parser, command, method))
        raise SystemExit(0)  # as argparse's --help does
    explicit |= {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    try:
        return parser.parse_args_into_dataclasses(args=argv), explicit
    except (argparse.ArgumentError, ValueError, TypeError) as err:  # argparse's checks, then the fields' own
        raise UsageError(str(err)) from err


def _info() -> int:
    import torch

    from hf_vitask.models.families import support_matrix
    from hf_vitask.version import __version__

    print(f"hf_vitask {__version__}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    print(
        "supported VLM families (pass_fusion: modes that run, fastest first; gradient checkpointing runs the"
    )
    print("first mode after 'prefix'; 4-bit keeps the listed modules in full precision):")
    rows = support_matrix()
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(("  " + "  ".join(c.ljust(widths[c]) for c in columns)).rstrip())
    for row in rows:
        print(("  " + "  ".join(row[c].ljust(widths[c]) for c in columns)).rstrip())
    return 0


def _usage() -> str:
    from hf_vitask.version import __version__

    lines = [
        f"hf-vitask {__version__}: turn a vision-language model into a task specialist.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "usage: hf-vitask COMMAND [config.yaml] [--field value ...]   (hf-vitask COMMAND --help lists the fields)",
    ]
    return "\n".join(lines)


def _print_results(results: dict) -> None:
    import json

    _say(json.dumps(results, indent=2))


def _say(message: str) -> None:
    """Print once per job: under ``torchrun`` only the main process speaks."""
    from hf_vitask import distributed

    if distributed.is_main_process():
        print(message)


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors print one line ``hf-vitask: error: ...`` and return 2 (usage) or 1
    (runtime). ``--debug`` anywhere on the command line shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        _quiet_third_parties()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("hf-vitask: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last resort: one readable line, not a traceback
        if debug:
            raise
        print(f"hf-vitask: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


def _quiet_third_parties() -> None:
    """Third-party notices that are not the user's business, shown again by ``--debug``: bitsandbytes
    (imported by peft whenever transformers' Trainer is) logs a warning about an optional CPU kernel on
    every command, 4-bit or not; peft itself still calls a property transformers deprecated."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def _one_line(err: BaseException) -> str:
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return text if isinstance(err, (UsageError, ValueError)) else f"{type(err).__name__}: {text}"


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from hf_vitask.version import __version__

        print(f"hf_vitask {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-vitask: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "info":
        if {"-h", "--help", "--help-all"} & set(rest):
            print(f"usage: hf-vitask info\n\n{COMMANDS['info']}")
            return 0
        return _info()
    (model_args, data_args, tsm_args, train_args, eval_args, run_args), explicit = parse(rest, command)
    columns = sorted({"image_column", "label_column"} & explicit)
    if columns and run_args.method != "instruction-free" and command in ("train-tsm", "train", "evaluate"):
        raise UsageError(
            f"{', '.join(columns)} name the columns the trainer reads, and the command-line pipeline always hands it "
            f"'image' and 'label'; to name the columns of your data file use "
            f"{', '.join('dataset_' + c for c in columns)}"
        )

    from hf_vitask import pipeline

    out = train_args.output_dir
    if command == "train-tsm":
        _, history = pipeline.run_train_tsm(data_args, tsm_args, out, seed=train_args.seed)
        _say(f"TSM saved to {pipeline.tsm_dir(tsm_args, out)}; best validation epoch {history['best_epoch']}")
    elif command == "train" and run_args.method == "instruction-free":
        path = pipeline.run_train_instruction_free(model_args, data_args, train_args)
        _say(f"model saved to {path}")
    elif command == "evaluate" and run_args.method == "instruction-free":
        _print_results(pipeline.run_evaluate_instruction_free(eval_args, data_args, train_args))
    elif command == "train":
        stages = (train_args.stage,) if "stage" in explicit else (1, 2)
        path = pipeline.run_train(
            model_args, data_args, tsm_args, train_args, stages=stages, method=run_args.method
        )
        _say(f"model saved to {path}")
    elif command == "evaluate":
        _print_results(
            pipeline.run_evaluate(eval_args, data_args, out, tsm_args, progress=not train_args.disable_tqdm)
        )
    elif command == "predict":
        path = pipeline.run_predict(
            eval_args,
            out,
            use_tsm=run_args.use_tsm,
            method=run_args.predict_method,
            task_name=data_args.task_name,
            progress=not train_args.disable_tqdm,
        )
        _say(f"predictions written to {path}")
    elif command == "push":
        _say(f"pushed: {pipeline.run_push(eval_args, model_args, train_args, out)}")
    elif command == "ablate":
        from hf_vitask.ablation import run_ablation

        run_ablation(
            (model_args, data_args, tsm_args, train_args, eval_args),
            out,
            seeds=run_args.seeds,
            alphas=run_args.sweep_rda_weights,
            betas=run_args.sweep_crt_weights,
        )
    elif command == "quickstart" and run_args.ablation:
        from hf_vitask.quickstart import run_quickstart_ablation

        run_quickstart_ablation(
            out if "output_dir" in explicit else "vitask-ablation",
            fast=run_args.fast,
            seeds=run_args.seeds,
            alphas=run_args.sweep_rda_weights,
            betas=run_args.sweep_crt_weights,
        )
    elif command == "quickstart":
        from hf_vitask.quickstart import run_quickstart

        run_quickstart(
            out if "output_dir" in explicit else "vitask-quickstart", fast=run_args.fast, seeds=run_args.seeds
        )
    return 0


def run() -> None:
    """The ``hf-vitask`` executable: :func:`main`, then, after a command that succeeded, leave the
    process group of a multi-process launch together (see
    :func:`hf_vitask.distributed.end_process_group`) and exit with the command's status."""
    code = main()
    if code == 0 and "torch.distributed" in sys.modules:
        from hf_vitask.distributed import end_process_group

        end_process_group()
    sys.exit(code)


if __name__ == "__main__":
    run()
