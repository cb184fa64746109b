"""From a LoRA reference to parsed `LoraFile`s, fetched once and kept for fast swaps.

A reference seen recently is not fetched or parsed again: swapping back to it costs no
network. Two things still go back to the source: a local file is re-read when it changed
on disk, and a protected LoRA (one that needed credentials) has its access re-checked
with the origin on every use, with the credentials of the request at hand. Whether a
request may name a local file at all is decided before the memory is looked at.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraFileGone, LoraFormatError
from ..pairs import EVERY_EXPERT
from .fetch import Credentials, FetchedLora, fetch_lora_files
from .layouts import LoraFile, read_lora_files
from .refs import display_ref, parse_ref

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Known:
    role: str  # the expert the file is for: "both", or "high"/"low" in a Wan2.2 pair
    fetched: FetchedLora
    lora: LoraFile
    identity: tuple

    @property
    def current(self) -> bool:
        """Still usable without asking anyone: public, and unchanged if it is a local file."""
        return not self.fetched.protected and (not self.fetched.local or self.identity == _identity(self.fetched.path))


class LoraLoader:
    """Fetches references to verified files and keeps the last few parsed LoRAs."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._known: OrderedDict[str, list[_Known]] = OrderedDict()

    def load(self, ref: str, credentials: Credentials | None = None) -> list[tuple[str, LoraFile]]:
        """The LoRA file(s) `ref` names, each with the expert it is for ("both" unless a Wan2.2 pair: two files,
        or the two halves of one ai-toolkit combo file)."""
        credentials = credentials or Credentials()
        parse_ref(ref, credentials.local_files)  # before the memory: a server's request may not name a file here
        known = self._known.get(ref)
        if not (known and all(k.current for k in known)):
            try:
                known = self._fetch(ref, credentials, known or [])
            except LoraFileGone:  # a cached file removed between its fetch and its reading: fetch it again
                known = self._fetch(ref, credentials, [])
        self._known[ref] = known
        self._known.move_to_end(ref)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)
        return [(k.role, k.lora) for k in known]

    def _fetch(self, ref: str, credentials: Credentials | None, before: list[_Known]) -> list[_Known]:
        started = time.perf_counter()
        found = []
        for role, fetched in fetch_lora_files(ref, credentials):
            identity = _identity(fetched.path)
            same = [k for k in before if k.fetched.path == fetched.path and k.identity == identity]
            if same:  # access confirmed, the same file: nothing to read again, but what the origin says now holds
                for known in same:
                    known.lora.trigger_words = fetched.trigger_words
                    known.lora.civitai_base_model = fetched.base_model
                found.extend(same)
                continue
            label = display_ref(ref) + ("" if role == EVERY_EXPERT else f" ({role}-noise expert)")
            loras = read_lora_files(fetched.path, label=label)
            for lora in loras:
                lora.trigger_words = fetched.trigger_words
                lora.civitai_base_model = fetched.base_model
                logger.debug("read %s (%s) in %.2fs", label, lora.layout, time.perf_counter() - started)
                found.append(_Known(_role(role, lora, len(loras), label), fetched, lora, identity))
        return found


def _role(role: str, lora: LoraFile, halves: int, label: str) -> str:
    """The expert a file (or half of one) is for: a combo file's two halves each go to theirs, as a pair's files do.

    A file with one half only is a file for both that says its expert: lora.placement puts it, with a notice.
    """
    if role == EVERY_EXPERT and (halves == 1 or lora.expert is None):
        return role
    if role == EVERY_EXPERT:
        lora.label += f" ({lora.expert}-noise half)"
        return lora.expert or role
    if halves == 1 and lora.expert in (None, role):
        return role
    said = "both experts" if halves > 1 else f"the {lora.expert}-noise expert"
    raise LoraFormatError(
        f"{label} is the {role}-noise file of a Wan2.2 pair by its name, but its keys are for {said} "
        "(ai-toolkit's transformer_1/transformer_2 names); give that file alone",
        label,
    )


def _identity(path: Path) -> tuple:
    """Changes when the file does: its size and modification time."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ()
    return (str(path), stat.st_size, stat.st_mtime_ns)
