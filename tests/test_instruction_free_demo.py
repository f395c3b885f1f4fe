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
    out = tmp_path_factory.mktemp("instruction-free-demo")
    results = demo.main(["--fast", "--output-dir", str(out)])
    return out, results


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
    out, results = fast_run
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0]
    table = (out / "results.md").read_text()
    for model in demo.MODELS:
        assert f"| {model} |" in table
        summary = saved["summary"][model]
        for method in demo.METHODS:
            for key in ("accuracy", "value", "parity", "stroke", "parse_failure_rate"):
                value = summary[f"{method}_{key}"]["mean"]
                assert value is not None and 0.0 <= value <= 1.0, (model, method, key, value)
        per_seed = saved["per_seed"]["0"][model]
        assert set(per_seed["likelihood"]["by_attribute"]) == {"value", "parity", "stroke"}
        assert per_seed["likelihood"]["parse_failure_rate"] == 0.0  # likelihood always answers
    for arm in demo.ARMS:
        ce = saved["summary"][arm]["test_description_ce"]["mean"]
        assert ce is not None and math.isfinite(ce) and ce > 0
    assert saved["per_seed"]["0"]["momentum proxy + shuffling"]["config"] == {}
    assert saved["per_seed"]["0"]["fixed instruction"]["config"]["use_proxy"] is False
    assert (out / "seed0" / "base" / "config.json").is_file()


def test_config_parses_as_instruction_free():
    (model, data, _, train, evaluation, run), explicit = parse([str(CONFIG)])
    assert run.method == "instruction-free" and isinstance(train, InstructionFreeConfig)
    assert data.dataset == "digits" and model.model_name_or_path == "tiny-llava"
    assert train.use_proxy and train.proxy_momentum == 0.99 and train.shuffle_prob == 1.0
    assert train.shuffle_separator == ", " and evaluation.eval_methods == ["likelihood", "generate"]


def test_cli_trains_and_evaluates_from_the_demo_base(fast_run, tmp_path, capsys):
    base = fast_run[0] / "seed0" / "base"  # the instruction-following base the demo saved
    common = [str(CONFIG), "--method", "instruction-free", "--output_dir", str(tmp_path)]
    assert cli_main(["train", *common, "--model_name_or_path", str(base), "--max_steps", "2",
                     "--per_device_train_batch_size", "4", "--max_samples", "40"]) == 0
    assert (tmp_path / "instruction_free" / "proxy.safetensors").is_file()
    assert cli_main(["evaluate", *common, "--max_samples", "40", "--eval_max_samples", "4",
                     "--eval_batch_size", "4"]) == 0
    results = json.loads((tmp_path / "eval" / "instruction_free_results.json").read_text())
    assert results["num_questions"] == 12
    for method in ("likelihood", "generate"):  # 4 images x 3 attribute questions
        by_attribute = results[method]["by_attribute"]
        assert set(by_attribute) == {"value", "parity", "stroke"}
        assert results[method]["accuracy"] * 12 == pytest.approx(round(results[method]["accuracy"] * 12))  # a count
        assert results[method]["accuracy"] == pytest.approx(sum(by_attribute.values()) / 3)  # 4 questions each
    assert "likelihood" in capsys.readouterr().out
