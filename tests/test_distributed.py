"""Two CPU processes (torchrun, DDP over gloo) train exactly like one process with the same global batch.

Each job runs ``tests/distributed_worker.py`` once in a single process and once under
``torchrun --nproc_per_node 2``: the trained weights agree to float rounding, every logged line
agrees and its terms add up to ``loss``, the fused passes stay on, only the main process writes
files, and the frozen-teacher cache computes each sample once for the whole job.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")
# Adam over 8 steps amplifies float-summation order differences (all-reduce vs one batch) to ~1e-6.
WEIGHT_ATOL = 2e-5
WEIGHTS = {
    "stage1": {"loss_van": 1.0, "loss_ep": 1.0, "loss_rda": 0.3},
    "stage2": {"loss_van": 1.0, "loss_ep": 1.0, "loss_rda": 0.3, "loss_crt": 0.1},
    "instruction_free": {"loss_ce": 1.0},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, processes: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
        ]
    )
    done = subprocess.run(
        [*launcher, str(WORKER), str(out), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = torch.load(out / "result.pt")
    result["written"] = {r: json.loads((out / f"written-rank{r}.json").read_text()) for r in range(processes)}
    return result


@pytest.fixture(scope="module", params=["stage1", "stage2", "instruction_free"])
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    args = ("--job", request.param, "--max_steps", "8")
    return request.param, _run(root / "one", 1, *args), _run(root / "two", 2, *args)


def test_two_processes_train_the_same_weights(runs):
    _, one, two = runs
    assert (one["world_size"], two["world_size"]) == (1, 2), "torchrun on a CPU machine must be real DDP"
    assert one["weights"].keys() == two["weights"].keys()
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, atol=WEIGHT_ATOL, rtol=0, msg=name)


def test_every_log_line_agrees_and_its_terms_add_up_to_the_loss(runs):
    job, one, two = runs
    lines = [[e for e in run["log"] if "loss" in e] for run in (one, two)]
    assert len(lines[0]) == len(lines[1]) == 8
    for a, b in zip(*lines):
        assert a.keys() == b.keys()
        assert {k: b[k] for k in a} == pytest.approx(a, rel=1e-4, abs=1e-6)
        assert sum(w * b[k] for k, w in WEIGHTS[job].items()) == pytest.approx(b["loss"], rel=1e-5)


def test_the_fused_passes_stay_on_under_ddp(runs):
    job, one, two = runs
    if job != "instruction_free":
        assert one["pass_modes"] == two["pass_modes"] == ["prefix"]


def test_only_the_main_process_writes(runs):
    job, one, two = runs
    assert two["written"][1] == [], "the second process wrote files"

    def files(written):  # a bundle is staged in a folder with a random suffix
        return {re.sub(r"\.saving-\w+", ".saving-*", p) for p in written}

    assert two["written"][0] and files(two["written"][0]) == files(one["written"][0])


def test_the_frozen_teacher_runs_once_per_sample_for_the_whole_job(runs):
    job, one, two = runs
    if job == "stage2":  # 16 samples, 2 epochs: each sample once, whichever process it lands on
        assert sum(one["teacher_passes"]) == sum(two["teacher_passes"]) == 16
        assert all(two["teacher_passes"])


def test_two_processes_resume_where_they_stopped(tmp_path):
    out = tmp_path / "run"
    args = ("--job", "stage1", "--max_steps", "4", "--save_steps", "2")
    whole = _run(out, 2, *args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    import shutil

    shutil.rmtree(out / "checkpoint-4")  # as if the job had been killed after step 3
    (out / "result.pt").unlink()
    resumed = _run(out, 2, *args, "--resume")
    for name, weight in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, atol=1e-6, rtol=0, msg=name)
    steps = [e["step"] for e in resumed["log"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # the log history of steps 1-2 comes back from the checkpoint
    # besides its own RNG state (transformers: checkpoint-N/rng_state_1.pth), the second process writes nothing
    assert set(whole["written"][1]) == {"checkpoint-2", "checkpoint-4"} and set(resumed["written"][1]) == {
        "checkpoint-4"
    }
    assert (out / "checkpoint-4" / "rng_state_1.pth").is_file()
    assert (
        "rng_state_1.pth"
        in json.loads((out / "checkpoint-4" / "hf_vitask_checkpoint.json").read_text())["files"]
    )


def test_the_command_line_pipeline_under_two_processes(tmp_path):
    """train-tsm, train, evaluate and predict under torchrun: the single-process numbers and files (given
    one TSM), written by the main process alone."""
    import csv
    import shutil

    import yaml

    from .test_cli import TINY

    images = tmp_path / "images"
    images.mkdir()
    from hf_vitask.data.digits import load_digits_dataset

    for i, row in enumerate(load_digits_dataset(max_samples=48)["test"].select(range(5))):
        row["image"].save(images / f"digit{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        out.mkdir()
        config = out / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    **TINY,
                    "output_dir": str(out),
                    "eval_max_samples": 7,
                    "eval_batch_size": 2,
                    "per_device_train_batch_size": 8 // processes,
                }
            )
        )
        later = [
            "train", str(config), "--stage", "1", "+", "evaluate", str(config), "+",
            "predict", str(config), "--predict_inputs", str(images), "--predictions_file", str(out / "preds.csv"),
        ]  # fmt: skip
        if processes == 1:  # one launch runs every command
            _run_cli(out, processes, "train-tsm", str(config), "+", *later)
        else:  # the TSM trains with DDP (other BatchNorm statistics): compare the rest on one TSM
            _run_cli(out, processes, "train-tsm", str(config))
            history = json.loads((out / "tsm" / "history.json").read_text())
            assert len(history["train_loss"]) == len(history["eval_accuracy"]) == TINY["tsm_epochs"]
            shutil.rmtree(out / "tsm")
            shutil.copytree(outputs[1] / "tsm", out / "tsm")
            _run_cli(out, processes, *later)
        outputs[processes] = out
    one, two = outputs[1], outputs[2]
    results = [json.loads((run / "eval" / "results.json").read_text()) for run in (one, two)]
    assert results[1]["num_samples"] == results[0]["num_samples"] == 7
    for key in ("tsm", "with_tsm/complete", "without_tsm/incomplete"):
        flat = [
            {
                f"{k}.{m}": v
                for k, d in r[key].items()
                for m, v in (d.items() if isinstance(d, dict) else [("", d)])
            }
            for r in results
        ]
        assert flat[1] == pytest.approx(flat[0], abs=1e-6), key
    preds = [list(csv.reader((run / "preds.csv").open())) for run in (one, two)]
    assert [r[:2] + r[-1:] for r in preds[1]] == [r[:2] + r[-1:] for r in preds[0]] and len(preds[0]) == 7
    for command in ("train-tsm", "train", "evaluate", "predict"):
        assert json.loads((two / f"written-{command}-rank1.json").read_text()) == [], command


def _run_cli(out: Path, processes: int, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
        ]
    )
    done = subprocess.run(
        [*launcher, str(WORKER), str(out), "cli", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
