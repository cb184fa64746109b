"""The docs site's tables that are written from the code, rendered when the site is built (mkdocs.yml's
`hooks:`), so that a new catalogue variant touches `wanlora/models.py` and no page.

A page holds a marker where a table goes, `<!-- generated: wanlora models -->` or
`<!-- generated: wanlora models --memory -->`, with a line under it for the reader of the raw file saying
where the table comes from; the build puts in its place what that command prints, from the same library
functions the CLI calls."""

from __future__ import annotations

import re
from collections.abc import Callable

from mkdocs.exceptions import PluginError


def _catalogue() -> str:
    from wanlora.models import catalogue_markdown

    return catalogue_markdown()


def _memory() -> str:
    from wanlora.runtime.memory import memory_table  # plans every variant on every GPU size: only where asked

    return memory_table() + "\n"  # as the CLI prints it


GENERATED: dict[str, Callable[[], str]] = {
    "wanlora models": _catalogue,
    "wanlora models --memory": _memory,
}
MARKER = re.compile(r"^<!-- generated: (.*?) -->\n", re.M)


def render_generated(markdown: str) -> str:
    """`markdown` with each marker followed by the table its command prints (a blank line after it, so the
    line under the marker stays a paragraph of its own)."""

    def table(marker: re.Match[str]) -> str:
        command = marker.group(1)
        if command not in GENERATED:
            raise PluginError(f"docs: no generated table for {marker.group(0).strip()!r}; known: {sorted(GENERATED)}")
        return marker.group(0) + GENERATED[command]() + "\n"

    return MARKER.sub(table, markdown)


def on_page_markdown(markdown: str, **_: object) -> str:
    """mkdocs' page_markdown event: called with the page, config and files too, which the tables do not need."""
    return render_generated(markdown)
