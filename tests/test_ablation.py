"""hf-vitask ablate: arms trained with the intended settings, shared runs trained once, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_vitask.ablation import ARMS, COLUMNS, crt_separation
from hf_vitask.cli import main
from hf_vitask.config import DEFAULT_CRT_WEIGHT as B
from hf_vitask.config import DEFAULT_RDA_WEIGHT as A
from hf_vitask.quickstart import FAST
from tests.conftest import sklearn_metrics


def test_crt_separation_by_hand():
    # image 0 (class 0) vs image 1 (class 1): 0's answer 2 nats likelier after 0 than after 1; 1's by 4
    scores = torch.tensor([[-1.0, -5.0], [-3.0, -1.0], [-2.0, -6.0]])
    refs = [0, 1, 0]
    # pairs (i, j) of different classes: (0,1): -1 - -3 = 2, (1,0): -1 - -5 = 4, (1,2): -1 - -6 = 5, (2,1): -2 - -3 = 1
    assert crt_separation(scores, refs) == pytest.approx((2 + 4 + 5 + 1) / 4)
    assert math.isnan(crt_separation(scores[:1], [0]))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert (
        main(
            [
                "quickstart",
                "--ablation",
                "--fast",
                "--output_dir",
                str(out),
                "--seeds",
                "3",
                "--sweep_rda_weights",
                str(A),
                "1",
                "--sweep_crt_weights",
                str(B),
            ]
        )
        == 0
    )
    return out, json.loads((out / "results.json").read_text())


def _training(path: str, stage: int = 2) -> dict:
    return json.loads((Path(path) / "training_config.json").read_text())


def test_every_arm_trains_what_it_names_and_shared_runs_train_once(ablation):
    _, results = ablation
    bundles = results["per_seed"][0]["bundles"]
    assert set(bundles) == {arm.name for arm in ARMS} | {f"alpha={A:g}, beta={B:g}", f"alpha=1, beta={B:g}"}
    vanilla = _training(bundles["vanilla"])
    assert (vanilla["ep_weight"], vanilla["rda_weight"], vanilla["crt_weight"]) == (0.0, 0.0, 0.0)
    assert vanilla["max_steps"] == 2 * results["steps_per_stage"]
    expected = {  # arm: (stage-2 rda_weight, crt_weight, rda_detach, rda_teacher_dropout)
        "RDA": (A, 0.0, True, True),
        "CRT": (0.0, B, True, True),
        "RDA+CRT": (A, B, True, True),
        "RDA+CRT, RDA not detached": (A, B, False, True),
        "RDA+CRT, teacher w/o dropout": (A, B, True, False),
        f"alpha=1, beta={B:g}": (1.0, B, True, True),
    }
    for arm, values in expected.items():
        cfg = _training(bundles[arm])
        assert (
            cfg["rda_weight"],
            cfg["crt_weight"],
            cfg["rda_detach"],
            cfg["rda_teacher_dropout"],
        ) == values, arm
        assert cfg["stage"] == 2 and cfg["max_steps"] == results["steps_per_stage"] and cfg["ep_weight"] > 0
        stage1 = json.loads((Path(bundles[arm]).parent / "stage1" / "training_config.json").read_text())
        assert stage1["rda_weight"] == values[0] and stage1["crt_weight"] == 0.0
    # the full model with the TSM and the sweep's default point reuse the RDA+CRT run
    assert bundles["RDA+CRT, with TSM"] == bundles["RDA+CRT"] == bundles[f"alpha={A:g}, beta={B:g}"]
    # RDA and RDA+CRT share their stage 1
    assert (Path(bundles["RDA"]).parent / "stage1").resolve() == (
        Path(bundles["RDA+CRT"]).parent / "stage1"
    ).resolve()


def test_report_has_every_arm_instruction_and_metric(ablation):
    out, results = ablation
    arms = results["per_seed"][0]["arms"]
    assert list(arms) == ["TSM", *(arm.name for arm in ARMS)]
    for arm in ARMS:
        for instruction in ("complete", "incomplete"):
            metrics = arms[arm.name][instruction]
            assert set(metrics) >= {
                "sum_accuracy",
                "mean_accuracy",
                "sum_macro_f1",
                "sum_auc",
                "gen_accuracy",
                "gen_parse_failure_rate",
                "separation",
            }
            # generation: counts out of the evaluated images; a parse failure is a wrong answer
            correct, failed = (
                metrics[k] * FAST.eval_samples for k in ("gen_accuracy", "gen_parse_failure_rate")
            )
            assert correct == pytest.approx(round(correct)) and failed == pytest.approx(round(failed))
            assert round(correct) + round(failed) <= FAST.eval_samples
    sweep = results["per_seed"][0]["sweep"]
    assert set(sweep) == {f"alpha={A:g}, beta={B:g}", f"alpha=1, beta={B:g}"}
    # the sweep's default point is the RDA+CRT run, evaluated alike (without generation)
    full = arms["RDA+CRT"]["complete"]
    assert sweep[f"alpha={A:g}, beta={B:g}"]["complete"] == {
        k: v for k, v in full.items() if not k.startswith("gen_")
    }
    assert sweep[f"alpha=1, beta={B:g}"]["complete"] != sweep[f"alpha={A:g}, beta={B:g}"]["complete"]
    # one seed: the summary is that seed's numbers, and the table shows them
    table = (out / "results.md").read_text()
    for arm, by_instruction in arms.items():
        for instruction, metrics in by_instruction.items():
            summary = results["summary"][arm][instruction]
            assert summary == {k: {"mean": v, "std": 0.0} for k, v in metrics.items()}, (arm, instruction)
            if arm == "TSM":
                continue
            cells = " | ".join("–" if k not in metrics else f"{metrics[k]:.3f}" for k, _ in COLUMNS)
            assert f"| {arm} | {instruction} | {cells} |" in table, (arm, instruction)
    assert table.count("| RDA+CRT, RDA not detached |") == 2 and f"| alpha=1, beta={B:g} |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ablate_command_passes_the_config_seeds_and_sweep(tmp_path, monkeypatch):
    from hf_vitask import ablation

    seen = {}
    monkeypatch.setattr(
        ablation, "run_ablation", lambda configs, out, **kw: seen.update(configs=configs, out=out, **kw)
    )
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "ablation_textures.yaml"
    assert (
        main(
            [
                "ablate",
                str(config),
                "--seeds",
                "0",
                "1",
                "--sweep_rda_weights",
                "0.1",
                "1",
                "--sweep_crt_weights",
                "0.3",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    model_args, data_args, _, train_args, eval_args = seen["configs"]
    assert (data_args.dataset, model_args.model_name_or_path, train_args.max_steps) == (
        "textures",
        "tiny-llava",
        120,
    )
    assert seen["out"] == str(tmp_path) and seen["seeds"] == [0, 1]
    assert seen["alphas"] == [0.1, 1.0] and seen["betas"] == [0.3]


def test_reported_scores_are_log_likelihoods_whatever_the_default(ablation):
    """Every arm's likelihood metrics, recomputed from its saved bundle: the sum columns and the separation
    come from summed log-probs, the mean columns from per-token ones, with the arm's TSM setting and
    instruction; the TSM row is the saved TSM."""
    from hf_vitask import load_vitask
    from hf_vitask.data.collator import VITaskCollator
    from hf_vitask.evaluation import evaluate_tsm, response_lengths, score_options
    from hf_vitask.models.tsm import TaskSpecificModel
    from hf_vitask.pipeline import load_data
    from hf_vitask.quickstart import _configs

    out, results = ablation
    seed = results["per_seed"][0]
    _, data_args, _, _, eval_args = _configs(Path("unused"), FAST, 0)
    test = load_data(data_args)[eval_args.eval_split].select(range(FAST.eval_samples))
    images, labels = list(test["image"]), test["label"]
    loaded = {}
    for arm in ARMS:
        path = seed["bundles"][arm.name]
        if path not in loaded:
            loaded[path] = load_vitask(path)
        model, processor, task = loaded[path]
        lengths = response_lengths(VITaskCollator(processor, task), task, images[0])
        for instruction in ("complete", "incomplete"):
            summed = score_options(
                model,
                processor,
                task,
                images,
                use_tsm=arm.use_tsm,
                option_score="sum",
                complete_instruction=instruction == "complete",
            )
            reported = seed["arms"][arm.name][instruction]
            expected = sklearn_metrics(summed.argmax(-1).tolist(), labels, summed)
            assert {k: reported[f"sum_{k}"] for k in expected} == pytest.approx(expected, abs=1e-6), arm.name
            mean_acc = float((summed / lengths).argmax(-1).eq(torch.tensor(labels)).float().mean())
            assert reported["mean_accuracy"] == pytest.approx(mean_acc), arm.name
            assert reported["separation"] == pytest.approx(crt_separation(summed, labels), rel=1e-4), arm.name
    tsm = TaskSpecificModel.from_pretrained(out / f"seed{results['seeds'][0]}" / "tsm")
    expected = {f"sum_{k}": v for k, v in evaluate_tsm(tsm, test).items() if k != "num_samples"}
    assert seed["arms"]["TSM"]["complete"] == pytest.approx(expected)
