"""``hf-vitask quickstart``: TSM, vanilla tuning and VITask on the bundled digits, in one table.

Everything runs offline on a CPU: a timm ``test_resnet`` TSM, a tiny random LLaVA, the real
scikit-learn digits. Vanilla tuning gets the same number of optimizer steps as VITask's two
stages together. Each model is scored on the test split by option likelihood (accuracy,
macro-F1, AUC) and by generation (accuracy, parse failures), with complete and incomplete
instructions. Written to the output directory: ``results.json``, ``results.md``, ``results.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from hf_vitask.config import DataArguments, EvalArguments, ModelArguments, TSMArguments, VITaskConfig
from hf_vitask.metrics import mean_std


@dataclass(frozen=True)
class QuickstartBudget:
    """Sizes of a quickstart run."""

    train_samples: int = 420
    eval_samples: int = 120
    tsm_epochs: int = 8
    steps_per_stage: int = 240
    batch_size: int = 16
    learning_rate: float = 2e-3


FULL = QuickstartBudget()
FAST = QuickstartBudget(train_samples=48, eval_samples=12, tsm_epochs=1, steps_per_stage=2, batch_size=8)
#: The ablation trains about eleven stages per seed: half the quickstart's steps per stage, all else equal.
ABLATION = dataclasses.replace(FULL, steps_per_stage=FULL.steps_per_stage // 2)
ROWS = ("TSM", "vanilla", "VITask w/o EP", "VITask w/ EP")


def _configs(out: Path, budget: QuickstartBudget, seed: int, dataset: str = "digits"):
    data = DataArguments(dataset=dataset, max_samples=budget.train_samples, data_seed_split=0)
    tsm = TSMArguments(
        tsm_model="test_resnet",
        tsm_pretrained=False,
        tsm_img_size=32,
        tsm_epochs=budget.tsm_epochs,
        tsm_batch_size=16,
        tsm_learning_rate=3e-3,
    )
    train = VITaskConfig(
        output_dir=str(out),
        max_steps=budget.steps_per_stage,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        lora_r=16,
        lora_alpha=32,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    evaluation = EvalArguments(eval_split="test", eval_max_samples=budget.eval_samples, eval_batch_size=16)
    return ModelArguments(model_name_or_path="tiny-llava"), data, tsm, train, evaluation


def run_seed(out: Path, budget: QuickstartBudget, seed: int) -> dict:
    """One full pipeline run; returns ``{row: {instruction: metrics}}``."""
    from hf_vitask import pipeline

    model_args, data_args, tsm_args, train_args, eval_args = _configs(out, budget, seed)
    from hf_vitask.evaluation import evaluate_tsm

    tsm, _ = pipeline.run_train_tsm(data_args, tsm_args, str(out), seed=seed)
    test = pipeline.load_data(data_args)[eval_args.eval_split]
    tsm_metrics = evaluate_tsm(tsm, test, max_samples=eval_args.eval_max_samples)
    vanilla_args = train_args.for_stage(1, max_steps=2 * budget.steps_per_stage)  # same budget as both stages
    pipeline.run_train(model_args, data_args, tsm_args, vanilla_args, method="vanilla")
    pipeline.run_train(model_args, data_args, tsm_args, train_args, stages=(1, 2))

    table: dict = {"TSM": {"complete": tsm_metrics, "incomplete": tsm_metrics}}
    for row, sub, use_tsm in (("vanilla", "vanilla", "no"), ("VITask", "stage2", "both")):
        ev = EvalArguments(**{**eval_args.__dict__, "model_path": str(out / sub), "eval_use_tsm": use_tsm})
        results = pipeline.run_evaluate(ev, data_args, str(out / f"eval-{sub}"))
        for key, metrics in results.items():
            if "/" not in key:
                continue
            tsm_part, instruction = key.split("/")
            name = row if row == "vanilla" else f"VITask {'w/' if tsm_part == 'with_tsm' else 'w/o'} EP"
            table.setdefault(name, {})[instruction] = _flatten(metrics)
    return table


def _flatten(metrics: dict) -> dict:
    flat = {}
    for method, values in metrics.items():
        if isinstance(values, dict):
            flat.update({f"{method}_{k}": v for k, v in values.items()})
    return flat


def summarize(per_seed: list[dict]) -> dict:
    """Mean and spread over seeds of every number in the per-seed tables."""
    summary: dict = {}
    for row in ROWS:
        for instruction in ("complete", "incomplete"):
            keys = per_seed[0].get(row, {}).get(instruction, {})
            for metric in keys:
                values = [
                    t[row][instruction][metric]
                    for t in per_seed
                    if isinstance(t[row][instruction][metric], float | int)
                ]
                if values:
                    summary.setdefault(row, {}).setdefault(instruction, {})[metric] = mean_std(values)
    return summary


COLUMNS = (
    ("likelihood_accuracy", "acc"),
    ("likelihood_macro_f1", "macro-F1"),
    ("likelihood_auc", "AUC"),
    ("generate_accuracy", "gen acc"),
    ("generate_parse_failure_rate", "parse fail"),
)


def markdown_table(summary: dict, n_seeds: int) -> str:
    def cell(row, instruction, key):
        value = summary.get(row, {}).get(instruction, {}).get(key)
        if value is None:
            return "–"
        mean, std = value
        return f"{mean:.3f}" + (f" ± {std:.3f}" if n_seeds > 1 else "")

    header = "| model | instruction | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in ROWS:
        for instruction in ("complete", "incomplete"):
            if row == "TSM" and instruction == "incomplete":
                continue
            tsm_key = {
                "likelihood_accuracy": "accuracy",
                "likelihood_macro_f1": "macro_f1",
                "likelihood_auc": "auc",
            }
            cells = [
                cell(row, instruction, tsm_key.get(key, "–") if row == "TSM" else key) for key, _ in COLUMNS
            ]
            lines.append(f"| {row} | {'–' if row == 'TSM' else instruction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, instruction in enumerate(("complete", "incomplete")):
        means, errs = [], []
        for row in ROWS:
            key = "accuracy" if row == "TSM" else "likelihood_accuracy"
            mean, std = (
                summary.get(row, {}).get("complete" if row == "TSM" else instruction, {}).get(key, (0.0, 0.0))
            )
            means.append(mean)
            errs.append(std)
        xs = [x + (i - 0.5) * width for x in range(len(ROWS))]
        ax.bar(xs, means, width, yerr=errs, label=f"{instruction} instruction", capsize=3)
    ax.set_xticks(range(len(ROWS)), ROWS)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1)
    ax.set_title("hf-vitask quickstart: digits, tiny LLaVA (option likelihood)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quickstart(
    output_dir: str = "vitask-quickstart", *, fast: bool = False, seeds: list[int] | tuple = (0,)
) -> dict:
    """Run the comparison for each seed, print the table, write results.json / .md / .png."""
    budget = FAST if fast else FULL
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    per_seed = [run_seed(out / f"seed{seed}", budget, seed) for seed in seeds]
    summary = summarize(per_seed)
    table = markdown_table(summary, len(seeds))
    results = {
        "budget": budget.__dict__,
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": {
            r: {i: {k: {"mean": m, "std": s} for k, (m, s) in v.items()} for i, v in d.items()}
            for r, d in summary.items()
        },
        "runtime_seconds": round(time.time() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# hf-vitask quickstart\n\nDigits, tiny random LLaVA, seeds {list(seeds)}, "
        f"{results['runtime_seconds']} s.\n\n{table}\n"
    )
    plot(summary, out / "results.png")
    print("\n" + table + f"\n\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return results


def run_quickstart_ablation(
    output_dir: str = "vitask-ablation",
    *,
    fast: bool = False,
    seeds=(0,),
    alphas=(),
    betas=(),
    dataset: str = "digits",
) -> dict:
    """:func:`hf_vitask.ablation.run_ablation` with the quickstart's data, model and settings
    (:data:`ABLATION` budget: half the quickstart's steps per stage)."""
    from hf_vitask.ablation import run_ablation

    budget = FAST if fast else ABLATION
    configs = _configs(Path(output_dir), budget, seed=0, dataset=dataset)
    return run_ablation(
        configs,
        output_dir,
        seeds=seeds,
        alphas=alphas,
        betas=betas,
        title=f"hf-vitask ablation: {dataset}, tiny LLaVA",
    )
