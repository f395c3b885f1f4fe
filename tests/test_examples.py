"""The example scripts and configs stay runnable / valid."""

import subprocess
import sys
from pathlib import Path

import pytest

from hf_vitask.cli import parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "config", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_parse(config):
    # bf16 is validated against the hardware: this machine has no GPU
    (model, data, tsm, train, evaluation, run), explicit = parse([str(config), "--bf16", "false"])
    assert train.output_dir and model.model_name_or_path and "output_dir" in explicit


def test_medmnist_config_asks_for_qlora():
    (model, data, _, train, _, _), _ = parse(
        [str(ROOT / "examples" / "configs" / "medmnist_qlora.yaml"), "--bf16", "false"]
    )
    assert model.load_in_4bit and train.gradient_checkpointing and data.dataset == "npz"


def test_quickstart_script_runs(tmp_path):
    """The script runs, and the accuracies it prints are those of the bundle it saves on its test split."""
    import re

    import torch

    from hf_vitask import load_vitask, predict_classes, tsm_predict
    from hf_vitask.data.digits import load_digits_dataset

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart_digits.py"),
            "--steps",
            "2",
            "--samples",
            "80",
            "--output-dir",
            str(tmp_path / "qs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = dict(re.findall(r"^  (\S.*?)\s+([01]\.\d{3})$", result.stdout, flags=re.M))
    assert list(printed) == ["TSM", "vanilla", "VITask w/o EP", "VITask w/ EP"]
    test = load_digits_dataset(max_samples=80, seed=0)["test"]
    assert f"test {len(test)} images" in result.stdout
    labels = torch.tensor(test["label"])
    for accuracy in printed.values():  # counts out of the test images
        assert float(accuracy) * len(test) == pytest.approx(round(float(accuracy) * len(test)), abs=0.01)
    model, processor, task = load_vitask(tmp_path / "qs" / "vitask")
    again = {"TSM": (tsm_predict(model.tsm, test).argmax(-1) == labels).float().mean().item()}
    for row, use_tsm in (("VITask w/o EP", False), ("VITask w/ EP", True)):
        predictions = torch.tensor(predict_classes(model, processor, task, test["image"], use_tsm=use_tsm))
        again[row] = (predictions == labels).float().mean().item()
    assert {row: printed[row] for row in again} == {row: f"{value:.3f}" for row, value in again.items()}


def test_the_distributed_configs_fit_together():
    import json

    import yaml

    folder = ROOT / "examples" / "configs" / "distributed"
    for stage in (2, 3):
        ds = json.loads((folder / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        # batch sizes, accumulation and clipping come from the training config ("auto"), never twice
        assert {
            ds[k]
            for k in (
                "train_batch_size",
                "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps",
                "gradient_clipping",
            )
        } == {"auto"}
    assert json.loads((folder / "ds_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ], "a ZeRO-3 bundle needs the gathered weights"
    for name in ("accelerate_fsdp.yaml", "accelerate_deepspeed_zero3.yaml"):
        text = (folder / name).read_text()
        config = yaml.safe_load(text)
        assert config["num_processes"] == 8 and "examples/configs/medmnist_multigpu.yaml" in text
        ds_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
        assert ds_file is None or (ROOT / ds_file).is_file()
    assert (
        yaml.safe_load((folder / "accelerate_fsdp.yaml").read_text())["fsdp_config"]["fsdp_state_dict_type"]
        == "FULL_STATE_DICT"
    )  # the bundle is written from the gathered state dict
    (model, _, _, train, _, _), _ = parse(
        [str(ROOT / "examples" / "configs" / "medmnist_multigpu.yaml"), "--bf16", "false"]
    )
    assert (
        not model.load_in_4bit
        and train.per_device_train_batch_size * 8 * train.gradient_accumulation_steps == 32
    )
