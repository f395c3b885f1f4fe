"""The example scripts and configs stay runnable / valid."""

import subprocess
import sys
from pathlib import Path

import pytest

from hf_vitask.cli import parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(config):
    # bf16 is validated against the hardware: this machine has no GPU
    (model, data, tsm, train, evaluation, run), explicit = parse([str(config), "--bf16", "false"])
    assert train.output_dir and model.model_name_or_path and "output_dir" in explicit


def test_medmnist_config_asks_for_qlora():
    (model, data, _, train, _, _), _ = parse([str(ROOT / "examples" / "configs" / "medmnist_qlora.yaml"), "--bf16", "false"])
    assert model.load_in_4bit and train.gradient_checkpointing and data.dataset == "npz"


def test_quickstart_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart_digits.py"), "--steps", "2", "--samples", "80",
         "--output-dir", str(tmp_path / "qs")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("TSM", "vanilla", "VITask w/o EP", "VITask w/ EP"):
        assert row in result.stdout
    assert (tmp_path / "qs" / "vitask" / "adapter_model.safetensors").is_file()
