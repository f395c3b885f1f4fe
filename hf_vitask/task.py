"""TaskSpec: a classification task framed as instruction following.

A task is a set of class names plus the words around them: the instruction shown with the
image (a *complete* variant listing the options and an *incomplete* one without them, as in
the VITask paper) and the response format. The same spec renders training targets and
parses generated answers back to class ids, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import unicodedata
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from hf_vitask.files import TASK_FILE, TASKS_FILE
from hf_vitask.jsonfile import read_json


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents and punctuation, collapse spaces: the form answers are matched in."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


#: Limits on what a task.json may hold (a hand-edited or hostile file fails clearly).
MAX_CLASSES = 10_000
MAX_TEXT = 500
TEMPLATE_FIELDS = frozenset({"modality", "options", "question", "label"})


@dataclass
class TaskSpec:
    """One classification task and how it is phrased to the VLM.

    Templates are ``str.format`` strings with the fields ``{modality}``, ``{options}``,
    ``{question}`` (instructions) and ``{label}`` (response).
    """

    class_names: list[str]
    """Names of the classes, in label-id order. What the model is trained to answer."""
    name: str = "task"
    """Short identifier of the task (used in logs, model cards and multi-task runs)."""
    modality: str = "medical"
    """Image modality, inserted into the default instruction ("Analyze the given {modality} image.")."""
    question: str | None = None
    """Optional question. When set, it replaces the default instruction templates (the options are
    still appended in the complete variant)."""
    instruction_template: str = "Analyze the given {modality} image. The possible diagnoses are: {options}."
    """Complete instruction: lists the label set (the VITask/MedDr format)."""
    incomplete_instruction_template: str = "Analyze the given {modality} image."
    """Incomplete instruction: the label set is dropped (tests robustness to terse prompts)."""
    response_template: str = "{label}."
    """Assistant answer for a class."""
    option_separator: str = ", "
    """Separator between class names in ``{options}``."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata kept with the spec (e.g. the data source)."""

    def __post_init__(self):
        self._check_types()
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) < 2:
            raise ValueError(f"TaskSpec {self.name!r} needs at least two class names, got {self.class_names}")
        normalized: dict[str, str] = {}
        for c in self.class_names:
            key = normalize_answer(c)
            if not key:
                raise ValueError(f"TaskSpec {self.name!r}: class name {c!r} is empty once normalised")
            if key in normalized:
                raise ValueError(
                    f"TaskSpec {self.name!r}: class names {normalized[key]!r} and {c!r} are the same once "
                    "normalised, so answers could not be told apart"
                )
            normalized[key] = c
        if self.question is not None:
            self.instruction_template = "{question} The possible answers are: {options}."
            self.incomplete_instruction_template = "{question}"
        for tmpl in (self.instruction_template, self.incomplete_instruction_template):
            self._format(tmpl, label="")  # fail now on an unknown template field
        if "{label}" not in self.response_template:
            raise ValueError(f"response_template must contain '{{label}}', got {self.response_template!r}")

    def _check_types(self) -> None:
        """A TaskSpec may come from a task.json somebody edited: fail on wrong types and sizes
        instead of, say, turning ``class_names: "catdog"`` into six one-letter classes."""
        where = f"TaskSpec {self.name!r}" if isinstance(self.name, str) else "TaskSpec"
        if not isinstance(self.class_names, (list, tuple)):
            raise ValueError(
                f"{where}: class_names must be a list of class names, got {type(self.class_names).__name__} "
                f"{str(self.class_names)[:80]!r}"
            )
        if len(self.class_names) > MAX_CLASSES:
            raise ValueError(f"{where}: {len(self.class_names)} class names, more than {MAX_CLASSES}")
        for i, c in enumerate(self.class_names):
            if (
                not isinstance(c, (str, int))
                or isinstance(c, bool)
                or not str(c).strip()
                or len(str(c)) > MAX_TEXT
            ):
                raise ValueError(
                    f"{where}: class name {i} must be a non-empty string of at most {MAX_TEXT} "
                    f"characters, got {str(c)[:80]!r}"
                )
        texts = (
            "name",
            "modality",
            "instruction_template",
            "incomplete_instruction_template",
            "response_template",
            "option_separator",
        )
        for field_name in texts + ("question",):
            value = getattr(self, field_name)
            if value is None and field_name == "question":
                continue
            if not isinstance(value, str) or len(value) > MAX_TEXT * 10:
                raise ValueError(
                    f"{where}: {field_name} must be a string of at most {MAX_TEXT * 10} characters, "
                    f"got {type(value).__name__}"
                )
        for field_name in ("instruction_template", "incomplete_instruction_template", "response_template"):
            for _, key, spec, conversion in string.Formatter().parse(getattr(self, field_name)):
                if key is not None and (key not in TEMPLATE_FIELDS or spec or conversion):
                    shown = f"{{{key}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                    raise ValueError(
                        f"{where}: {field_name} uses unknown field {shown}; available: "
                        f"{sorted(TEMPLATE_FIELDS)}, each as a plain {{name}}"
                    )
        if not isinstance(self.extra, dict):
            raise ValueError(f"{where}: extra must be a mapping, got {type(self.extra).__name__}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _format(self, template: str, **kw) -> str:
        fields = {
            "modality": self.modality,
            "options": self.option_separator.join(self.class_names),
            "question": self.question or "",
            **kw,
        }
        try:
            return template.format(**fields)
        except KeyError as e:
            raise ValueError(
                f"TaskSpec {self.name!r}: template {template!r} uses unknown field {e}; "
                f"available: {sorted(fields)}"
            ) from None

    def instruction(self, complete: bool = True) -> str:
        """The user instruction shown with the image."""
        return self._format(self.instruction_template if complete else self.incomplete_instruction_template)

    def response(self, label: int) -> str:
        """The assistant answer for class id ``label``."""
        return self._format(self.response_template, label=self.class_names[self.check_label(label)])

    def check_label(self, label, where: str = "") -> int:
        """Return ``label`` as a valid class id, accepting a class name too; raise naming the item otherwise."""
        if isinstance(label, str):
            if label in self.class_names:
                return self.class_names.index(label)
            raise ValueError(
                f"Unknown label {label!r}{where} for task {self.name!r}; known classes: {self.class_names}"
            )
        try:
            idx = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"Label {label!r}{where} is neither a class id nor a class name") from None
        if not 0 <= idx < self.num_classes:
            raise ValueError(
                f"Label {label!r}{where} is out of range for task {self.name!r} with {self.num_classes} classes"
            )
        return idx

    def parse(self, text: str) -> int | None:
        """Map a generated answer back to a class id, or ``None`` when it names no class.

        Exact normalised match first; otherwise the class whose name occurs earliest in the
        answer (longest name first on ties, so "non-pneumonia" wins over "pneumonia").
        """
        answer = normalize_answer(text)
        keys = [normalize_answer(c) for c in self.class_names]
        if answer in keys:
            return keys.index(answer)
        best = None
        padded = f" {answer} "
        for i, key in enumerate(keys):
            pos = padded.find(f" {key} ")
            if pos >= 0 and (best is None or (pos, -len(key)) < best[0]):
                best = ((pos, -len(key)), i)
        return None if best is None else best[1]

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        if not isinstance(data, dict):
            raise ValueError(
                f"A TaskSpec must be an object of fields, got {type(data).__name__} {str(data)[:80]!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown TaskSpec fields {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        if data.get("question") is not None:  # templates are derived from the question
            data.pop("instruction_template", None)
            data.pop("incomplete_instruction_template", None)
        return cls(**data)

    def save_pretrained(self, save_directory: str | PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / TASK_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | PathLike) -> TaskSpec:
        path = Path(path)
        file = path / TASK_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No {TASK_FILE} in {path}: was this directory written by hf_vitask?")
        return cls.from_dict(read_json(file))


def save_tasks(tasks, save_directory: str | PathLike) -> None:
    """One task -> ``task.json``; several (multi-task run) -> ``tasks.json``, a list in task-index order."""
    tasks = [tasks] if isinstance(tasks, TaskSpec) else list(tasks)
    if len(tasks) == 1:
        tasks[0].save_pretrained(save_directory)
        return
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / TASKS_FILE).write_text(json.dumps([t.to_dict() for t in tasks], indent=2) + "\n")


def load_tasks(path: str | PathLike) -> TaskSpec | list[TaskSpec] | None:
    """What :func:`save_tasks` wrote: a TaskSpec, a list of them, or None when the directory has neither."""
    path = Path(path)
    if (path / TASKS_FILE).is_file():
        return [TaskSpec.from_dict(d) for d in read_json(path / TASKS_FILE, kind=list)]
    if (path / TASK_FILE).is_file():
        return TaskSpec.from_pretrained(path)
    return None
