"""Trigger words: what a LoRA's trainer says to put in the prompt. Pure Python.

A Hub model card is read with a YAML loader that refuses aliases: a kilobyte of nested
aliases expands to gigabytes (and minutes) in an ordinary loader.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import yaml

MAX_CARD_BYTES = 256 * 1024  # a model card is a README; past this it is not read
MAX_WORD_CHARS = 200  # a trigger word (or a base-model tag) longer than this is not one: it would flood the logs

TRIGGER_KEYS = ("modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "ss_trigger_words", "instance_prompt")


def trigger_words(metadata: dict[str, str], limit: int = 10) -> list[str]:
    """Trigger words a trainer recorded: explicit phrases first, then kohya's most used tags."""
    words: list[str] = []
    for key in TRIGGER_KEYS:
        value = metadata.get(key, "").strip()
        if value:
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or past the parser: the phrase as it is
                parsed = value
            items = parsed if isinstance(parsed, list) else str(parsed).split(",")
            words += [str(w).strip() for w in items if 0 < len(str(w).strip()) <= MAX_WORD_CHARS]
    if not words and metadata.get("ss_tag_frequency"):
        try:
            frequency: dict[str, int] = defaultdict(int)
            for tags in json.loads(metadata["ss_tag_frequency"]).values():
                for tag, count in tags.items():
                    frequency[tag.strip()] += int(count)
            words = sorted((t for t in frequency if len(t) <= MAX_WORD_CHARS), key=lambda t: (-frequency[t], t))[:3]
        except (AttributeError, TypeError, ValueError, RecursionError):
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


class _NoAliases(yaml.SafeLoader):
    """yaml.SafeLoader, but an alias is an error rather than a copy of what it names."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not read in model cards")
        return super().compose_node(parent, index)


def card_front_matter(text: str) -> dict[str, Any]:
    """A model card's YAML front matter (between its opening `---` lines), or {} when it has none usable."""
    if not text.startswith("---"):
        return {}
    body = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.load(body, Loader=_NoAliases)  # a SafeLoader that refuses aliases
    except yaml.YAMLError:
        return {}  # trigger words are a hint: an unreadable card gives none
    return data if isinstance(data, dict) else {}
