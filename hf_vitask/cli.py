"""``hf-vitask``: every pipeline step from one YAML file and/or ``--field value`` flags.

    hf-vitask train-tsm  config.yaml             # stage 0: the timm task-specific model
    hf-vitask train      config.yaml [--stage N] # VITask stages 1 and 2 (or one of them); --method vanilla
    hf-vitask train      config.yaml --method instruction-free   # image-description pairs, proxy instruction
    hf-vitask evaluate   config.yaml             # accuracy / macro-F1 / AUC, with and without the TSM
    hf-vitask predict    config.yaml --predict_inputs img.png folder/ [--use_tsm true]
    hf-vitask push       config.yaml --hub_model_id you/vitask-model   # bundle + model card to the Hub
    hf-vitask quickstart [--fast] [--ablation]   # the whole pipeline on the bundled digits, on CPU
    hf-vitask ablate     config.yaml --seeds 0 1 2   # each VITask component's contribution, with controls

The options of every command are the fields of the config dataclasses (``hf-vitask train --help``
lists them all); a YAML key that is not one of them is an error, so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import sys
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
    predict_method: str = field(default="likelihood", metadata={"help": "predict: 'likelihood' or 'generate'."})
    fast: bool = field(default=False, metadata={"help": "quickstart: a reduced run (seconds), for smoke tests."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "quickstart / ablate: seeds to run and average."})
    ablation: bool = field(default=False, metadata={"help": "quickstart: run the ablation (hf-vitask ablate) on the digits instead."})
    sweep_rda_weights: list[float] = field(
        default_factory=list, metadata={"help": "ablate: RDA weights (alpha) of the alpha x beta sweep (empty: no sweep)."}
    )
    sweep_crt_weights: list[float] = field(
        default_factory=list, metadata={"help": "ablate: CRT weights (beta) of the alpha x beta sweep (empty: no sweep)."}
    )


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


def parse(argv: list[str]):
    """``[config.yaml] [--field value ...]`` -> the config dataclasses, plus the keys set explicitly."""
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
    classes = _dataclasses(_method(argv, values))
    parser = HfArgumentParser(classes)
    if path is not None:
        known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown keys in {path}: {unknown}. See `hf-vitask train --help` for the fields.")
        # `eval_methods: likelihood` means a one-item list, not the list of its letters
        lists = {f.name for cls in classes for f in dataclasses.fields(cls) if "list[" in str(f.type)}
        values = {k: [v] if k in lists and isinstance(v, str) else v for k, v in values.items()}
        parser.set_defaults(**values)
        explicit |= set(values)
        argv = argv[1:]
    explicit |= {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    try:
        return parser.parse_args_into_dataclasses(args=argv), explicit
    except (ValueError, TypeError) as err:  # a field's own validation (__post_init__)
        raise UsageError(str(err)) from err


def _info() -> int:
    import torch

    from hf_vitask import __version__
    from hf_vitask.models.families import support_matrix

    print(f"hf_vitask {__version__}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    print("supported VLM families (pass_fusion: modes that run, fastest first; gradient checkpointing runs the")
    print("first mode after 'prefix'; 4-bit keeps the listed modules in full precision):")
    rows = support_matrix()
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(("  " + "  ".join(c.ljust(widths[c]) for c in columns)).rstrip())
    for row in rows:
        print(("  " + "  ".join(row[c].ljust(widths[c]) for c in columns)).rstrip())
    return 0


def _usage() -> str:
    from hf_vitask import __version__

    lines = [f"hf-vitask {__version__}: turn a vision-language model into a task specialist.", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
    lines += ["", "usage: hf-vitask COMMAND [config.yaml] [--field value ...]   (hf-vitask COMMAND --help lists the fields)"]
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


def _one_line(err: BaseException) -> str:
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return text if isinstance(err, (UsageError, ValueError)) else f"{type(err).__name__}: {text}"


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from hf_vitask import __version__

        print(f"hf_vitask {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-vitask: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "info":
        return _info()
    (model_args, data_args, tsm_args, train_args, eval_args, run_args), explicit = parse(rest)

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
        path = pipeline.run_train(model_args, data_args, tsm_args, train_args, stages=stages, method=run_args.method)
        _say(f"model saved to {path}")
    elif command == "evaluate":
        _print_results(pipeline.run_evaluate(eval_args, data_args, out, tsm_args))
    elif command == "predict":
        path = pipeline.run_predict(
            eval_args, out, use_tsm=run_args.use_tsm, method=run_args.predict_method, task_name=data_args.task_name
        )
        _say(f"predictions written to {path}")
    elif command == "push":
        _say(f"pushed: {pipeline.run_push(eval_args, model_args, train_args, out)}")
    elif command == "ablate":
        from hf_vitask.ablation import run_ablation

        run_ablation((model_args, data_args, tsm_args, train_args, eval_args), out, seeds=run_args.seeds,
                     alphas=run_args.sweep_rda_weights, betas=run_args.sweep_crt_weights)
    elif command == "quickstart" and run_args.ablation:
        from hf_vitask.quickstart import run_quickstart_ablation

        run_quickstart_ablation(out if "output_dir" in explicit else "vitask-ablation", fast=run_args.fast,
                                seeds=run_args.seeds, alphas=run_args.sweep_rda_weights,
                                betas=run_args.sweep_crt_weights)
    elif command == "quickstart":
        from hf_vitask.quickstart import run_quickstart

        run_quickstart(out if "output_dir" in explicit else "vitask-quickstart", fast=run_args.fast, seeds=run_args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
