"""The hf-vitask command line: parsing, the digits pipeline round trip, predict, quickstart --fast."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_vitask.cli import UsageError, main, parse
from hf_vitask.config import DEFAULT_CRT_WEIGHT

TINY = {
    "dataset": "digits",
    "max_samples": 48,
    "tsm_model": "test_resnet",
    "tsm_pretrained": False,
    "tsm_img_size": 32,
    "tsm_epochs": 2,
    "tsm_batch_size": 16,
    "tsm_learning_rate": 0.003,
    "model_name_or_path": "tiny-llava",
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "learning_rate": 0.002,
    "lora_r": 4,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "eval_split": "test",
    "eval_max_samples": 6,
    "eval_batch_size": 6,
}


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run")}))
    return path


def test_info_and_usage(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    from hf_vitask.models.families import FAMILIES, support_matrix

    rows = support_matrix()
    assert [r["family"] for r in rows] == list(FAMILIES)
    for row in rows:  # one printed line per family, with its fusion modes and 4-bit exclusions
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [row["family"]])
        assert row["pass_fusion"] in line and row["4-bit (kept full precision)"] in line
    assert main([]) == 0  # no command: the command list
    usage = capsys.readouterr().out
    assert "\n  train-tsm " in usage and main(["--help"]) == 0 and capsys.readouterr().out == usage
    from hf_vitask.version import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"hf_vitask {__version__}\n"
    assert main(["no-such-command"]) == 2
    assert capsys.readouterr().err == f"hf-vitask: unknown command 'no-such-command'\n\n{usage}"


def test_yaml_and_flags_fill_the_dataclasses(config):
    (model, data, tsm, train, evaluation, run), explicit = parse(
        [str(config), "--learning_rate", "0.01", "--stage", "2"]
    )
    assert model.model_name_or_path == "tiny-llava" and data.max_samples == 48 and tsm.tsm_epochs == 2
    assert (
        train.learning_rate == 0.01 and train.stage == 2 and train.effective_crt_weight == DEFAULT_CRT_WEIGHT
    )  # flag beats the file
    assert evaluation.eval_max_samples == 6 and run.method == "vitask"
    assert {"stage", "learning_rate", "max_samples"} <= explicit


def test_a_string_for_a_list_field_is_a_one_item_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "eval_methods": "likelihood", "predict_inputs": "scans/"}))
    (_, _, _, _, evaluation, _), _ = parse([str(path)])
    assert evaluation.eval_methods == ["likelihood"] and evaluation.predict_inputs == ["scans/"]


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"learning_rat": 0.1}))
    with pytest.raises(UsageError, match="unknown keys.*learning_rat"):
        parse([str(path)])
    with pytest.raises(UsageError, match="not found"):
        parse([str(tmp_path / "missing.yaml")])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help-all"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in (
        "--rda_weight",
        "--crt_weight",
        "--tsm_model",
        "--dataset_path",
        "--eval_use_tsm",
        "--model_name_or_path",
    ):
        assert name in out


def test_pipeline_round_trip(config, tmp_path, digits):
    run = tmp_path / "run"
    assert main(["train-tsm", str(config)]) == 0
    assert (run / "tsm" / "model.safetensors").is_file()
    assert main(["train", str(config)]) == 0
    assert (run / "stage1" / "adapter_model.safetensors").is_file() and (
        run / "stage2" / "task.json"
    ).is_file()
    for stage, values in ((1, (0.0, False)), (2, (DEFAULT_CRT_WEIGHT, True))):  # what each stage trained with
        recorded = json.loads((run / f"stage{stage}" / "training_config.json").read_text())
        assert (recorded["stage"], recorded["crt_weight"], recorded["freeze_connector"]) == (stage, *values)
    assert (
        main(["train", str(config), "--stage", "2", "--max_steps", "1"]) == 0
    )  # stage 2 alone, from stage1/
    assert main(["train", str(config), "--method", "vanilla"]) == 0
    assert (run / "vanilla" / "adapter_model.safetensors").is_file()

    assert main(["evaluate", str(config)]) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["model_path"].endswith("stage2") and results["num_samples"] == 6
    for key in ("with_tsm/complete", "with_tsm/incomplete", "without_tsm/complete", "without_tsm/incomplete"):
        lik, gen = results[key]["likelihood"], results[key]["generate"]
        assert set(lik) == {"accuracy", "macro_f1", "auc"} and set(gen) == {
            "accuracy",
            "macro_f1",
            "parse_failure_rate",
        }
        for value in (
            lik["accuracy"],
            gen["accuracy"],
            gen["parse_failure_rate"],
        ):  # counts out of the 6 images
            assert value * 6 == pytest.approx(round(value * 6))
    # the TSM row is the saved TSM on the same six test images
    from hf_vitask.config import DataArguments
    from hf_vitask.evaluation import evaluate_tsm
    from hf_vitask.models.tsm import TaskSpecificModel
    from hf_vitask.pipeline import load_data

    test = load_data(DataArguments(max_samples=48))["test"]
    expected = evaluate_tsm(TaskSpecificModel.from_pretrained(run / "tsm"), test, max_samples=6)
    assert results["tsm"] == pytest.approx(expected)
    # the likelihood rows are the saved stage-2 bundle's option scores on those images (scikit-learn metrics)
    from hf_vitask import load_vitask
    from hf_vitask.evaluation import score_options
    from tests.conftest import sklearn_metrics

    model, processor, task = load_vitask(run / "stage2")
    for use_tsm in (False, True):
        scores = score_options(
            model, processor, task, test["image"][:6], use_tsm=use_tsm
        )  # option_score "mean"
        expected = sklearn_metrics(scores.argmax(-1).tolist(), test["label"][:6], scores)
        reported = results[f"{'with' if use_tsm else 'without'}_tsm/complete"]["likelihood"]
        assert reported == pytest.approx(expected, abs=1e-6), use_tsm

    # plug-in TSM: evaluation with a TSM other than the one trained with
    assert (
        main(
            [
                "evaluate",
                str(config),
                "--plugin_tsm",
                str(run / "tsm"),
                "--eval_use_tsm",
                "yes",
                "--eval_instructions",
                "complete",
                "--eval_methods",
                "likelihood",
            ]
        )
        == 0
    )
    plugged = json.loads((run / "eval" / "results.json").read_text())
    assert set(plugged) >= {"with_tsm/complete", "tsm"} and "without_tsm/complete" not in plugged
    assert results["option_score"] == "mean"  # the default
    assert (
        main(
            [
                "evaluate",
                str(config),
                "--eval_use_tsm",
                "no",
                "--eval_instructions",
                "complete",
                "--eval_methods",
                "likelihood",
                "--option_score",
                "sum",
            ]
        )
        == 0
    )
    summed = json.loads((run / "eval" / "results.json").read_text())
    assert summed["option_score"] == "sum" and set(summed["without_tsm/complete"]["likelihood"]) == {
        "accuracy",
        "macro_f1",
        "auc",
    }
    assert (
        summed["without_tsm/complete"]["likelihood"]["auc"]
        != results["without_tsm/complete"]["likelihood"]["auc"]
    )

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        digits["test"][i]["image"].save(images / f"digit{i}.png")
    csv_path = tmp_path / "preds.csv"
    assert (
        main(["predict", str(config), "--predict_inputs", str(images), "--predictions_file", str(csv_path)])
        == 0
    )
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["path", "prediction", *task.class_names, "error"] and len(rows) == 4
    # each row: the softmax of the bundle's option scores for that file, and the most probable class
    from hf_vitask.data.collator import load_image

    files = [images / f"digit{i}.png" for i in range(3)]
    probs = score_options(model, processor, task, [load_image(str(f), "") for f in files]).softmax(-1)
    assert [r[0] for r in rows[1:]] == [str(f) for f in files] and all(r[-1] == "" for r in rows[1:])
    for r, p in zip(rows[1:], probs):
        assert [float(x) for x in r[2:12]] == pytest.approx(p.tolist(), abs=2e-6)
        assert r[1] == task.class_names[int(p.argmax())]
    good = csv_path.read_text()

    # an unreadable input is listed (CSV + log) and the others are still predicted
    (images / "broken.png").write_bytes(b"not a png")
    assert (
        main(["predict", str(config), "--predict_inputs", str(images), "--predictions_file", str(csv_path)])
        == 0
    )
    rows = list(csv.reader(csv_path.open()))
    assert [Path(r[0]).name for r in rows[1:]] == ["broken.png", "digit0.png", "digit1.png", "digit2.png"]
    assert rows[1][1] == "" and "Cannot read image" in rows[1][-1] and all(r[1] for r in rows[2:])
    # a failure while predicting leaves the earlier predictions file as it was
    csv_path.write_text(good)
    assert (
        main(
            [
                "predict",
                str(config),
                "--predict_inputs",
                str(images),
                "--predictions_file",
                str(csv_path),
                "--model_path",
                str(tmp_path / "no-such-bundle"),
            ]
        )
        == 1
    )
    assert csv_path.read_text() == good and not list(csv_path.parent.glob(".preds.csv.*"))
    assert (
        main(
            [
                "predict",
                str(config),
                "--predict_inputs",
                str(images / "digit0.png"),
                "--use_tsm",
                "true",
                "--predict_method",
                "generate",
                "--predictions_file",
                str(csv_path),
            ]
        )
        == 0
    )
    assert list(csv.reader(csv_path.open()))[0] == ["path", "prediction", "answer", "error"]


def test_train_without_tsm_says_what_to_do(config, capsys):
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-vitask: error: FileNotFoundError:") and "train-tsm" in err and "\n" not in err
    with pytest.raises(FileNotFoundError, match="train-tsm"):  # --debug: the traceback instead
        main(["train", str(config), "--debug"])


def test_cli_errors_are_one_line_with_usage_exit_code_2(tmp_path, config, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"learning_rat": 0.1}))
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith("hf-vitask: error: unknown keys")
    assert main(["evaluate", str(config), "--eval_use_tsm", "sometimes"]) == 2  # a flag: argparse's choices
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-vitask: error: argument --eval_use_tsm") and len(err.splitlines()) == 1
    assert "invalid choice" in err and all(choice in err for choice in ("yes", "no", "both"))
    assert (
        main(["evaluate", str(config), "--learning_rate", "fast"]) == 2
    )  # argparse's own errors: one line too
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-vitask: error: argument --learning_rate") and len(err.splitlines()) == 1
    config.write_text(config.read_text() + "eval_use_tsm: sometimes\n")  # a file: the config's own check
    assert main(["evaluate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hf-vitask: error: eval_use_tsm must be one of ['yes', 'no', 'both'], got 'sometimes'"


def test_quickstart_fast(tmp_path):
    """The reported numbers are what the saved models do on the reported samples, and the table shows them."""
    from hf_vitask import load_vitask, pipeline
    from hf_vitask.evaluation import evaluate_vlm
    from hf_vitask.quickstart import FAST, _configs

    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    summary, (seed0,) = results["summary"], results["per_seed"]
    assert set(summary) == {"TSM", "vanilla", "VITask w/o EP", "VITask w/ EP"}
    assert summary["TSM"]["complete"]["num_samples"]["mean"] == FAST.eval_samples
    for row, by_instruction in seed0.items():  # one seed: the summary is that seed's numbers, std 0
        for instruction, metrics in by_instruction.items():
            assert {k: v["mean"] for k, v in summary[row][instruction].items()} == pytest.approx(metrics)
            assert all(v["std"] == 0 for v in summary[row][instruction].values())
    model, processor, task = load_vitask(out / "seed0" / "stage2")
    _, data_args, *_ = _configs(out, FAST, seed=0)
    test = pipeline.load_data(data_args)["test"]
    for row, use_tsm in (("VITask w/o EP", False), ("VITask w/ EP", True)):
        again = evaluate_vlm(
            model,
            processor,
            task,
            test,
            use_tsm=use_tsm,
            methods=("likelihood",),
            max_samples=FAST.eval_samples,
            batch_size=16,
        )
        assert again["num_samples"] == FAST.eval_samples
        for metric in ("accuracy", "macro_f1", "auc"):
            assert seed0[row]["complete"][f"likelihood_{metric}"] == pytest.approx(
                again["likelihood"][metric], abs=1e-6
            )
    table = (out / "results.md").read_text()
    ep = seed0["VITask w/ EP"]["complete"]
    assert (
        f"| VITask w/ EP | complete | {ep['likelihood_accuracy']:.3f} | {ep['likelihood_macro_f1']:.3f} | "
        f"{ep['likelihood_auc']:.3f} |"
    ) in table
    assert (out / "results.png").stat().st_size > 1000


def test_the_quickstart_prints_no_third_party_warning(tmp_path):
    """bitsandbytes' kernel notice, peft's Hub lookups for a tiny base, deprecated calls: none at default verbosity."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "hf_vitask.cli", "quickstart", "--fast", "--output_dir", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [
        line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line
    ]
    assert not [line for line in lines if "warn" in line.lower() or "Failed" in line], lines[:10]


def test_console_script_module_entry(capsys):
    """``python -m hf_vitask.cli`` is the same command line as ``main``: the same command list, exit code 0."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_vitask.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert main(["--help"]) == 0
    assert result.returncode == 0 and result.stdout == capsys.readouterr().out
    assert all(
        f"\n  {c} " in result.stdout for c in ("train-tsm", "train", "evaluate", "predict", "quickstart")
    )


@pytest.mark.parametrize("code", [0, 1])
def test_the_executable_leaves_the_process_group_after_a_command_that_succeeded(code, monkeypatch):
    """``hf-vitask`` (``cli.run``) exits with the command's status; after a success it leaves the
    process group of a launch (all processes together), after a failure it does not wait for peers
    that may never come."""
    import hf_vitask.cli as cli
    import hf_vitask.distributed as distributed

    left = []
    monkeypatch.setattr(cli, "main", lambda: code)
    monkeypatch.setattr(distributed, "end_process_group", lambda: left.append(True))
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == code and left == ([True] if code == 0 else [])


# -- per-command help --------------------------------------------------------------------------------
HELP_VARIANTS = (
    "train-tsm",
    "train",
    "train --method instruction-free",
    "evaluate",
    "evaluate --method instruction-free",
    "predict",
    "push",
    "quickstart",
    "ablate",
)


def _help_of(capsys, argv):
    """What ``main(argv)`` prints, asserting that it exits 0 as argparse's --help does."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _fields_shown(text):
    """``--field`` names at the start of the short help's field lines, in order."""
    return [line.split()[0][2:] for line in text.splitlines() if line.startswith("  --")]


def test_short_help_shows_each_commands_own_fields_in_at_most_120_lines(capsys):
    from hf_vitask.cli import HELP_FIELDS

    helps = {variant: _help_of(capsys, [*variant.split(), "--help"]) for variant in HELP_VARIANTS}
    for variant, text in helps.items():
        lines = text.splitlines()
        assert len(lines) <= 120 and "--help-all" in lines[-1], variant
        assert _fields_shown(text) == [f for names in HELP_FIELDS[variant].values() for f in names], variant
        assert all("(default: " in line for line in lines if line.startswith("  --")), variant
        assert all(f"\n{title}:\n" in text for title in HELP_FIELDS[variant]), variant
    shown = {variant: set(_fields_shown(text)) for variant, text in helps.items()}
    assert {"stage", "rda_weight", "learning_rate", "lora_r", "model_name_or_path", "method"} <= shown[
        "train"
    ]
    assert {"tsm_model", "tsm_epochs", "dataset", "output_dir", "seed"} <= shown["train-tsm"]
    assert "rda_weight" not in shown["train-tsm"] and "learning_rate" not in shown["train-tsm"]
    assert {"predict_inputs", "predictions_file", "model_path", "use_tsm", "predict_method"} <= shown[
        "predict"
    ]
    assert "tsm_epochs" not in shown["predict"]
    assert {"use_proxy", "proxy_momentum"} <= shown["train --method instruction-free"]
    assert "rda_weight" not in shown["train --method instruction-free"] and "use_proxy" not in shown["train"]
    assert {"hub_model_id", "hub_private_repo"} <= shown["push"] and {"fast", "seeds"} <= shown["quickstart"]
    assert {"seeds", "sweep_rda_weights", "rda_weight", "max_steps"} <= shown["ablate"]
    # pairwise different, in the fields they list and not only in their usage line
    assert len(set(map(frozenset, shown.values()))) == len(shown)
    assert len(set(helps.values())) == len(helps)
    assert _help_of(capsys, ["predict", "-h"]) == helps["predict"]


def test_short_help_defaults_come_from_the_config_file(config, capsys):
    text = _help_of(capsys, ["train", str(config), "--help"])
    line = next(ln for ln in text.splitlines() if ln.startswith("  --learning_rate "))
    assert "(default: 0.002)" in line  # TINY's value, not TrainingArguments' 5e-05


def test_help_all_lists_every_field(capsys):
    for command in ("train", "predict"):
        text = _help_of(capsys, [command, "--help-all"])
        for name in ("--adam_beta2", "--rda_weight", "--tsm_epochs", "--predict_inputs", "--eval_use_tsm"):
            assert name in text, (command, name)
        assert len(text.splitlines()) > 500
    assert "--use_proxy" in _help_of(capsys, ["train", "--method", "instruction-free", "--help-all"])
    assert main(["--help"]) == 0  # no command: the command list, as before
    usage = capsys.readouterr().out
    assert all(f"\n  {c} " in usage for c in ("train-tsm", "quickstart", "ablate"))
    assert main(["info", "--help"]) == 0 and "usage: hf-vitask info" in capsys.readouterr().out


def test_every_field_in_a_short_help_is_accepted_by_its_command(capsys):
    """Showing a field the parser then rejects would be worse than not showing it."""
    tried = set()
    for variant in HELP_VARIANTS:
        text = _help_of(capsys, [*variant.split(), "--help"])
        method = variant.split()[2:]  # ["--method", M] or []
        for line in text.splitlines():
            if not line.startswith("  --"):
                continue
            flag, kind = line.split()[:2]
            value = {"BOOL": "false", "INT": "1", "FLOAT": "0.5"}.get(kind, "x")
            if kind.startswith("{"):
                value = kind[1:].split(",")[0]
            if (tuple(method), flag) in tried:
                continue
            tried.add((tuple(method), flag))
            argv = [*method, flag, value] if flag != "--method" else [flag, value]
            try:
                parse(argv, variant.split()[0])
            except Exception as err:  # noqa: BLE001 - a value the field's own check refuses is fine here
                assert "not used by the HfArgumentParser" not in str(err), (variant, flag, err)
                assert "unknown keys" not in str(err), (variant, flag, err)


def test_a_trainer_column_name_in_a_cli_run_points_to_the_data_file_fields(config, capsys):
    assert main(["train", str(config), "--image_column", "path"]) == 2
    err = capsys.readouterr().err
    assert "image_column name the columns the trainer reads" in err and "dataset_image_column" in err
