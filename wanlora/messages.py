"""Messages of bounded length: a list in an error shows a few items and counts the rest."""

from __future__ import annotations

MAX_ITEM_CHARS = 120


def listing(headline: str, items: list[str], limit: int = 10) -> str:
    """`headline: a, b, c and N more`, each item cut to MAX_ITEM_CHARS."""
    shown = ", ".join(item if len(item) <= MAX_ITEM_CHARS else item[:MAX_ITEM_CHARS] + "..." for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{headline}: {shown}{more}"


def plural(count: int, word: str) -> str:
    """`1 LoRA`, `2 LoRAs`, `0 GPUs`: a count and its noun, never `LoRA(s)`."""
    return f"{count} {word}{'' if count == 1 else 's'}"
