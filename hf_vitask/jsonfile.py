"""Reading the JSON files a bundle or task directory holds, with errors that name the file and the field.

Bundles are copied, hand-edited and downloaded; a wrong type in one of their JSON files must fail
on load with the file, the field and what was expected, not later as an unrelated ``TypeError``
(or worse, as a silently different model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

#: Bound on a size field (token ids, widths, class counts) read from a file.
MAX_SIZE = 10_000_000

_KIND_NAMES = {dict: "an object", list: "a list"}


def read_json(file: str | PathLike, kind: type = dict) -> Any:
    """Parse ``file`` and check that its top level is a ``kind`` (``dict`` or ``list``)."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "it was damaged or edited by hand: restore it from the original bundle"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a UTF-8 text file; restore it from the original bundle") from None
    if not isinstance(data, kind):
        raise ValueError(
            f"{file} must hold {_KIND_NAMES.get(kind, kind.__name__)} at the top level, "
            f"got {_type_name(data)}"
        )
    return data


def _type_name(value: Any) -> str:
    return {
        None.__class__: "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def check_fields(
    data: Mapping,
    fields: Mapping[str, str],
    where: str,
    *,
    required: tuple[str, ...] = (),
    allow_unknown: bool = True,
) -> None:
    """Type-check ``data`` against ``fields`` (name -> kind) and raise one error naming ``where`` and the field.

    Kinds: ``"str"``, ``"size"`` (an integer in [0, MAX_SIZE]), ``"positive"`` (an integer in
    [1, MAX_SIZE]), ``"object"``, ``"sizes"`` (a size or a list of sizes); a trailing ``"?"``
    also allows null. Fields not listed are accepted unless ``allow_unknown=False`` (a file written by
    a newer version may carry more).
    """
    for name in required:
        if name not in data:
            raise ValueError(f"{where}: the field {name!r} is missing")
    if not allow_unknown:
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(fields)}")
    for name, kind in fields.items():
        if name not in data:
            continue
        value = data[name]
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        if not _is_kind(value, kind):
            expected = {
                "str": "a string",
                "size": f"an integer from 0 to {MAX_SIZE}",
                "positive": f"an integer from 1 to {MAX_SIZE}",
                "object": "an object",
                "sizes": "an integer or a list of integers",
            }[kind]
            shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
            raise ValueError(
                f"{where}: {name!r} must be {expected}{' or null' if optional else ''}, "
                f"got {_type_name(value)} {shown}"
            )


def _is_size(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_SIZE


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "size":
        return _is_size(value, 0)
    if kind == "positive":
        return _is_size(value, 1)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "sizes":
        return _is_size(value, 1) or (
            isinstance(value, list) and 0 < len(value) <= 4 and all(_is_size(v, 1) for v in value)
        )
    raise ValueError(f"unknown field kind {kind!r}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
