"""Trigger words: what a LoRA's trainer says to put in the prompt. Pure Python."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

TRIGGER_KEYS = ("modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "ss_trigger_words", "instance_prompt")


def trigger_words(metadata: dict[str, str], limit: int = 10) -> list[str]:
    """Trigger words a trainer recorded: explicit phrases first, then kohya's most used tags."""
    words: list[str] = []
    for key in TRIGGER_KEYS:
        value = metadata.get(key, "").strip()
        if value:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            items = parsed if isinstance(parsed, list) else str(parsed).split(",")
            words += [str(w).strip() for w in items if str(w).strip()]
    if not words and metadata.get("ss_tag_frequency"):
        try:
            frequency: dict[str, int] = defaultdict(int)
            for tags in json.loads(metadata["ss_tag_frequency"]).values():
                for tag, count in tags.items():
                    frequency[tag.strip()] += int(count)
            words = sorted(frequency, key=lambda t: (-frequency[t], t))[:3]
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass  # a malformed optional hint: no trigger words, the LoRA still applies
    return list(dict.fromkeys(words))[:limit]


def card_trigger_words(card_data: dict[str, Any], limit: int = 10) -> list[str]:
    """Trigger words from a Hub model card's front matter: `instance_prompt`, then widget texts."""
    words: list[str] = []
    prompt = card_data.get("instance_prompt")
    if isinstance(prompt, str) and prompt.strip():
        words.append(prompt.strip())
    for widget in card_data.get("widget") or []:
        text = widget.get("text") if isinstance(widget, dict) else None
        if isinstance(text, str) and text.strip():
            words.append(text.strip())
    return list(dict.fromkeys(words))[:limit]
