import pytest

from hf_vitask.data.digits import digits_task
from hf_vitask.task import TaskSpec, normalize_answer


@pytest.fixture()
def spec():
    return TaskSpec(
        class_names=["normal", "pneumonia", "non-pneumonia infection"], modality="chest X-ray", name="cxr"
    )


def test_instruction_variants(spec):
    assert spec.instruction() == (
        "Analyze the given chest X-ray image. The possible diagnoses are: normal, pneumonia, non-pneumonia infection."
    )
    assert spec.instruction(complete=False) == "Analyze the given chest X-ray image."
    assert spec.response(1) == "pneumonia."
    assert spec.response("normal") == "normal."


def test_question_overrides_templates():
    spec = TaskSpec(class_names=["no", "yes"], question="Is there pneumonia?")
    assert spec.instruction() == "Is there pneumonia? The possible answers are: no, yes."
    assert spec.instruction(complete=False) == "Is there pneumonia?"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("pneumonia.", 1),
        ("Pneumonia", 1),
        ("  NORMAL!! ", 0),
        ("The answer is non-pneumonia infection.", 2),
        ("normal or pneumonia", 0),  # earliest named class
        ("I cannot tell", None),
        ("", None),
    ],
)
def test_parse(spec, text, expected):
    assert spec.parse(text) == expected


def test_normalize_answer():
    assert normalize_answer("Café, au-lait!") == "cafe au lait"


def test_check_label_errors_name_the_item(spec):
    with pytest.raises(ValueError, match="in row 7.*known classes"):
        spec.check_label("covid", " in row 7")
    with pytest.raises(ValueError, match="out of range"):
        spec.check_label(3)
    with pytest.raises(ValueError, match="neither a class id nor a class name"):
        spec.check_label(None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_names": ["a"]}, "at least two"),
        ({"class_names": ["Yes", "yes."]}, "same once normalised"),
        ({"class_names": ["a", "b"], "response_template": "answer"}, "label"),
        ({"class_names": ["a", "b"], "instruction_template": "{colour}"}, "unknown field"),
    ],
)
def test_invalid_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(**kwargs)


def test_json_round_trip(tmp_path, spec):
    spec.save_pretrained(tmp_path)
    assert TaskSpec.from_pretrained(tmp_path) == spec
    q = TaskSpec(class_names=["no", "yes"], question="Is it?")
    q.save_pretrained(tmp_path / "q")
    assert TaskSpec.from_pretrained(tmp_path / "q") == q
    with pytest.raises(FileNotFoundError, match="task.json"):
        TaskSpec.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="Unknown TaskSpec fields"):
        TaskSpec.from_dict({"class_names": ["a", "b"], "colour": 1})


def test_digits_task():
    spec = digits_task()
    assert spec.num_classes == 10
    assert spec.instruction().endswith("zero, one, two, three, four, five, six, seven, eight, nine.")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_names": "catdog"}, "class_names must be a list of class names, got str 'catdog'"),
        ({"class_names": ["cat", ""]}, "class name 1 must be a non-empty string"),
        ({"class_names": ["cat", {"a": 1}]}, "class name 1 must be a non-empty string"),
        ({"class_names": ["x" * 501, "dog"]}, "class name 0 must be a non-empty string of at most 500"),
        ({"class_names": [f"c{i}" for i in range(10_001)]}, "10001 class names, more than 10000"),
        ({"name": 3}, "name must be a string"),
        ({"instruction_template": "{modality.__class__}"}, r"uses unknown field \{modality.__class__\}"),
        ({"response_template": "{label!r}"}, r"uses unknown field \{label!r\}"),
        ({"extra": []}, "extra must be a mapping"),
    ],
)
def test_a_hand_edited_task_json_is_type_checked(tmp_path, changes, message):
    import json

    from hf_vitask.task import TaskSpec

    data = {**TaskSpec(class_names=["cat", "dog"]).to_dict(), **changes}
    (tmp_path / "task.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        TaskSpec.from_pretrained(tmp_path)
