"""LoRA references: what a person typed, turned into the file it names. No torch here."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraNotFound


def resolve_local(ref: str) -> Path:
    """The local file a reference names."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        found = ", ".join(f.name for f in files) or "none"
        raise LoraNotFound(f"{ref} is a folder; name one .safetensors file in it (found: {found})")
    raise LoraNotFound(f"{ref} does not exist: give a path to a .safetensors LoRA file")
