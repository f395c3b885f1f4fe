"""Instruction-free tuning on the bundled digits: fixed instruction vs learned proxy vs momentum proxy vs
momentum proxy + response shuffling, from one instruction-following base, on held-out question wordings.

1. **Base.** The tiny random LLaVA cannot answer a question, so it is first made into a small
   instruction follower: *all* its weights are fine-tuned on multiple-choice questions about the training
   digits (value, parity, stroke), asked in the TRAINING wordings (:data:`TRAIN_WORDINGS`) and answered
   with a letter. Saved to ``<output-dir>/seed<N>/base`` (a plain ``save_pretrained`` VLM + processor).
2. **Arms.** Each arm starts from that same base and is tuned (LoRA) on ``image -> description`` pairs
   only (``"value: seven, parity: odd, stroke: thick"``, no question), same steps, learning rate and seed:

   - fixed instruction (``use_proxy=False``): the text "Describe the findings in this image." is shown;
   - learned proxy, no momentum (``proxy_momentum=0, shuffle_prob=0``);
   - momentum proxy (``proxy_momentum=0.99, shuffle_prob=0``);
   - momentum proxy + response shuffling (the full method: the defaults).
3. **Evaluation.** The base and every arm answer multiple-choice questions about the test digits in the
   HELD-OUT wordings (``DIGIT_QUESTION_WORDINGS``, never used in any training), with
   :func:`~hf_vitask.evaluation.mc_evaluate`, by letter likelihood and by greedy
   generation: accuracy overall and per attribute, and the parse-failure rate (no letter generated).

Options are in a fixed canonical order (value: all ten digit names, ``A. zero`` .. ``J. nine``; parity
``A. odd B. even``; stroke ``A. thick B. thin``): a ~190k-parameter random model does not learn, within
minutes of CPU, to read *shuffled* options (we tried up to 3,000 steps and a 3-layer 128-wide model:
chance), so in this demo a letter is a fixed code for an answer. The question wording is still held out.

    python examples/instruction_free_digits.py [--output-dir DIR] [--seeds 0 1 2] [--steps N] [--base-steps N] [--fast]

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--output-dir`` and prints the table
(about 4 minutes per seed on 2 CPU cores; ``--fast`` runs in seconds, for smoke tests).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hf_vitask import VITaskProcessor
from hf_vitask.data.digits import (
    DIGIT_ATTRIBUTES,
    DIGIT_NAMES,
    DIGIT_QUESTION_WORDINGS,
    add_digit_descriptions,
    load_digits_dataset,
    make_mc_questions,
)
from hf_vitask.evaluation import LETTERS, mc_evaluate, mc_prompt
from hf_vitask.models.loading import load_vlm
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.trainers.instruction_free import InstructionFreeConfig, InstructionFreeTrainer

#: Wordings the BASE is trained on; disjoint from the held-out ``DIGIT_QUESTION_WORDINGS`` used in evaluation.
TRAIN_WORDINGS: dict[str, tuple[str, ...]] = {
    "value": (
        "What digit is shown?",
        "Identify the handwritten digit.",
        "Which number is drawn here?",
        "Name the digit in the image.",
    ),
    "parity": (
        "Is this digit odd or even?",
        "Odd or even: which describes the number shown?",
        "Tell the parity of the number in the image.",
    ),
    "stroke": (
        "Are the strokes of this digit thick or thin?",
        "Is the digit drawn with a thick or a thin line?",
        "Describe the line width of the handwriting: thick or thin?",
    ),
}

#: The option order of every question (see the module docstring).
CANONICAL_OPTIONS: dict[str, tuple[str, ...]] = {
    "value": tuple(DIGIT_NAMES),
    "parity": ("odd", "even"),
    "stroke": ("thick", "thin"),
}
CHANCE = {"value": 1 / len(DIGIT_NAMES), "parity": 0.5, "stroke": 0.5}

#: The four arms: InstructionFreeConfig overrides (everything else is shared).
ARMS: dict[str, dict] = {
    "fixed instruction": {"use_proxy": False, "shuffle_prob": 0.0},
    "proxy, no momentum": {"proxy_momentum": 0.0, "shuffle_prob": 0.0},
    "momentum proxy": {"shuffle_prob": 0.0},
    "momentum proxy + shuffling": {},
}
MODELS = ("base", *ARMS)
METHODS = ("likelihood", "generate")


@dataclass(frozen=True)
class Budget:
    """Sizes of one run."""

    train_samples: int | None = None  # digits drawn before the train/validation/test split (None: all 1,797)
    eval_samples: int = 180  # test digits evaluated (3 questions each)
    base_steps: int = 800
    base_learning_rate: float = 2e-3
    steps: int = 150
    learning_rate: float = 5e-3
    batch_size: int = 16
    eval_batch_size: int = 16


FULL = Budget()
FAST = Budget(train_samples=60, eval_samples=6, base_steps=2, steps=2, batch_size=4, eval_batch_size=8)


# -- questions --------------------------------------------------------------------------------------------
def canonical(questions: list[dict]) -> list[dict]:
    """The questions with their options in :data:`CANONICAL_OPTIONS` order (answer re-indexed)."""
    out = []
    for q in questions:
        options = [o for o in CANONICAL_OPTIONS[q["attribute"]] if o in q["options"]]
        out.append({**q, "options": options, "answer": options.index(q["options"][q["answer"]])})
    return out


def digit_questions(dataset, seed: int, wordings=None) -> list[dict]:
    """One canonical-order question per (digit, attribute); value questions list all ten digits."""
    return canonical(
        make_mc_questions(dataset, seed=seed, wordings=wordings, num_value_options=len(DIGIT_NAMES))
    )


class MCCollator:
    """Question rows -> a batch whose only learnt token is the answer letter (and the end of turn)."""

    def __init__(self, processor):
        self.processor = VITaskProcessor.wrap(processor)  # renders prompts as training and evaluation do

    def __call__(self, rows: list[dict]) -> dict:
        examples = [
            self.processor.chat_example(
                q["image"], mc_prompt(q["question"], q["options"]), LETTERS[q["answer"]]
            )
            for q in rows
        ]
        return dict(self.processor.encode_examples(examples))


# -- training ---------------------------------------------------------------------------------------------
def _args(out: Path, budget: Budget, seed: int, **kw) -> InstructionFreeConfig:
    kw.setdefault("max_steps", budget.steps)
    kw.setdefault("learning_rate", budget.learning_rate)
    return InstructionFreeConfig(
        output_dir=str(out),
        per_device_train_batch_size=budget.batch_size,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        **kw,
    )


def train_base(data, budget: Budget, seed: int, out: Path) -> tuple[Path, dict]:
    """Full fine-tune of the tiny LLaVA on letter answers to TRAINING-wording questions; saved to ``out``."""
    vlm, processor = build_tiny_vlm("llava", seed=seed)
    questions = digit_questions(data["train"], seed, TRAIN_WORDINGS)
    args = _args(
        out,
        budget,
        seed,
        max_steps=budget.base_steps,
        learning_rate=budget.base_learning_rate,
        use_proxy=False,
        use_lora=False,
        shuffle_prob=0.0,
    )
    trainer = InstructionFreeTrainer(
        model=vlm,
        args=args,
        processing_class=processor,
        train_dataset=questions,
        data_collator=MCCollator(processor),
    )
    result = trainer.train()
    vlm.save_pretrained(out)  # the plain VLM: every arm loads it with load_vlm / from_pretrained
    processor.save_pretrained(out)
    return out, {"train_loss": result.training_loss, "train_questions": len(questions)}


def train_arm(base: Path, data, overrides: dict, budget: Budget, seed: int, out: Path):
    """LoRA on image -> description pairs, from the saved base; returns the trainer."""
    vlm, processor = load_vlm(str(base))
    trainer = InstructionFreeTrainer(
        model=vlm,
        args=_args(out, budget, seed, **overrides),
        processing_class=processor,
        train_dataset=data["train"],
    )
    trainer.train()
    return trainer, processor


def evaluate(model, processor, questions: list[dict], budget: Budget) -> dict:
    """``{method: {accuracy, by_attribute, parse_failure_rate, examples}}`` on the held-out questions."""
    out = {}
    for method in METHODS:
        r = mc_evaluate(model, processor, questions, method=method, batch_size=budget.eval_batch_size)
        out[method] = {
            "accuracy": r["accuracy"],
            "by_attribute": r["by_attribute"],
            "parse_failure_rate": r["parse_failure_rate"],
        }
        if method == "generate":
            out[method]["examples"] = [
                {"question": q["question"], "answer": LETTERS[q["answer"]], "generated": text}
                for q, text in list(zip(questions, r["answers"]))[:6]
            ]
    return out


def run_seed(out: Path, budget: Budget, seed: int) -> dict:
    """Base + the four arms for one seed; returns ``{model: metrics}``."""
    data = add_digit_descriptions(load_digits_dataset(max_samples=budget.train_samples, seed=0))
    test = data["test"].select(range(min(budget.eval_samples, len(data["test"]))))
    held_out = digit_questions(test, seed)  # DIGIT_QUESTION_WORDINGS: never trained on
    table: dict = {}
    start = time.time()
    base, info = train_base(data, budget, seed, out / "base")
    vlm, processor = load_vlm(str(base))
    table["base"] = evaluate(vlm, processor, held_out, budget)
    seen = mc_evaluate(
        vlm, processor, digit_questions(test, seed, TRAIN_WORDINGS), batch_size=budget.eval_batch_size
    )
    table["base"]["training_wordings_likelihood_accuracy"] = seen["accuracy"]
    table["base"].update(info, seconds=round(time.time() - start, 1))
    for name, overrides in ARMS.items():
        start = time.time()
        trainer, processor = train_arm(
            base, data, overrides, budget, seed, out / name.replace(" ", "_").replace(",", "")
        )
        losses = [log["loss_ce"] for log in trainer.state.log_history if "loss_ce" in log]
        # did the arm learn the descriptions? Cross-entropy of the test digits' descriptions, with the
        # arm's own training prompt (fixed text or its proxy), descriptions as written (not shuffled)
        description_ce = trainer.evaluate(eval_dataset=test)["eval_loss_ce"]
        table[name] = evaluate(trainer.model, processor, held_out, budget)
        table[name].update(
            config=overrides,
            final_train_loss_ce=losses[-1] if losses else None,
            test_description_ce=description_ce,
            seconds=round(time.time() - start, 1),
        )
    (out / "metrics.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


# -- reporting --------------------------------------------------------------------------------------------
def metric_values(metrics: dict) -> dict[str, float]:
    """The flat numbers of one model's metrics: ``likelihood_accuracy``, ``generate_value``, ..."""
    flat = {}
    for method in METHODS:
        m = metrics[method]
        flat[f"{method}_accuracy"] = m["accuracy"]
        for attr in DIGIT_ATTRIBUTES:
            flat[f"{method}_{attr}"] = m["by_attribute"].get(attr, float("nan"))
        flat[f"{method}_parse_failure_rate"] = m["parse_failure_rate"]
    flat["test_description_ce"] = metrics.get("test_description_ce", float("nan"))
    return flat


def summarize(per_seed: list[dict]) -> dict:
    """``{model: {metric: (mean, std)}}`` over seeds."""
    summary: dict = {}
    for model in MODELS:
        flats = [metric_values(t[model]) for t in per_seed]
        summary[model] = {k: _mean_std([f[k] for f in flats]) for k in flats[0]}
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in values):  # e.g. the base has no description prompt
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


COLUMNS = (
    ("likelihood_accuracy", "lik acc"),
    ("likelihood_value", "lik value"),
    ("likelihood_parity", "lik parity"),
    ("likelihood_stroke", "lik stroke"),
    ("generate_accuracy", "gen acc"),
    ("generate_value", "gen value"),
    ("generate_parity", "gen parity"),
    ("generate_stroke", "gen stroke"),
    ("generate_parse_failure_rate", "parse fail"),
    ("test_description_ce", "desc CE"),
)


def markdown_table(summary: dict, n_seeds: int) -> str:
    def cell(model, key):
        mean, std = summary[model][key]
        if not math.isfinite(mean):
            return "–"
        return f"{mean:.3f}" + (f" ± {std:.3f}" if n_seeds > 1 else "")

    lines = [
        "| model | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for model in MODELS:
        lines.append(f"| {model} | " + " | ".join(cell(model, key) for key, _ in COLUMNS) + " |")
    chance = statistics.fmean(CHANCE.values())
    lines.append(
        f"| *chance* | {chance:.3f} | {CHANCE['value']:.3f} | 0.500 | 0.500 | "
        f"{chance:.3f} | {CHANCE['value']:.3f} | 0.500 | 0.500 | – | – |"
    )
    return "\n".join(lines)


def plot(summary: dict, path: Path, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("accuracy", "overall"), *((attr, attr) for attr in DIGIT_ATTRIBUTES)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(MODELS)
    for ax, method in zip(axes, METHODS):
        for i, model in enumerate(MODELS):
            means = [summary[model][f"{method}_{key}"][0] for key, _ in groups]
            errs = [summary[model][f"{method}_{key}"][1] for key, _ in groups]
            xs = [g + (i - (len(MODELS) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, means, width, yerr=errs if n_seeds > 1 else None, label=model, capsize=2)
        for g, (key, _) in enumerate(groups):
            level = statistics.fmean(CHANCE.values()) if key == "accuracy" else CHANCE[key]
            ax.hlines(level, g - 0.45, g + 0.45, colors="grey", linestyles=":", linewidth=1)
        ax.set_xticks(range(len(groups)), [title for _, title in groups])
        ax.set_title(
            f"{method} (parse failures: "
            + ", ".join(f"{summary[m][f'{method}_parse_failure_rate'][0]:.2f}" for m in MODELS)
            + ")",
            fontsize=8,
        )
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("held-out-wording MC accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"instruction-free tuning, digits, tiny LLaVA ({n_seeds} seed{'s' if n_seeds > 1 else ''}; dotted: chance)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="instruction-free-digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help=f"optimizer steps of every arm (default {FULL.steps})")
    parser.add_argument(
        "--base-steps", type=int, help=f"optimizer steps of the base (default {FULL.base_steps})"
    )
    parser.add_argument(
        "--learning-rate", type=float, help=f"LoRA learning rate of every arm (default {FULL.learning_rate})"
    )
    parser.add_argument("--fast", action="store_true", help="a reduced run (seconds), for smoke tests")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a model this small gains nothing from more, and loses a lot "
        "when other processes share the cores)",
    )
    cli = parser.parse_args(argv)
    budget = FAST if cli.fast else FULL
    if cli.steps is not None:
        budget = replace(budget, steps=cli.steps)
    if cli.learning_rate is not None:
        budget = replace(budget, learning_rate=cli.learning_rate)
    if cli.base_steps is not None:
        budget = replace(budget, base_steps=cli.base_steps)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cli.threads)
    start = time.time()
    try:
        per_seed = [run_seed(out / f"seed{seed}", budget, seed) for seed in cli.seeds]
    finally:
        torch.set_num_threads(threads)
    runtime = round(time.time() - start, 1)
    summary = summarize(per_seed)
    table = markdown_table(summary, len(cli.seeds))
    results = {
        "budget": asdict(budget),
        "seeds": cli.seeds,
        "arms": ARMS,
        "train_wordings": TRAIN_WORDINGS,
        "held_out_wordings": DIGIT_QUESTION_WORDINGS,
        "canonical_options": CANONICAL_OPTIONS,
        "chance": CHANCE,
        "per_seed": dict(zip(map(str, cli.seeds), per_seed)),
        "summary": {
            m: {k: {"mean": _finite(a), "std": _finite(b)} for k, (a, b) in v.items()}
            for m, v in summary.items()
        },
        "runtime_seconds": runtime,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# Instruction-free tuning on the digits\n\nTiny LLaVA, seeds {cli.seeds}, {runtime} s; base {budget.base_steps} "
        f"steps, arms {budget.steps} steps; {budget.eval_samples} test digits x 3 questions in held-out wordings.\n\n"
        f"{table}\n"
    )
    plot(summary, out / "results.png", len(cli.seeds))
    print(
        "\n"
        + table
        + f"\n\n{runtime} s; written: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}"
    )
    return results


if __name__ == "__main__":
    main()
