"""Which Wan2.2 expert a LoRA file is for: its name (high_noise_model, ..._LOW...) or its request.

A file or a request for EVERY_EXPERT goes on every transformer the model has: the one of
Wan2.1 and TI2V-5B, both of Wan2.2 A14B. A Wan2.2 pair is two files, "high" and "low".
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import LoraNotFound
from .messages import listing

EVERY_EXPERT = "both"
EXPERT_TARGETS = (EVERY_EXPERT, "high", "low")


def expert_of(filename: str | Path) -> str | None:
    """The Wan2.2 expert a file's name says it is for (high_noise_model, ..._HIGH..., ...HighNoise...), or None."""
    name = Path(filename).name
    name = re.sub(r"(High|Low)(?=Noise)", r"_\1_", name).lower()  # "HighNoise" / "LowNoise" as words
    said = [expert for expert in ("high", "low") if re.search(rf"(^|[^a-z]){expert}([^a-z]|$)", name)]
    return said[0] if len(said) == 1 else None


def choose_files(files: list[str], where: str, label: str) -> list[tuple[str, str]]:
    """The one .safetensors among `files`, or their high/low pair; anything else lists them to pick from."""
    if len(files) == 1:
        return [(EVERY_EXPERT, files[0])]
    roles = {expert_of(f): f for f in files}
    if len(files) == 2 and set(roles) == {"high", "low"}:
        return [("high", roles["high"]), ("low", roles["low"])]
    if not files:
        raise LoraNotFound(f"{label}: {where} has no .safetensors file", label)
    raise LoraNotFound(
        listing(
            f"{label}: {where} has several .safetensors files and no single high/low pair; pick one file, or "
            f"the folder of one pair, as {where}/NAME",
            files,
            limit=20,
        ),
        label,
    )
