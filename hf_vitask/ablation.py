"""``hf-vitask ablate``: what each VITask component contributes, with the method's own controls.

On one dataset, one budget and the same seeds, it trains and evaluates:

* **vanilla**: plain instruction tuning for as many steps as VITask's two stages together;
* **RDA**, **CRT**, **RDA+CRT**: VITask's two stages (EP is always trained, so the exemplar path
  exists) with response distribution alignment, contrastive response tuning or both, evaluated
  *without* the TSM, which is what RDA and CRT are for;
* controls: RDA+CRT with the RDA gradient *not* stopped at the teacher (the paper reports no gain
  without the detach), and with the self-teacher run *without* LoRA dropout;
* **RDA+CRT with TSM**: the full model with the exemplar at inference.

Every arm is scored with complete and incomplete instructions, by option likelihood (the answer's
summed log-probability and its per-token mean) and by generation, and reports CRT's separation:
the mean of ``log p(answer | own image) - log p(answer | image of another class)`` on the test
split. Optionally (``sweep``) a grid of RDA weights (alpha) and CRT weights (beta) without the TSM.
Stage-1 runs that several arms share are trained once. Written to the output directory:
``results.json``, ``results.md`` and ``results.png`` (mean ± std over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hf_vitask.config import DataArguments, EvalArguments, ModelArguments, TSMArguments, VITaskConfig
from hf_vitask.metrics import mean_std

__all__ = ["ARMS", "Arm", "crt_separation", "run_ablation"]


@dataclass(frozen=True)
class Arm:
    """One ablation arm: which weights change in each stage, and whether inference uses the TSM."""

    name: str
    stage1: tuple[tuple[str, object], ...] = ()
    stage2: tuple[tuple[str, object], ...] = ()
    use_tsm: bool = False
    vanilla: bool = False

    @property
    def training_key(self) -> tuple:
        return (self.vanilla, self.stage1, self.stage2)


def _both(**changes) -> dict:
    items = tuple(sorted(changes.items()))
    return {"stage1": items, "stage2": items}


ARMS: tuple[Arm, ...] = (
    Arm("vanilla", vanilla=True),
    Arm("RDA", stage2=(("crt_weight", 0.0),)),
    Arm("CRT", **_both(rda_weight=0.0)),
    Arm("RDA+CRT"),
    Arm("RDA+CRT, RDA not detached", **_both(rda_detach=False)),
    Arm("RDA+CRT, teacher w/o dropout", **_both(rda_teacher_dropout=False)),
    Arm("RDA+CRT, with TSM", use_tsm=True),
)
INSTRUCTIONS = ("complete", "incomplete")


def sweep_arms(alphas, betas) -> list[Arm]:
    """RDA weight alpha x CRT weight beta, evaluated without the TSM."""
    return [
        Arm(
            f"alpha={a:g}, beta={b:g}",
            stage1=(("rda_weight", float(a)),),
            stage2=(("crt_weight", float(b)), ("rda_weight", float(a))),
        )
        for a in alphas
        for b in betas
    ]


# -- metrics ---------------------------------------------------------------------------------------
def crt_separation(scores, references) -> float:
    """Mean over test images i and images j of another class of
    ``scores[i, y_i] - scores[j, y_i]``: how much more likely image i's own answer is after image i
    than after an image of another class (``scores``: (N, C) answer log-likelihoods)."""
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float64)
    refs = torch.as_tensor(references)
    own = scores[torch.arange(len(refs)), refs]  # (N,)
    under_other = scores[:, refs].T  # [i, j] = scores[j, y_i]
    other = refs[None, :] != refs[:, None]
    if not other.any():
        return float("nan")
    return float(((own[:, None] - under_other)[other]).mean())


def _likelihood_metrics(scores, references, num_classes: int, prefix: str) -> dict:
    from hf_vitask.metrics import classification_metrics, softmax

    metrics = classification_metrics(
        scores.argmax(-1).tolist(),
        references,
        scores=softmax(scores.double().numpy()),
        num_classes=num_classes,
    )
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def evaluate_arm(
    path: Path, dataset, *, use_tsm: bool, eval_args: EvalArguments, generate: bool = True
) -> dict:
    """``{instruction: metrics}`` of one trained bundle on ``dataset``."""
    from hf_vitask.data.collator import VITaskCollator
    from hf_vitask.evaluation import evaluate_vlm, response_lengths, score_options
    from hf_vitask.hub import load_vitask

    model, processor, task = load_vitask(path)
    n = len(dataset) if eval_args.eval_max_samples is None else min(len(dataset), eval_args.eval_max_samples)
    rows = dataset.select(range(n))
    images, references = list(rows["image"]), [task.check_label(y) for y in rows["label"]]
    out = {}
    for instruction in INSTRUCTIONS:
        complete = instruction == "complete"
        scores = score_options(
            model,
            processor,
            task,
            images,
            use_tsm=use_tsm,
            complete_instruction=complete,
            batch_size=eval_args.eval_batch_size,
            option_score="sum",
        )  # log-likelihoods
        lengths = response_lengths(VITaskCollator(processor, task), task, images[0])
        metrics = {
            **_likelihood_metrics(scores, references, task.num_classes, "sum"),
            **_likelihood_metrics(scores / lengths, references, task.num_classes, "mean"),
            "separation": crt_separation(scores, references),
        }
        if generate:
            gen = evaluate_vlm(
                model,
                processor,
                task,
                rows,
                use_tsm=use_tsm,
                complete_instruction=complete,
                methods=("generate",),
                batch_size=eval_args.eval_batch_size,
            )["generate"]
            metrics.update(
                {"gen_accuracy": gen["accuracy"], "gen_parse_failure_rate": gen["parse_failure_rate"]}
            )
        out[instruction] = metrics
    return out


# -- training --------------------------------------------------------------------------------------
def _slug(items) -> str:
    return "-".join(f"{k}={v}" for k, v in items) or "default"


def _link(src: Path, dst: Path) -> None:
    """``dst`` shows stage 1 of another run (a symlink; a copy where links are not allowed)."""
    if dst.exists() or dst.is_symlink():
        return
    try:
        os.symlink(src.resolve(), dst, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst)


def train_arms(
    arms, root: Path, model_args, data_args, tsm_args, train_args: VITaskConfig
) -> dict[tuple, Path]:
    """Train every distinct arm once (shared stage-1 runs once too); ``{arm.training_key: bundle dir}``."""
    from hf_vitask import pipeline

    steps = train_args.max_steps
    bundles: dict[tuple, Path] = {}
    trained: dict[tuple, Path] = {}  # by the effective settings: arms that train alike share the run
    stage1_dirs: dict[tuple, Path] = {}
    for arm in arms:
        if arm.vanilla:
            args = train_args.for_stage(1, output_dir=str(root), max_steps=2 * steps)  # both stages' budget
            key = ("vanilla",)
            if key not in trained:
                trained[key] = pipeline.run_train(model_args, data_args, tsm_args, args, method="vanilla")
            bundles[arm.training_key] = trained[key]
            continue
        run = root / f"s1-{_slug(arm.stage1)}" / f"s2-{_slug(arm.stage2)}"
        args1 = train_args.for_stage(1, output_dir=str(run), **dict(arm.stage1))
        args2 = train_args.for_stage(2, output_dir=str(run), **dict(arm.stage2))
        key1, key2 = _settings(args1), (_settings(args1), _settings(args2))
        if key2 in trained:
            bundles[arm.training_key] = trained[key2]
            continue
        if key1 not in stage1_dirs:
            pipeline.run_train(model_args, data_args, tsm_args, args1, stages=(1,))
            stage1_dirs[key1] = run / "stage1"
        else:
            run.mkdir(parents=True, exist_ok=True)
            _link(stage1_dirs[key1], run / "stage1")
        trained[key2] = bundles[arm.training_key] = pipeline.run_train(
            model_args, data_args, tsm_args, args2, stages=(2,)
        )
    return bundles


def _settings(args: VITaskConfig) -> tuple:
    """What a training run depends on (everything but where it is written; a stage default and the same
    value set explicitly are one run)."""
    values = args.effective_dict()
    values.pop("output_dir", None)
    values.pop("logging_dir", None)
    return tuple(sorted((k, repr(v)) for k, v in values.items()))


def run_seed(out: Path, seed: int, configs, *, arms=ARMS, sweep=(), generate: bool = True) -> dict:
    """One seed: TSM, every arm (and sweep point) trained and evaluated; ``{arm: {instruction: metrics}}``."""
    from hf_vitask import pipeline
    from hf_vitask.evaluation import evaluate_tsm

    model_args, data_args, tsm_args, train_args, eval_args = configs
    train_args = train_args.for_stage(1, seed=seed)
    tsm_args = dataclasses.replace(tsm_args, tsm_path=str(out / "tsm"))
    tsm, _ = pipeline.run_train_tsm(data_args, tsm_args, str(out), seed=seed, progress=False)
    test = pipeline.load_data(data_args)[eval_args.eval_split]
    tsm_metrics = evaluate_tsm(tsm, test, max_samples=eval_args.eval_max_samples)
    table: dict = {
        "TSM": {
            i: {f"sum_{k}": v for k, v in tsm_metrics.items() if k != "num_samples"} for i in INSTRUCTIONS
        }
    }
    bundles = train_arms([*arms, *sweep], out, model_args, data_args, tsm_args, train_args)
    for arm in arms:
        table[arm.name] = evaluate_arm(
            bundles[arm.training_key], test, use_tsm=arm.use_tsm, eval_args=eval_args, generate=generate
        )
    sweep_table = {
        arm.name: evaluate_arm(
            bundles[arm.training_key], test, use_tsm=False, eval_args=eval_args, generate=False
        )
        for arm in sweep
    }
    where = {arm.name: str(bundles[arm.training_key]) for arm in [*arms, *sweep]}
    return {"arms": table, "sweep": sweep_table, "bundles": where}


# -- report ----------------------------------------------------------------------------------------
def summarize(per_seed: list[dict], part: str) -> dict:
    """``{arm: {instruction: {metric: (mean, std)}}}`` over seeds."""
    summary: dict = {}
    first = per_seed[0][part]
    for arm, by_instruction in first.items():
        for instruction, metrics in by_instruction.items():
            for metric in metrics:
                values = [float(s[part][arm][instruction][metric]) for s in per_seed]
                summary.setdefault(arm, {}).setdefault(instruction, {})[metric] = mean_std(values)
    return summary


COLUMNS = (
    ("sum_accuracy", "acc (sum)"),
    ("mean_accuracy", "acc (mean)"),
    ("sum_macro_f1", "macro-F1 (sum)"),
    ("sum_auc", "AUC (sum)"),
    ("gen_accuracy", "gen acc"),
    ("gen_parse_failure_rate", "parse fail"),
    ("separation", "CRT separation"),
)


def _cell(summary, arm, instruction, key, n_seeds) -> str:
    value = summary.get(arm, {}).get(instruction, {}).get(key)
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.3f}" + (f" ± {std:.3f}" if n_seeds > 1 else "")


def markdown_tables(summary: dict, sweep: dict, n_seeds: int) -> str:
    lines = [
        "| arm | instruction | " + " | ".join(t for _, t in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for arm in summary:
        for instruction in INSTRUCTIONS:
            if arm == "TSM" and instruction == "incomplete":
                continue
            cells = [_cell(summary, arm, instruction, key, n_seeds) for key, _ in COLUMNS]
            lines.append(f"| {arm} | {'–' if arm == 'TSM' else instruction} | " + " | ".join(cells) + " |")
    if sweep:
        lines += [
            "",
            "Sweep (without the TSM, complete instructions):",
            "",
            "| RDA weight, CRT weight | acc (sum) | acc (mean) | macro-F1 (sum) | CRT separation |",
            "|---|---|---|---|---|",
        ]
        for arm in sweep:
            keys = ("sum_accuracy", "mean_accuracy", "sum_macro_f1", "separation")
            lines.append(
                f"| {arm} | " + " | ".join(_cell(sweep, arm, "complete", k, n_seeds) for k in keys) + " |"
            )
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.38
    for i, instruction in enumerate(INSTRUCTIONS):
        values = [
            summary[a].get("complete" if a == "TSM" else instruction, {}).get("sum_accuracy", (0.0, 0.0))
            for a in arms
        ]
        xs = [x + (i - 0.5) * width for x in range(len(arms))]
        ax.bar(
            xs,
            [m for m, _ in values],
            width,
            yerr=[s for _, s in values],
            label=f"{instruction} instruction",
            capsize=3,
        )
    ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (option likelihood, sum)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ablation(
    configs: tuple[ModelArguments, DataArguments, TSMArguments, VITaskConfig, EvalArguments],
    output_dir: str,
    *,
    seeds=(0,),
    alphas=(),
    betas=(),
    generate: bool = True,
    title: str | None = None,
) -> dict:
    """Run :data:`ARMS` (and the alpha x beta sweep when both are given) for every seed, print the
    table and write ``results.json`` / ``results.md`` / ``results.png`` to ``output_dir``.

    ``configs``: the CLI's config dataclasses; ``max_steps`` is the budget of each VITask stage
    (vanilla gets twice as many steps)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    sweep = sweep_arms(alphas, betas) if alphas and betas else []
    per_seed = [
        run_seed(out / f"seed{seed}", seed, configs, sweep=sweep, generate=generate) for seed in seeds
    ]
    summary, sweep_summary = summarize(per_seed, "arms"), (summarize(per_seed, "sweep") if sweep else {})
    table = markdown_tables(summary, sweep_summary, len(seeds))
    model_args, data_args, _, train_args, eval_args = configs
    title = title or f"hf-vitask ablate: {data_args.dataset}, {model_args.model_name_or_path}"
    results = {
        "dataset": data_args.dataset,
        "model": model_args.model_name_or_path,
        "steps_per_stage": train_args.max_steps,
        "learning_rate": train_args.learning_rate,
        "rda_weight": train_args.rda_weight,
        "crt_weight": train_args.for_stage(2).effective_crt_weight,
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": _as_json(summary),
        "sweep": _as_json(sweep_summary),
        "runtime_seconds": round(time.time() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# {title}\n\nSeeds {list(seeds)}, {train_args.max_steps} steps per VITask stage "
        f"(vanilla {2 * train_args.max_steps}), learning rate {train_args.learning_rate}, "
        f"{results['runtime_seconds']} s.\n\n{table}\n"
    )
    plot(summary, out / "results.png", title)
    print("\n" + table + f"\n\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return results


def _as_json(summary: dict) -> dict:
    return {
        a: {i: {k: {"mean": m, "std": s} for k, (m, s) in v.items()} for i, v in d.items()}
        for a, d in summary.items()
    }
