"""Mismatches are errors at construction or load, naming what does not fit (never silent)."""

from __future__ import annotations

import pytest

from hf_vitask import TaskSpecificModel, VITaskModel, VITaskTrainer
from hf_vitask.models.tiny import build_tiny_vlm

from .test_trainer import _args, _trainer


def test_a_tsm_for_other_classes_is_refused(tmp_path, digits, task):
    four = TaskSpecificModel("test_resnet", num_classes=4, pretrained=False, img_size=32)
    with pytest.raises(
        ValueError, match=r"TSM has 4 output classes but the task\(s\) 'digits' \(10\) have 10"
    ):
        _trainer(tmp_path, digits, task, four)


def test_stage_2_needs_a_trained_connector(tmp_path, digits, task, tsm):
    vlm, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="connector was never trained"):
        VITaskTrainer(
            model=vlm,
            args=_args(tmp_path, stage=2),
            processing_class=processor,
            train_dataset=digits["train"],
            task=task,
            tsm=tsm,
        )
    allowed = VITaskTrainer(
        model=vlm,
        args=_args(tmp_path, stage=2, freeze_connector=False),
        processing_class=processor,
        train_dataset=digits["train"],
        task=task,
        tsm=tsm,
    )
    assert all(p.requires_grad for p in allowed.model.connector.parameters())
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=1)
    stage1.train()
    stage2 = VITaskTrainer(
        model=stage1.model,
        args=_args(tmp_path / "s2", stage=2),
        processing_class=processor,
        train_dataset=digits["train"],
        task=task,
    )
    assert not any(p.requires_grad for p in stage2.model.connector.parameters())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, digits, task, tsm):
    root = tmp_path_factory.mktemp("bundle")
    trainer = _trainer(root, digits, task, tsm, max_steps=1)
    trainer.train()
    trainer.save_model(str(root / "bundle"))
    return root / "bundle"


@pytest.mark.parametrize(
    "missing", ["adapter_model.safetensors", "adapter_config.json", "exemplar_connector.safetensors"]
)
def test_a_missing_bundle_file_is_named(bundle, tmp_path, missing):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"bundle .* is incomplete: missing .*{missing}"):
        VITaskModel.from_pretrained(copy)


def test_a_bundle_on_a_base_of_another_family_is_refused(bundle):
    loaded = VITaskModel.from_pretrained(bundle)  # its own base: fine
    assert loaded.connector.trained
    qwen, _ = build_tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="trained on a llava model .* base_model given is a qwen2_vl model"):
        VITaskModel.from_pretrained(bundle, base_model=qwen)


def test_evaluating_with_the_tsm_needs_one(tmp_path, digits, task):
    from hf_vitask import pipeline
    from hf_vitask.config import DataArguments, EvalArguments

    vanilla = _trainer(tmp_path, digits, task, None, max_steps=1, ep_weight=0.0, rda_weight=0.0)
    vanilla.train()
    vanilla.save_model(str(tmp_path / "vanilla"))
    args = EvalArguments(model_path=str(tmp_path / "vanilla"), eval_use_tsm="yes", eval_max_samples=4)
    with pytest.raises(ValueError, match="eval_use_tsm=yes, but the bundle .* has no exemplar connector"):
        pipeline.run_evaluate(args, DataArguments(max_samples=48), str(tmp_path))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only case")
def test_fp16_on_cpu_is_an_error_like_bf16(tmp_path):
    from hf_vitask import InstructionFreeConfig, VITaskConfig

    for config in (VITaskConfig, InstructionFreeConfig):
        with pytest.raises(ValueError, match="fp16=True needs a GPU"):
            config(output_dir=str(tmp_path), fp16=True, report_to="none")


def test_a_bundle_with_broken_processor_files_is_named(bundle, tmp_path):
    import shutil

    from hf_vitask import load_vitask

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "tokenizer.json").write_text("{ not json")
    with pytest.raises(FileNotFoundError, match=r"Cannot load the processor saved in .*copy"):
        load_vitask(copy)


def _edited_copy(bundle, tmp_path, file, edit):
    """A copy of ``bundle`` whose JSON ``file`` went through ``edit`` (a dict -> dict function, or raw text)."""
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    target = copy / file
    target.write_text(edit if isinstance(edit, str) else json.dumps(edit(json.loads(target.read_text()))))
    return copy


def _set(path, value):
    def edit(data):
        *parents, last = path
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
        return data

    return edit


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("vitask_config.json", "{ damaged", r"vitask_config.json is not valid JSON \(.* line 1"),
        (
            "vitask_config.json",
            "[1, 2]",
            r"vitask_config.json must hold an object at the top level, got a list",
        ),
        (
            "vitask_config.json",
            _set(["image_token_id"], "32000"),
            r"'image_token_id' must be an integer .* got a string",
        ),
        ("vitask_config.json", _set(["image_token_id"], -1), r"'image_token_id' must be an integer from 0"),
        (
            "vitask_config.json",
            _set(["connector", "llm_dim"], 0),
            r"connector: 'llm_dim' must be an integer from 1",
        ),
        ("vitask_config.json", _set(["connector", "width"], 8), r"connector: unknown fields \['width'\]"),
        (
            "vitask_config.json",
            _set(["connector", "feature"], "cls"),
            r"connector: feature must be 'pooled' or 'patch'",
        ),
        (
            "vitask_config.json",
            _set(["connector", "hidden_dim"], 7),
            r"exemplar_connector.safetensors does not fit the connector that vitask_config.json describes",
        ),
        (
            "vitask_config.json",
            _set(["connector"], [16, 64]),
            r"'connector' must be an object or null, got a list",
        ),
        (
            "tsm/tsm_config.json",
            _set(["num_classes"], 2.5),
            r"tsm_config.json: 'num_classes' must be an integer from 1",
        ),
        (
            "tsm/tsm_config.json",
            _set(["model_name"], None),
            r"tsm_config.json: 'model_name' must be a string, got null",
        ),
        (
            "tsm/tsm_config.json",
            _set(["img_size"], "32"),
            r"'img_size' must be an integer or a list of integers",
        ),
        ("tsm/tsm_config.json", _set(["timm_kwargs"], []), r"'timm_kwargs' must be an object, got a list"),
    ],
)
def test_a_damaged_bundle_json_file_is_named_with_its_field(bundle, tmp_path, file, edit, message):
    copy = _edited_copy(bundle, tmp_path, file, edit)
    with pytest.raises(ValueError, match=message) as err:
        VITaskModel.from_pretrained(copy)
    assert str(copy) in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"name": "x"', r"task.json is not valid JSON"),
        ('["a", "b"]', r"task.json must hold an object at the top level, got a list"),
    ],
)
def test_a_damaged_task_file_is_named(bundle, tmp_path, text, message):
    from hf_vitask.task import TaskSpec, load_tasks

    copy = _edited_copy(bundle, tmp_path, "task.json", text)
    for load in (TaskSpec.from_pretrained, load_tasks):
        with pytest.raises(ValueError, match=message):
            load(copy)


def test_a_damaged_tasks_list_is_named(tmp_path, task):
    from hf_vitask.task import load_tasks, save_tasks

    save_tasks([task, task], tmp_path)
    assert [t.class_names for t in load_tasks(tmp_path)] == [task.class_names] * 2
    (tmp_path / "tasks.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match=r"tasks.json must hold a list at the top level, got an object"):
        load_tasks(tmp_path)
    (tmp_path / "tasks.json").write_text('["digits"]')
    with pytest.raises(ValueError, match=r"A TaskSpec must be an object of fields, got str 'digits'"):
        load_tasks(tmp_path)


def test_a_directory_that_is_not_a_bundle_is_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf"No vitask_config.json in {tmp_path}: not a directory written"
    ):
        VITaskModel.from_pretrained(tmp_path)


def test_evaluating_with_the_tsm_names_the_missing_tsm_folder(bundle, tmp_path):
    import shutil

    from hf_vitask import pipeline
    from hf_vitask.config import DataArguments, EvalArguments

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    shutil.rmtree(copy / "tsm")
    args = EvalArguments(model_path=str(copy), eval_use_tsm="yes", eval_max_samples=4)
    with pytest.raises(ValueError, match=rf"eval_use_tsm=yes, but the bundle {copy} has no {copy / 'tsm'}"):
        pipeline.run_evaluate(args, DataArguments(max_samples=48), str(tmp_path))


def test_an_unsupported_model_type_is_named_with_the_supported_ones():
    from transformers import PretrainedConfig

    from hf_vitask.models.families import get_family

    class Blip(__import__("torch").nn.Module):
        config = PretrainedConfig()
        config.model_type = "blip-2"

    with pytest.raises(
        ValueError,
        match=r"Unsupported VLM model_type 'blip-2' \(from Blip\)\. Supported "
        r"families: llava \(model_type llava\)",
    ):
        get_family(Blip())


def test_resuming_without_a_complete_checkpoint_is_an_error(tmp_path, digits, task, tsm):
    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=1)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True: no complete checkpoint in .*out"):
        trainer.train(resume_from_checkpoint=True)
    (tmp_path / "out" / "checkpoint-1").mkdir(parents=True)  # an unfinished save: no manifest
    with pytest.raises(ValueError, match=r"no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_a_plugin_tsm_for_other_classes_is_refused(bundle, tmp_path):
    from hf_vitask import pipeline
    from hf_vitask.config import DataArguments, EvalArguments

    TaskSpecificModel("test_resnet", num_classes=4, pretrained=False, img_size=32).save_pretrained(
        tmp_path / "tsm4"
    )
    args = EvalArguments(model_path=str(bundle), plugin_tsm=str(tmp_path / "tsm4"), eval_max_samples=4)
    with pytest.raises(
        ValueError, match=r"^plugin_tsm: The TSM has 4 output classes but the task\(s\) 'digits'"
    ):
        pipeline.run_evaluate(args, DataArguments(max_samples=48), str(tmp_path))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only case")
def test_fsdp_on_cpu_is_an_error_not_silent_ddp(tmp_path):
    from hf_vitask import VITaskConfig

    with pytest.raises(ValueError, match="fsdp needs GPUs: .* silently be plain DDP"):
        VITaskConfig(output_dir=str(tmp_path), fsdp="full_shard", report_to="none")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only case")
def test_cpu_processes_use_gloo(monkeypatch):
    """torchrun on a machine without a GPU: real DDP over gloo, never N silent copies (tested end to end
    in test_distributed.py); a GPU backend is an error naming it."""
    from types import SimpleNamespace

    from hf_vitask.config import _cpu_processes_use_gloo

    args = SimpleNamespace(use_cpu=False, ddp_backend=None)
    _cpu_processes_use_gloo(args)  # one process: nothing changes
    assert (args.use_cpu, args.ddp_backend) == (False, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _cpu_processes_use_gloo(args)
    assert (args.use_cpu, args.ddp_backend) == (True, "gloo")
    with pytest.raises(
        ValueError, match="ddp_backend='nccl' needs GPUs; 2 processes on a machine without one"
    ):
        _cpu_processes_use_gloo(SimpleNamespace(use_cpu=False, ddp_backend="nccl"))
