"""Bundles are published whole or not at all, never mixed with an earlier run; one live run per directory."""

from __future__ import annotations

import pytest

from hf_vitask import VITaskModel
from hf_vitask.trainers.bundles import BUNDLE_LIST_FILE, OutputDirLock

from .test_trainer import _trainer


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_new_bundle_leaves_nothing_of_the_old_one(tmp_path, digits, task, tsm):
    out = tmp_path / "bundle"
    lora = _trainer(tmp_path / "a", digits, task, tsm, max_steps=1)
    lora.train()
    lora.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / BUNDLE_LIST_FILE).is_file()
    full = _trainer(tmp_path / "b", digits, task, tsm, max_steps=1, use_lora=False)
    full.train()
    full.save_model(str(out))
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    model = VITaskModel.from_pretrained(out)
    assert not model.is_peft
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.saving-")]


def test_a_failed_save_keeps_the_previous_bundle_and_a_failed_publish_leaves_none(
    tmp_path, digits, task, tsm, monkeypatch
):
    from hf_vitask.trainers import bundles

    out = tmp_path / "bundle"
    trainer = _trainer(tmp_path / "a", digits, task, tsm, max_steps=1)
    trainer.train()
    trainer.save_model(str(out))
    before = _files(out)

    def broken(self, output_dir, state_dict=None):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(type(trainer), "save_extras", broken)
        with pytest.raises(OSError, match="disk full"):
            trainer.save_model(str(out))
    assert _files(out) == before  # the previous bundle, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.saving-")]

    moves = []
    real = bundles.os.replace

    def replace(src, dst):
        moves.append(dst)
        if len(moves) == 3:
            raise OSError("killed while moving")
        return real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(bundles.os, "replace", replace)
        with pytest.raises(OSError, match="killed"):
            trainer.save_model(str(out))
    assert not (out / "vitask_config.json").exists()  # no marker: nothing loads a half-moved bundle
    with pytest.raises(FileNotFoundError, match="vitask_config.json"):
        VITaskModel.from_pretrained(out)
    trainer.save_model(str(out))  # a later save repairs it
    assert VITaskModel.from_pretrained(out).connector is not None


def test_a_second_live_run_into_the_same_output_dir_fails_at_once(tmp_path, digits, task, tsm):
    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=1)
    held = pytest.raises(RuntimeError, match=r"in use by a training run that is still alive \(pid \d+\)")
    with OutputDirLock(trainer.args.output_dir), held:
        trainer.train()
    trainer.train()  # free again


def test_only_the_trainers_checkpoint_folders_are_checkpoints(tmp_path):
    from hf_vitask.trainers.checkpoints import is_checkpoint_dir

    out = tmp_path / "run"
    assert is_checkpoint_dir(out / "checkpoint-20", out)
    assert not is_checkpoint_dir(out / "checkpoint-best", out)  # a bundle name: written whole, with its TSM
    assert not is_checkpoint_dir(tmp_path / "elsewhere" / "checkpoint-20", out)


def test_a_bundle_saved_from_a_gathered_state_dict_equals_the_direct_save(tmp_path, digits, task, tsm):
    """FSDP / DeepSpeed hand ``_save`` the full state dict gathered from the shards: each part of the
    bundle must come from it (and give the same files as a save from the modules themselves)."""
    from safetensors.torch import load_file

    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=1)
    trainer.train()
    model = trainer.model
    model.save_pretrained(tmp_path / "direct")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer._save(str(tmp_path / "gathered"), state_dict=state)
    for name in ("adapter_model.safetensors", "exemplar_connector.safetensors"):
        direct, gathered = (
            load_file(str(tmp_path / "direct" / name)),
            load_file(str(tmp_path / "gathered" / name)),
        )
        assert direct.keys() == gathered.keys() and all(direct[k].equal(gathered[k]) for k in direct), name
    marked = {
        k: v + 1 if k.startswith("connector.") else v for k, v in state.items()
    }  # the dict is what is saved
    trainer._save(str(tmp_path / "marked"), state_dict=marked)
    saved = load_file(str(tmp_path / "marked" / "exemplar_connector.safetensors"))
    assert all(saved[k].equal(marked[f"connector.{k}"]) for k in saved)


def test_the_proxy_instruction_is_saved_from_a_gathered_state_dict(tmp_path, digits):
    from safetensors.torch import load_file

    from hf_vitask import InstructionFreeConfig, InstructionFreeTrainer
    from hf_vitask.data.digits import add_digit_descriptions
    from hf_vitask.models.tiny import build_tiny_vlm

    vlm, processor = build_tiny_vlm("llava")
    args = InstructionFreeConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to="none",
        lora_r=4,
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    trainer = InstructionFreeTrainer(
        model=vlm,
        args=args,
        processing_class=processor,
        train_dataset=add_digit_descriptions(digits)["train"],
    )
    trainer.train()
    state = {k: (v * 2 if k == "proxy.weight" else v) for k, v in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "gathered"), state_dict=state)
    saved = load_file(str(tmp_path / "gathered" / "proxy.safetensors"))
    assert saved["proxy"].equal(state["proxy.weight"].float()) and saved["proxy_ema"].equal(
        state["proxy.ema"]
    )


def test_every_saved_bundle_carries_the_package_model_card(tmp_path, digits, task, tsm):
    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "bundle"))
    for folder in (tmp_path / "bundle", tmp_path / "out" / "checkpoint-2"):
        card = (folder / "README.md").read_text()
        assert "More Information Needed" not in card, folder
        assert "pipeline_tag: image-text-to-text" in card and "library_name: peft" in card
        assert "load_vitask" in card and "digits" in card and "stage 1" in card.lower()
