"""The README and docs stay true: the usage example runs, setup commands, config reference."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one python example"
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    predictions = eval(printed)  # the example prints a list of class ids
    # they are the trained model's best-scoring classes for the first four test digits
    from hf_vitask import score_options

    trainer, data = namespace["trainer"], namespace["data"]
    assert trainer.state.global_step == 10
    scores = score_options(
        trainer.model, namespace["processor"], namespace["task"], data["test"]["image"][:4]
    )
    assert predictions == scores.argmax(-1).tolist()
    assert (tmp_path / "vitask-digits").is_dir()


def test_readme_has_exactly_two_setup_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert len(commands) == 2
    assert any("pytest" in c for c in commands)
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in ci, ".ci/run must run the README's test command verbatim"


def _config_reference_hook():
    """docs/hooks/config_reference.py, the mkdocs hook that generates the configuration reference."""
    import importlib.util

    path = README.parent / "docs" / "hooks" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_config_fields():
    """Every field the configuration reference must list: the training configs' fields beyond
    ``TrainingArguments`` (new, or with another default) and every field of the pipeline dataclasses."""
    import dataclasses

    from transformers import TrainingArguments

    from hf_vitask.cli import RunArguments
    from hf_vitask.config import (
        DataArguments,
        EvalArguments,
        InstructionFreeConfig,
        ModelArguments,
        TSMArguments,
        VITaskConfig,
    )

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    fields = {}
    for cls in (VITaskConfig, InstructionFreeConfig):
        own = [f for f in dataclasses.fields(cls) if f.name not in base or base[f.name] != f.default]
        assert len(own) > 10
        fields[cls] = own
    for cls in (ModelArguments, DataArguments, TSMArguments, EvalArguments, RunArguments):
        fields[cls] = [f for f in dataclasses.fields(cls) if f.init]
    return fields


def test_every_config_field_is_documented():
    """The generated reference (what the docs build puts into configuration.md) lists every field
    with its type, default and help text."""
    import dataclasses

    hook = _config_reference_hook()
    fields = _documented_config_fields()
    assert {cls.__name__: cls for cls in fields} == {
        name: hook.config_class(name) for name in hook.CONFIG_CLASSES
    }
    reference = hook.render_config_reference()
    sections = dict(
        zip(
            re.findall(r"^## `(\w+)`", reference, flags=re.M),
            re.split(r"^## `\w+`.*$", reference, flags=re.M)[1:],
            strict=True,
        )
    )
    for cls, own in fields.items():
        rows = [line for line in sections[cls.__name__].splitlines() if line.startswith("| `")]
        assert len(rows) == len(own), f"{cls.__name__}: {len(rows)} rows for {len(own)} fields"
        for f in own:
            help_text = f.metadata.get("help")
            assert help_text, f"{cls.__name__}.{f.name} has no help text"
            row = next((r for r in rows if r.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"{cls.__name__}.{f.name} is missing from the configuration reference"
            assert hook.md_text(help_text) in row, f"{cls.__name__}.{f.name}: help text missing from its row"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"| `{default!r}` |" in row, f"{cls.__name__}.{f.name}: default {default!r} missing"


def test_configuration_page_renders_every_help_text():
    """The built page shows each help text as written (escaping keeps '||', '*', '<...>' literal)."""
    import html

    import markdown

    hook = _config_reference_hook()
    page = hook.expand_placeholders((README.parent / "docs" / "configuration.md").read_text())
    rendered = markdown.markdown(page, extensions=["tables"])
    cells = {}
    for row in re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S):
        texts = [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td>(.*?)</td>", row, flags=re.S)
        ]
        if texts:
            cells.setdefault(texts[0], []).append(texts[3])
    for cls, own in _documented_config_fields().items():
        for f in own:
            expected = f.metadata["help"].replace("`", "").replace("docs/", "")
            assert any(m.startswith(expected) for m in cells.get(f.name, [])), f"{cls.__name__}.{f.name}"


def test_configuration_page_has_no_hand_copied_field_tables():
    """docs/configuration.md is prose plus one placeholder per dataclass; the tables come from the code."""
    hook = _config_reference_hook()
    page = (README.parent / "docs" / "configuration.md").read_text()
    table_lines = [line for line in page.splitlines() if line.lstrip().startswith("|")]
    assert not table_lines, f"docs/configuration.md holds a hand-written table: {table_lines[:3]}"
    assert sorted(hook.PLACEHOLDER.findall(page)) == sorted(hook.CONFIG_CLASSES)
    mkdocs_yml = (README.parent / "mkdocs.yml").read_text()
    assert "docs/hooks/config_reference.py" in mkdocs_yml, "mkdocs.yml must run the config reference hook"


def test_families_page_has_a_row_per_registered_family():
    from hf_vitask.models.families import support_matrix

    page = (README.parent / "docs" / "families.md").read_text()
    for row in support_matrix():
        line = next((ln for ln in page.splitlines() if ln.startswith(f"| `{row['family']}` |")), None)
        assert line is not None, f"docs/families.md has no row for {row['family']}"
        assert row["pass_fusion"] in line and row["gradient_checkpointing"] in line
        assert all(f"`{t.strip()}`" in line for t in row["model_type"].split(","))


# Each entry of docs/troubleshooting.md (by a phrase of its first column) and the test that raises it and
# checks the message names the offending item. A new entry without a test here fails the check below.
TROUBLESHOOTING_TESTS = {
    "the loss term 'loss_rda' is nan": "test_trainer.py::test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint",
    "is no longer finite": "test_trainer.py::test_a_weight_that_turns_non_finite_stops_training_before_its_checkpoint",
    "is in use by a training run": "test_bundles.py::test_a_second_live_run_into_the_same_output_dir_fails_at_once",
    "no complete checkpoint": "test_cross_checks.py::test_resuming_without_a_complete_checkpoint_is_an_error",
    "Skipping checkpoint": "test_resume.py::test_vitask_run_resumes_in_stage_2_past_a_damaged_checkpoint",
    "The TSM has 4 output classes": "test_cross_checks.py::test_a_tsm_for_other_classes_is_refused",
    "freezes the exemplar connector": "test_cross_checks.py::test_stage_2_needs_a_trained_connector",
    "which needs a trained TSM": "test_trainer.py::test_configuration_errors",
    "have no CRT negative": "test_multitask.py::test_crt_averages_over_rows_with_a_negative_and_logs_coverage",
    "have no image token after the chat template": "test_collator.py::test_a_chat_template_that_drops_the_image_is_named",
    "tokens long, over max_length": "test_collator.py::test_max_length_names_rows_and_never_truncates",
    "Unsupported VLM model_type": "test_cross_checks.py::test_an_unsupported_model_type_is_named_with_the_supported_ones",
    "Image file not found in row": "test_collator.py::test_bad_rows_fail_naming_the_row",
    "Task index 2 in row 5": "test_multitask.py::test_a_task_index_out_of_range_is_named_with_its_row",
    "list every class in class_names": "test_data_sources.py::test_a_stray_test_label_is_named_not_a_new_class",
    "16-bit, 32-bit or float images": "test_collator.py::test_high_bit_depth_images_are_scaled_by_their_range_not_clipped",
    "No vitask_config.json in": "test_cross_checks.py::test_a_directory_that_is_not_a_bundle_is_named",
    "is incomplete: missing": "test_cross_checks.py::test_a_missing_bundle_file_is_named",
    "holds NaN or inf values": "test_trainer.py::test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint",
    "was trained on a llava model": "test_cross_checks.py::test_a_bundle_on_a_base_of_another_family_is_refused",
    "is not valid JSON": "test_cross_checks.py::test_a_damaged_bundle_json_file_is_named_with_its_field",
    "'image_token_id' must be an integer": "test_cross_checks.py::test_a_damaged_bundle_json_file_is_named_with_its_field",
    "does not fit the connector": "test_cross_checks.py::test_a_damaged_bundle_json_file_is_named_with_its_field",
    "Cannot load the processor": "test_cross_checks.py::test_a_bundle_with_broken_processor_files_is_named",
    "class_names must be a list": "test_task.py::test_a_hand_edited_task_json_is_type_checked",
    "eval_use_tsm=yes, but the bundle": "test_cross_checks.py::test_evaluating_with_the_tsm_names_the_missing_tsm_folder",
    "plugin_tsm: The TSM has N": "test_cross_checks.py::test_a_plugin_tsm_for_other_classes_is_refused",
    "predict: rows with an empty prediction": "test_cli.py::test_pipeline_round_trip",
    "unknown keys in config.yaml": "test_cli.py::test_unknown_yaml_key_is_an_error",
    "eval_use_tsm must be": "test_cli.py::test_cli_errors_are_one_line_with_usage_exit_code_2",
    "config file x.yaml not found": "test_cli.py::test_unknown_yaml_key_is_an_error",
    "fp16=True needs a GPU": "test_cross_checks.py::test_fp16_on_cpu_is_an_error_like_bf16",
    "fsdp needs GPUs": "test_cross_checks.py::test_fsdp_on_cpu_is_an_error_not_silent_ddp",
    "ddp_backend='nccl' needs GPUs": "test_cross_checks.py::test_cpu_processes_use_gloo",
}


def test_every_troubleshooting_entry_has_a_test():
    import ast

    page = (README.parent / "docs" / "troubleshooting.md").read_text()
    entries = [
        line.split("|")[1]
        for line in page.splitlines()
        if line.startswith("| ") and not line.startswith("| message")
    ]
    assert len(entries) >= 30
    untested = [e.strip() for e in entries if not any(phrase in e for phrase in TROUBLESHOOTING_TESTS)]
    assert not untested, f"troubleshooting entries without a test in TROUBLESHOOTING_TESTS: {untested}"
    unused = [p for p in TROUBLESHOOTING_TESTS if not any(p in e for e in entries)]
    assert not unused, f"phrases that match no troubleshooting entry: {unused}"
    for target in set(TROUBLESHOOTING_TESTS.values()):
        file, name = target.split("::")
        tree = ast.parse((Path(__file__).parent / file).read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, (
            f"{target} does not exist"
        )
