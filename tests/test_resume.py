"""A CLI run killed mid-stage and resumed ends exactly where an uninterrupted run ends; checkpoints
are sealed, a damaged newest one is skipped, and the frozen TSM is not copied into every one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_vitask.cli import main
from hf_vitask.trainers.checkpoints import MANIFEST_FILE, checkpoint_problem, last_complete_checkpoint

from .test_cli import TINY


class Killed(RuntimeError):
    pass


def _config(root: Path, **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    values = {
        **TINY,
        "output_dir": str(root / "run"),
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "lora_dropout": 0.1,
        **changes,
    }
    path.write_text(yaml.safe_dump(values))
    return path


def _kill_at(monkeypatch, trainer_class, step: int, stage: int | None = None):
    """Make training raise once ``step`` optimizer steps are done (in ``stage``), like a kill."""
    original = trainer_class.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step and (stage is None or getattr(self.args, "stage", None) == stage):
            raise Killed(f"killed at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", training_step)


def _weights(bundle: Path) -> dict:
    return load_file(str(bundle / "adapter_model.safetensors"))


def _losses(checkpoint: Path) -> list:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _assert_same_run(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _losses(a / "checkpoint-6") == _losses(b / "checkpoint-6")


def test_vitask_run_resumes_in_stage_2_past_a_damaged_checkpoint(tmp_path, monkeypatch, caplog):
    from hf_vitask.trainers.vitask import VITaskTrainer

    straight = _config(tmp_path / "straight")
    assert main(["train-tsm", str(straight)]) == 0 and main(["train", str(straight)]) == 0

    broken = _config(tmp_path / "broken")
    shutil.copytree(
        tmp_path / "straight" / "run" / "tsm", tmp_path / "broken" / "run" / "tsm"
    )  # one TSM for both
    with monkeypatch.context() as patch:
        _kill_at(patch, VITaskTrainer, 5, stage=2)
        with pytest.raises(Killed):
            main(["train", str(broken), "--debug"])
    run = tmp_path / "broken" / "run"
    assert (run / "stage1" / "vitask_config.json").is_file() and not (
        run / "stage2" / "vitask_config.json"
    ).exists()
    assert last_complete_checkpoint(run / "stage2").name == "checkpoint-4"
    assert not (run / "stage2" / "checkpoint-4" / "tsm").exists()  # the frozen TSM is in the bundle only
    # damage the newest checkpoint: resume must fall back to checkpoint-2, with a warning
    optimizer = run / "stage2" / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert "optimizer.pt has 100 bytes" in checkpoint_problem(optimizer.parent)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(broken), "--resume_from_checkpoint", "true"]) == 0
    assert any(
        "Skipping checkpoint" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records
    )
    _assert_same_run(tmp_path / "straight" / "run" / "stage2", run / "stage2")
    assert (run / "stage2" / "tsm").is_dir() and (run / "stage2" / "checkpoint-6" / MANIFEST_FILE).is_file()


def test_instruction_free_run_resumes(tmp_path, monkeypatch):
    from hf_vitask.trainers.instruction_free import InstructionFreeTrainer

    straight = _config(tmp_path / "straight")
    assert main(["train", str(straight), "--method", "instruction-free"]) == 0
    broken = _config(tmp_path / "broken")
    with monkeypatch.context() as patch:
        _kill_at(patch, InstructionFreeTrainer, 3)
        with pytest.raises(Killed):
            main(["train", str(broken), "--method", "instruction-free", "--debug"])
    assert (
        main(["train", str(broken), "--method", "instruction-free", "--resume_from_checkpoint", "true"]) == 0
    )
    _assert_same_run(
        tmp_path / "straight" / "run" / "instruction_free", tmp_path / "broken" / "run" / "instruction_free"
    )
