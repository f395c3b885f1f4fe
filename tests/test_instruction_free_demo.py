"""The instruction-free digits demo (examples/instruction_free_digits.py) and its CLI config stay runnable."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hf_vitask.cli import main as cli_main
from hf_vitask.cli import parse
from hf_vitask.config import InstructionFreeConfig
from hf_vitask.data.digits import DIGIT_QUESTION_WORDINGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "instruction_free_digits.py"
CONFIG = ROOT / "examples" / "configs" / "instruction_free_digits.yaml"


def _load_demo():
    spec = importlib.util.spec_from_file_location("instruction_free_digits_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return _load_demo()


@pytest.fixture(scope="module")
def fast_run(demo, tmp_path_factory):
    """The fast demo; also returns each arm's trainer (the demo keeps only the base on disk)."""
    out = tmp_path_factory.mktemp("instruction-free-demo")
    trainers = []
    train_arm = demo.train_arm

    def keep(*args, **kwargs):
        trainer, processor = train_arm(*args, **kwargs)
        trainers.append(trainer)
        return trainer, processor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "train_arm", keep)
        results = demo.main(["--fast", "--output-dir", str(out)])
    return out, results, dict(zip(demo.ARMS, trainers, strict=True))


def _test_digits(demo):
    """The described test digits the fast demo evaluates, as it draws them."""
    from hf_vitask.data.digits import add_digit_descriptions, load_digits_dataset

    data = add_digit_descriptions(load_digits_dataset(max_samples=demo.FAST.train_samples, seed=0))
    return data["test"].select(range(demo.FAST.eval_samples))


def test_training_wordings_are_disjoint_from_held_out(demo):
    for attr, wordings in demo.TRAIN_WORDINGS.items():
        assert wordings and not set(wordings) & set(DIGIT_QUESTION_WORDINGS[attr])


def test_canonical_options_keep_the_answer(demo):
    from hf_vitask.data.digits import (
        add_digit_descriptions,
        digit_attributes,
        load_digits_dataset,
        make_mc_questions,
    )

    test = add_digit_descriptions(load_digits_dataset(max_samples=40, seed=0))["test"]
    shuffled = make_mc_questions(test, seed=3, num_value_options=10)
    questions = demo.canonical(shuffled)
    for q, s in zip(questions, shuffled):
        assert list(q["options"]) == list(demo.CANONICAL_OPTIONS[q["attribute"]])
        assert q["options"][q["answer"]] == s["options"][s["answer"]]
    truth = digit_attributes(test[0]["label"], test[0]["image"])
    assert {q["attribute"]: q["options"][q["answer"]] for q in questions[:3]} == truth


def test_fast_demo_writes_table_json_and_chart(demo, fast_run):
    out, results, _ = fast_run
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0] and saved["per_seed"] == json.loads(json.dumps(results["per_seed"]))
    table = (out / "results.md").read_text()
    per_attribute = demo.FAST.eval_samples  # one question per test digit and attribute
    for model in demo.MODELS:
        metrics = saved["per_seed"]["0"][model]
        for method in demo.METHODS:
            m = metrics[method]
            assert set(m["by_attribute"]) == {"value", "parity", "stroke"}
            counts = [v * per_attribute for v in m["by_attribute"].values()]
            assert counts == pytest.approx([round(c) for c in counts]), (
                model,
                method,
            )  # counts of 6 questions
            assert m["accuracy"] == pytest.approx(sum(m["by_attribute"].values()) / 3), (model, method)
        assert metrics["likelihood"]["parse_failure_rate"] == 0.0  # likelihood always answers
        # one seed: the summary is that seed's numbers, and the table row shows them
        flat = demo.metric_values(metrics)
        summary = saved["summary"][model]
        assert {k: v["mean"] for k, v in summary.items()} == {
            k: (None if math.isnan(v) else v) for k, v in flat.items()
        }
        cells = " | ".join("–" if math.isnan(flat[k]) else f"{flat[k]:.3f}" for k, _ in demo.COLUMNS)
        assert f"| {model} | {cells} |" in table, model
    assert (
        saved["summary"]["base"]["test_description_ce"]["mean"] is None
    )  # the base has no description prompt
    assert saved["per_seed"]["0"]["momentum proxy + shuffling"]["config"] == {}
    assert saved["per_seed"]["0"]["fixed instruction"]["config"]["use_proxy"] is False
    assert (out / "seed0" / "base" / "config.json").is_file()


def test_fast_demo_reports_what_its_models_do(demo, fast_run):
    """The base's scores, recomputed from the saved base; each arm's likelihood scores and its test
    description cross-entropy (the mean token NLL, by hand, with the arm's own prompt), from its model."""
    import torch

    from hf_vitask.evaluation import mc_evaluate
    from hf_vitask.models.loading import load_vlm

    out, results, trainers = fast_run
    per_seed = results["per_seed"]["0"]
    test = _test_digits(demo)
    held_out = demo.digit_questions(test, 0)
    assert len(held_out) == 3 * demo.FAST.eval_samples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: the same float reductions, the same near-ties
    try:
        vlm, processor = load_vlm(str(out / "seed0" / "base"))
        assert demo.evaluate(vlm, processor, held_out, demo.FAST) == {
            m: per_seed["base"][m] for m in demo.METHODS
        }
        seen = mc_evaluate(
            vlm,
            processor,
            demo.digit_questions(test, 0, demo.TRAIN_WORDINGS),
            batch_size=demo.FAST.eval_batch_size,
        )
        assert per_seed["base"]["training_wordings_likelihood_accuracy"] == seen["accuracy"]
        _check_arms(demo, trainers, per_seed, results["summary"], test, held_out)
    finally:
        torch.set_num_threads(threads)


def _check_arms(demo, trainers, per_seed, summary, test, held_out):
    import torch

    from hf_vitask.evaluation import mc_evaluate
    from hf_vitask.losses import IGNORE_INDEX

    rows = [test[i] for i in range(len(test))]
    for arm, trainer in trainers.items():
        model = trainer.model.eval()
        lik = mc_evaluate(model, trainer.processing_class, held_out, batch_size=demo.FAST.eval_batch_size)
        assert per_seed[arm]["likelihood"] == {
            k: lik[k] for k in ("accuracy", "by_attribute", "parse_failure_rate")
        }
        collator = trainer.data_collator
        collator.training = False  # evaluation: the descriptions as written
        batch = collator(rows)
        slots = batch.pop("proxy_slot_mask", None)
        with torch.no_grad():
            if slots is None:  # the fixed instruction is in the prompt text
                logits = model(**batch).logits
            else:  # the proxy's fed copy goes into its slots
                fed = trainer.proxy.fed().detach()
                with trainer.model.inject(slots, fed.unsqueeze(0).expand(len(rows), -1, -1)):
                    logits = model(**batch).logits
        labels = batch["labels"][:, 1:]
        nll = -logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        by_hand = nll[labels != IGNORE_INDEX].mean().item()
        assert per_seed[arm]["test_description_ce"] == pytest.approx(by_hand, rel=1e-4), arm
        assert summary[arm]["test_description_ce"]["mean"] == per_seed[arm]["test_description_ce"]


def test_config_parses_as_instruction_free():
    (model, data, _, train, evaluation, run), explicit = parse([str(CONFIG)])
    assert run.method == "instruction-free" and isinstance(train, InstructionFreeConfig)
    assert data.dataset == "digits" and model.model_name_or_path == "tiny-llava"
    assert train.use_proxy and train.proxy_momentum == 0.99 and train.shuffle_prob == 1.0
    assert train.shuffle_separator == ", " and evaluation.eval_methods == ["likelihood", "generate"]


def test_cli_trains_and_evaluates_from_the_demo_base(fast_run, tmp_path, capsys):
    base = fast_run[0] / "seed0" / "base"  # the instruction-following base the demo saved
    common = [str(CONFIG), "--method", "instruction-free", "--output_dir", str(tmp_path)]
    assert (
        cli_main(
            [
                "train",
                *common,
                "--model_name_or_path",
                str(base),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--max_samples",
                "40",
            ]
        )
        == 0
    )
    assert (tmp_path / "instruction_free" / "proxy.safetensors").is_file()
    assert (
        cli_main(
            ["evaluate", *common, "--max_samples", "40", "--eval_max_samples", "4", "--eval_batch_size", "4"]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval" / "instruction_free_results.json").read_text())
    assert results["num_questions"] == 12
    for method in ("likelihood", "generate"):  # 4 images x 3 attribute questions
        by_attribute = results[method]["by_attribute"]
        assert set(by_attribute) == {"value", "parity", "stroke"}
        assert results[method]["accuracy"] * 12 == pytest.approx(
            round(results[method]["accuracy"] * 12)
        )  # a count
        assert results[method]["accuracy"] == pytest.approx(
            sum(by_attribute.values()) / 3
        )  # 4 questions each
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "') :]) == results  # the command prints what it writes
