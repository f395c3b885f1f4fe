"""hf-vitask ablate: arms trained with the intended settings, shared runs trained once, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_vitask.ablation import ARMS, crt_separation
from hf_vitask.cli import main
from hf_vitask.config import DEFAULT_CRT_WEIGHT as B
from hf_vitask.config import DEFAULT_RDA_WEIGHT as A


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
    assert main(["quickstart", "--ablation", "--fast", "--output_dir", str(out), "--seeds", "3",
                 "--sweep_rda_weights", str(A), "1", "--sweep_crt_weights", str(B)]) == 0
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
        assert (cfg["rda_weight"], cfg["crt_weight"], cfg["rda_detach"], cfg["rda_teacher_dropout"]) == values, arm
        assert cfg["stage"] == 2 and cfg["max_steps"] == results["steps_per_stage"] and cfg["ep_weight"] > 0
        stage1 = json.loads((Path(bundles[arm]).parent / "stage1" / "training_config.json").read_text())
        assert stage1["rda_weight"] == values[0] and stage1["crt_weight"] == 0.0
    # the full model with the TSM and the sweep's default point reuse the RDA+CRT run
    assert bundles["RDA+CRT, with TSM"] == bundles["RDA+CRT"] == bundles[f"alpha={A:g}, beta={B:g}"]
    # RDA and RDA+CRT share their stage 1
    assert (Path(bundles["RDA"]).parent / "stage1").resolve() == (Path(bundles["RDA+CRT"]).parent / "stage1").resolve()


def test_report_has_every_arm_instruction_and_metric(ablation):
    out, results = ablation
    arms = results["per_seed"][0]["arms"]
    assert list(arms) == ["TSM", *(arm.name for arm in ARMS)]
    for arm in ARMS:
        for instruction in ("complete", "incomplete"):
            metrics = arms[arm.name][instruction]
            assert set(metrics) >= {"sum_accuracy", "mean_accuracy", "sum_macro_f1", "sum_auc", "gen_accuracy",
                                    "gen_parse_failure_rate", "separation"}
            assert all(0 <= metrics[k] <= 1 for k in ("sum_accuracy", "mean_accuracy", "gen_accuracy"))
            assert math.isfinite(metrics["separation"])
    assert set(results["per_seed"][0]["sweep"]) == {f"alpha={A:g}, beta={B:g}", f"alpha=1, beta={B:g}"}
    summary = results["summary"]["RDA"]["complete"]["sum_accuracy"]
    assert summary == {"mean": arms["RDA"]["complete"]["sum_accuracy"], "std": 0.0}
    table = (out / "results.md").read_text()
    assert table.count("| RDA+CRT, RDA not detached |") == 2 and f"| alpha=1, beta={B:g} |" in table
    assert "CRT separation" in table and (out / "results.png").stat().st_size > 0


def test_the_ablate_command_passes_the_config_seeds_and_sweep(tmp_path, monkeypatch):
    from hf_vitask import ablation

    seen = {}
    monkeypatch.setattr(ablation, "run_ablation", lambda configs, out, **kw: seen.update(configs=configs, out=out, **kw))
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "ablation_textures.yaml"
    assert main(["ablate", str(config), "--seeds", "0", "1", "--sweep_rda_weights", "0.1", "1",
                 "--sweep_crt_weights", "0.3", "--output_dir", str(tmp_path)]) == 0
    model_args, data_args, _, train_args, eval_args = seen["configs"]
    assert (data_args.dataset, model_args.model_name_or_path, train_args.max_steps) == ("textures", "tiny-llava", 120)
    assert seen["out"] == str(tmp_path) and seen["seeds"] == [0, 1]
    assert seen["alphas"] == [0.1, 1.0] and seen["betas"] == [0.3]


def test_reported_scores_are_log_likelihoods_whatever_the_default(ablation):
    """The sum columns and the separation come from summed log-probs, the mean columns from per-token ones."""
    from hf_vitask import load_vitask
    from hf_vitask.data.collator import VITaskCollator
    from hf_vitask.evaluation import response_lengths, score_options
    from hf_vitask.pipeline import load_data
    from hf_vitask.quickstart import FAST, _configs

    _, results = ablation
    model, processor, task = load_vitask(results["per_seed"][0]["bundles"]["vanilla"])
    _, data_args, _, _, eval_args = _configs(Path("unused"), FAST, 0)
    test = load_data(data_args)["test"].select(range(FAST.eval_samples))
    summed = score_options(model, processor, task, list(test["image"]), option_score="sum")
    reported = results["per_seed"][0]["arms"]["vanilla"]["complete"]
    assert reported["separation"] == pytest.approx(crt_separation(summed, test["label"]), rel=1e-4)
    lengths = response_lengths(VITaskCollator(processor, task), task, test[0]["image"])
    mean_acc = float((summed / lengths).argmax(-1).eq(torch.tensor(test["label"])).float().mean())
    assert reported["mean_accuracy"] == pytest.approx(mean_acc)
