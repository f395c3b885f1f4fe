"""The config dataclasses: fields with a fixed set of values declare it (``choices``) and are checked in
Python and on the command line; the stage-dependent fields keep what was set, so every copy of a config
(``for_stage``, ``dataclasses.replace``, pickle, ``to_dict``) derives the stage defaults again."""

import dataclasses
import json
import pickle

import pytest
from transformers import TrainingArguments

from hf_vitask.cli import UsageError, main, parse
from hf_vitask.config import (
    CRT_NEGATIVES,
    DEFAULT_CRT_WEIGHT,
    OPTION_SCORES,
    PASS_MODES,
    PROXY_FEEDS,
    PROXY_INIT_RESIZES,
    RDA_TEACHERS,
    STAGE_DEFAULTS,
    DataArguments,
    EvalArguments,
    InstructionFreeConfig,
    ModelArguments,
    TSMArguments,
    VITaskConfig,
)

CLASSES = (VITaskConfig, InstructionFreeConfig, ModelArguments, DataArguments, TSMArguments, EvalArguments)
INHERITED = {f.name for f in dataclasses.fields(TrainingArguments)}  # transformers checks its own
CHOICE_FIELDS = [
    (cls, f)
    for cls in CLASSES
    for f in dataclasses.fields(cls)
    if "choices" in f.metadata and f.name not in INHERITED
]


def _make(cls, tmp_path, **values):
    if issubclass(cls, TrainingArguments):
        values = {"output_dir": str(tmp_path / "out"), "report_to": "none", **values}
    return cls(**values)


def _field(cls, name) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _is_list(f) -> bool:
    return str(f.type).startswith("list[")


def test_fields_with_a_fixed_set_of_values_declare_it():
    assert {(cls.__name__, f.name) for cls, f in CHOICE_FIELDS} == {
        ("VITaskConfig", name)
        for name in (
            "stage",
            "rda_teacher",
            "pass_fusion",
            "crt_negatives",
            "exemplar_feature",
            "instruction",
            "metric_option_score",
            "rda_teacher_cache",
        )
    } | {("InstructionFreeConfig", "proxy_init_resize"), ("InstructionFreeConfig", "proxy_feed")} | {
        ("EvalArguments", name)
        for name in ("eval_methods", "option_score", "eval_use_tsm", "eval_instructions")
    }
    # the sets other modules import are the ones the fields declare
    for cls, name, values in [
        (VITaskConfig, "rda_teacher", RDA_TEACHERS),
        (VITaskConfig, "pass_fusion", PASS_MODES),
        (VITaskConfig, "crt_negatives", CRT_NEGATIVES),
        (VITaskConfig, "metric_option_score", OPTION_SCORES),
        (EvalArguments, "option_score", OPTION_SCORES),
        (InstructionFreeConfig, "proxy_feed", PROXY_FEEDS),
        (InstructionFreeConfig, "proxy_init_resize", PROXY_INIT_RESIZES),
    ]:
        assert tuple(_field(cls, name).metadata["choices"]) == values, name
    for _, f in CHOICE_FIELDS:  # the defaults are choices themselves
        default = f.default_factory() if _is_list(f) else f.default
        assert all(v in f.metadata["choices"] for v in (default if _is_list(f) else [default])), f.name


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, f.name) for cls, f in CHOICE_FIELDS],
    ids=[f"{cls.__name__}.{f.name}" for cls, f in CHOICE_FIELDS],
)
def test_a_value_outside_a_fields_choices_is_refused_naming_the_field_and_its_choices(tmp_path, cls, name):
    f = _field(cls, name)
    choices = list(f.metadata["choices"])
    for choice in choices:  # each choice is taken
        value = [choice] if _is_list(f) else choice
        assert getattr(_make(cls, tmp_path, **{name: value}), name) == value
    bad = 3 if isinstance(choices[0], int) else "bogus"
    with pytest.raises(ValueError) as err:
        _make(cls, tmp_path, **{name: [choices[0], bad] if _is_list(f) else bad})
    what = f"{name} entries" if _is_list(f) else name
    assert str(err.value) == f"{what} must be one of {choices}, got {bad!r}"


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, f.name) for cls, f in CHOICE_FIELDS],
    ids=[f"{cls.__name__}.{f.name}" for cls, f in CHOICE_FIELDS],
)
def test_the_command_line_refuses_a_value_outside_a_fields_choices(cls, name):
    choices = [str(c) for c in _field(cls, name).metadata["choices"]]
    method = ["--method", "instruction-free"] if cls is InstructionFreeConfig else []
    bad = "3" if choices[0].isdigit() else "bogus"
    with pytest.raises(UsageError, match=rf"^argument --{name}\b.*invalid choice") as err:  # argparse's check
        parse([f"--{name}", bad, *method], "train")
    assert all(choice in str(err.value) for choice in choices)
    configs, _ = parse([f"--{name}", choices[-1], *method], "train")
    value = next(getattr(c, name) for c in configs if hasattr(c, name))
    assert str(value[0] if isinstance(value, list) else value) == choices[-1]


def test_a_bad_choice_on_the_command_line_is_one_line_and_exit_code_2(capsys):
    assert main(["train", "--rda_teacher", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hf-vitask: error: argument --rda_teacher")
    assert "'bogus'" in err and "self" in err and "frozen" in err


# -- stage-dependent defaults -------------------------------------------------------------------------
def _effective(cfg: VITaskConfig) -> tuple:
    return cfg.effective_crt_weight, cfg.effective_freeze_connector


def test_for_stage_derives_the_stage_defaults_and_keeps_explicit_values(tmp_path):
    stage1 = _make(VITaskConfig, tmp_path)
    assert stage1.crt_weight is None and stage1.freeze_connector is None  # as given: the stage's default
    assert _effective(stage1) == (0.0, False) and not stage1.is_vanilla
    for stage2 in (stage1.for_stage(2), dataclasses.replace(stage1, stage=2)):
        assert stage2.stage == 2 and _effective(stage2) == (DEFAULT_CRT_WEIGHT, True)
        assert (
            _effective(stage2.for_stage(1))
            == _effective(dataclasses.replace(stage2, stage=1))
            == (0.0, False)
        )
    explicit = _make(VITaskConfig, tmp_path, crt_weight=0.0, freeze_connector=False)  # stage 1's values, set
    assert (
        _effective(explicit.for_stage(2))
        == _effective(dataclasses.replace(explicit, stage=2))
        == (0.0, False)
    )
    assert _effective(stage1.for_stage(2, crt_weight=0.5)) == (0.5, True)
    assert _effective(_make(VITaskConfig, tmp_path, stage=2, crt_weight=0.5).for_stage(1)) == (0.5, False)
    vanilla = stage1.for_stage(2, ep_weight=0.0, rda_weight=0.0, crt_weight=0.0)
    assert vanilla.is_vanilla and _effective(vanilla) == (0.0, True)
    with pytest.raises(ValueError, match="crt_weight must be >= 0"):
        stage1.for_stage(2, crt_weight=-1.0)
    with pytest.raises(ValueError, match="nothing to train"):  # the stage's default weight counts
        _make(VITaskConfig, tmp_path, van_weight=0, ep_weight=0, rda_weight=0)
    assert (
        _make(VITaskConfig, tmp_path, stage=2, van_weight=0, ep_weight=0, rda_weight=0).effective_crt_weight
        > 0
    )


@pytest.mark.parametrize(
    "given",
    [{}, {"crt_weight": 0.0, "freeze_connector": False}, {"crt_weight": 0.5}],
    ids=["defaults", "stage-1-values-set", "crt-set"],
)
def test_copies_and_round_trips_derive_the_stage_defaults_like_the_original(tmp_path, given):
    cfg = _make(VITaskConfig, tmp_path, **given)
    copies = {
        "to_dict": VITaskConfig(**cfg.to_dict()),
        "to_json_string": VITaskConfig(**json.loads(cfg.to_json_string())),
        "pickle": pickle.loads(pickle.dumps(cfg)),
        "replace": dataclasses.replace(cfg),
        "for_stage": cfg.for_stage(1),
    }
    expected = {
        stage: tuple(given.get(name, STAGE_DEFAULTS[name][stage]) for name in STAGE_DEFAULTS)
        for stage in (1, 2)
    }
    for how, copy in copies.items():
        assert (copy.crt_weight, copy.freeze_connector) == (cfg.crt_weight, cfg.freeze_connector), how
        for stage in (1, 2):
            assert _effective(copy.for_stage(stage)) == _effective(cfg.for_stage(stage)) == expected[stage], (
                how
            )
            assert _effective(dataclasses.replace(copy, stage=stage)) == expected[stage], how


def test_a_config_holds_no_state_beyond_its_fields(tmp_path):
    """What TrainingArguments itself keeps aside (devices, distributed state) and nothing more."""

    def extra(obj) -> set:
        return set(vars(obj)) - {f.name for f in dataclasses.fields(obj)}

    base = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    base.device  # noqa: B018 - the cached device setup, as the package's configs make it
    assert extra(_make(VITaskConfig, tmp_path)) == extra(base)
    assert extra(_make(VITaskConfig, tmp_path).for_stage(2)) == extra(base)


def test_a_bundle_records_the_values_its_stage_trained_with(tmp_path):
    stage2 = _make(VITaskConfig, tmp_path, stage=2)
    given, record = stage2.to_dict(), stage2.effective_dict()
    assert given["crt_weight"] is None and given["freeze_connector"] is None
    assert record == {**given, "crt_weight": DEFAULT_CRT_WEIGHT, "freeze_connector": True}
    assert _effective(VITaskConfig(**record)) == (DEFAULT_CRT_WEIGHT, True)  # loaded back: trains the same
    instruction_free = _make(InstructionFreeConfig, tmp_path)
    assert instruction_free.effective_dict() == instruction_free.to_dict()
