"""mkdocs hook for the API reference page (``docs/api.md``).

* Every name in ``hf_vitask.__all__`` needs a ``::: hf_vitask.NAME`` block on the page: a new public
  name without one fails the build (and a block for a name that is no longer public does too).
* Sphinx cross-reference roles in the docstrings (``:class:`~hf_vitask.task.TaskSpec```), which
  mkdocstrings renders as ``:class:<code>...</code>``, are shown as plain code, as Sphinx would.
"""

from __future__ import annotations

import importlib
import re

PAGE = "api.md"
BLOCK = re.compile(r"^::: hf_vitask\.(\w+)\s*$", re.M)
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def check_coverage(markdown: str) -> None:
    public = set(importlib.import_module("hf_vitask").__all__)
    documented = BLOCK.findall(markdown)
    missing = sorted(public - set(documented))
    extra = sorted(set(documented) - public)
    twice = sorted({name for name in documented if documented.count(name) > 1})
    if missing or extra or twice:
        raise ValueError(
            f"{PAGE}: public names without a '::: hf_vitask.NAME' block {missing}; "
            f"blocks for names not in hf_vitask.__all__ {extra}; blocks given twice {twice}"
        )


def strip_roles(html: str) -> str:
    return ROLE.sub(
        lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html
    )


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == PAGE:
        check_coverage(markdown)
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    return strip_roles(html) if page.file.src_uri == PAGE else html
