"""From a LoRA reference to a parsed `LoraFile`, fetched once and kept for fast swaps.

A reference seen recently is not fetched or parsed again: swapping back to it costs no
network. Two things still go back to the source: a local file is re-read when it changed
on disk, and a protected LoRA (one that needed credentials) has its access re-checked
with the origin on every use, with the credentials of the request at hand.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .fetch import Credentials, FetchedLora, fetch_lora
from .formats import LoraFile, read_lora
from .refs import display_ref

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Known:
    fetched: FetchedLora
    lora: LoraFile
    identity: tuple


class LoraLoader:
    """Fetches references to verified files and keeps the last few parsed LoRAs."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._known: OrderedDict[str, _Known] = OrderedDict()

    def load(self, ref: str, credentials: Credentials | None = None) -> LoraFile:
        known = self._known.get(ref)
        unchanged = known is not None and (not known.fetched.local or known.identity == _identity(known.fetched.path))
        if unchanged and not known.fetched.protected:
            self._known.move_to_end(ref)
            return known.lora
        started = time.perf_counter()
        fetched = fetch_lora(ref, credentials)
        identity = _identity(fetched.path)
        if known and known.fetched.path == fetched.path and known.identity == identity:
            lora = known.lora  # access confirmed, the same file: nothing to read again
        else:
            lora = read_lora(fetched.path, label=display_ref(ref))
            lora.trigger_words = fetched.trigger_words
            logger.info(
                "LoRA %s: %s, rank %s, %d parameters, trigger words %s, fetched and read in %.2fs",
                display_ref(ref),
                lora.layout,
                "/".join(map(str, lora.ranks)) or "-",
                len(lora.deltas),
                ", ".join(lora.trigger_words) or "none found",
                time.perf_counter() - started,
            )
        self._known[ref] = _Known(fetched, lora, identity)
        self._known.move_to_end(ref)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)
        return lora


def _identity(path: Path) -> tuple:
    """Changes when the file does: its size and modification time."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ()
    return (str(path), stat.st_size, stat.st_mtime_ns)
