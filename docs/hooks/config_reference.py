"""mkdocs hook: the configuration reference, generated from the config dataclasses at build time.

``docs/configuration.md`` holds prose and one placeholder per dataclass, ``<!-- config-fields: NAME -->``;
:func:`on_page_markdown` replaces each by a table of that class's fields (name, type, default, help
from ``metadata["help"]``, the values allowed from ``metadata["choices"]``). :func:`render_config_reference`
renders every table in one string, for tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

PAGE = "configuration.md"
PLACEHOLDER = re.compile(r"<!--\s*config-fields:\s*(\w+)\s*-->")

#: Documented dataclasses, in page order: name -> module. Training configs extend TrainingArguments
#: and list only the fields they add or whose default they change.
CONFIG_CLASSES = {
    "VITaskConfig": "hf_vitask.config",
    "InstructionFreeConfig": "hf_vitask.config",
    "ModelArguments": "hf_vitask.config",
    "DataArguments": "hf_vitask.config",
    "TSMArguments": "hf_vitask.config",
    "EvalArguments": "hf_vitask.config",
    "RunArguments": "hf_vitask.cli",
}

_CODE_SPAN = re.compile(r"(`[^`]*`)")
_DOCS_PAGE = re.compile(r"\bdocs/(\w+\.md)\b")


def md_text(text: str) -> str:
    """``text`` as one Markdown table cell: characters that Markdown, tables or MathJax would read are
    escaped outside code spans, and ``docs/page.md`` becomes a link to that page."""
    parts = []
    for i, part in enumerate(_CODE_SPAN.split(text.replace("\n", " "))):
        if i % 2:  # a code span: kept as is (the tables extension leaves pipes in code spans alone)
            parts.append(part)
            continue
        for char in "\\*_[]|$":
            part = part.replace(char, "\\" + char)
        part = part.replace("<", "&lt;").replace(">", "&gt;")
        parts.append(_DOCS_PAGE.sub(r"[\1](\1)", part))
    return "".join(parts)


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_class(name: str) -> type:
    return getattr(importlib.import_module(CONFIG_CLASSES[name]), name)


def documented_fields(cls: type) -> list[tuple[dataclasses.Field, object]]:
    """The fields a reference lists, each with the ``TrainingArguments`` default it overrides (or MISSING):
    for a ``TrainingArguments`` subclass only the fields it adds or gives another default."""
    from transformers import TrainingArguments

    base = (
        {f.name: _default(f) for f in dataclasses.fields(TrainingArguments)}
        if issubclass(cls, TrainingArguments)
        else {}
    )
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in base:
            if base[f.name] == _default(f):
                continue
            rows.append((f, base[f.name]))
        else:
            rows.append((f, dataclasses.MISSING))
    return rows


def render_fields_table(name: str) -> str:
    """The Markdown table of one config dataclass's fields."""
    from transformers import TrainingArguments

    cls = config_class(name)
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f, base_default in documented_fields(cls):
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"`{default!r}`"
        meaning = md_text(f.metadata.get("help", ""))
        if "choices" in f.metadata:
            meaning += " Choices: " + ", ".join(f"`{choice!r}`" for choice in f.metadata["choices"]) + "."
        if base_default is not dataclasses.MISSING:
            meaning += f" (`TrainingArguments` default: `{base_default!r}`)"
        lines.append(f"| `{f.name}` | `{_type_name(f.type)}` | {shown} | {meaning} |")
    table = "\n".join(lines)
    if issubclass(cls, TrainingArguments):
        count = len(dataclasses.fields(TrainingArguments))
        table += (
            f"\n\nEvery other field of `transformers.TrainingArguments` ({count} in the installed "
            "transformers) applies as well, with its usual default."
        )
    return table


def render_config_reference() -> str:
    """Every documented dataclass: a heading and its field table."""
    return "\n\n".join(f"## `{name}`\n\n{render_fields_table(name)}" for name in CONFIG_CLASSES)


def expand_placeholders(markdown: str) -> str:
    """Replace each ``<!-- config-fields: NAME -->`` by NAME's table; every class needs exactly one."""
    found = PLACEHOLDER.findall(markdown)
    unknown = sorted(set(found) - set(CONFIG_CLASSES))
    missing = [name for name in CONFIG_CLASSES if found.count(name) != 1]
    if unknown or missing:
        raise ValueError(
            f"{PAGE}: config-fields placeholders for unknown classes {unknown}; "
            f"classes without exactly one placeholder {missing}"
        )
    return PLACEHOLDER.sub(lambda m: render_fields_table(m.group(1)), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == PAGE:
        return expand_placeholders(markdown)
    return markdown
