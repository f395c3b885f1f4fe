"""mkdocs hook: the home page opens with the project README, so the two never drift apart.

``docs/index.md`` holds the placeholder ``<!-- readme -->`` and the table of pages;
:func:`readme_for_site` gives the README with its links made relative to ``docs/`` and its own
"Documentation" section left out (the table of pages replaces it).
"""

from __future__ import annotations

import re
from pathlib import Path

PAGE = "index.md"
PLACEHOLDER = "<!-- readme -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_for_site(text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    # the README's pointer to the documentation: the page itself lists the pages
    text = re.sub(r"^## Documentation\n.*?(?=^## |\Z)", "", text, flags=re.S | re.M)
    return re.sub(r"\]\(docs/", "](", text).rstrip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        raise ValueError(f"{PAGE} lost its {PLACEHOLDER} placeholder")
    return markdown.replace(PLACEHOLDER, readme_for_site())
