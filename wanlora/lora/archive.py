"""Replicate's weights archives: the one LoRA inside a tar, extracted by content and by size.

A member's name never becomes a path: the chosen member's bytes are copied to a fixed file
beside the archive, so `../../x.safetensors` in a tar cannot write outside the cache.

Only the bytes extraction really writes count against WANLORA_MAX_LORA_GB, not what a
member claims: a sparse member that declares gigabytes is refused before it is unpacked,
and a member that grows past the limit while unpacking is cut off.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ..errors import LoraFormatError
from ..messages import listing
from ..net import CHUNK, current_transfer, disk_error, too_big
from ..settings import max_lora_bytes
from ..weights.sniff import is_tar

MAX_MEMBERS = 1000  # Replicate's archives hold a handful; past this it is not a LoRA's archive


def is_tar_file(path: Path) -> bool:
    with path.open("rb") as handle:
        return is_tar(handle.read(512))


def unpack_single_lora(archive: Path, label: str) -> Path:
    """The one .safetensors inside a tar (or the one named lora.safetensors), next to the archive."""
    limit = max_lora_bytes()
    target = archive.with_suffix(".extracted")
    try:
        with tarfile.open(archive) as tar:
            member = _the_lora(tar, label)
            if member.size > limit:
                raise too_big(label, member.size)
            written = 0
            packed = tar.extractfile(member)
            assert packed is not None, "_the_lora picks regular files only"
            with packed as data, target.open("wb") as out:
                while block := data.read(CHUNK):
                    current_transfer().check()
                    written += len(block)
                    if written > limit:
                        raise too_big(label, written)
                    out.write(block)
    except tarfile.TarError as exc:
        target.unlink(missing_ok=True)
        raise LoraFormatError(f"{label} is a damaged tar archive: {exc}", label) from exc
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise disk_error(label, archive.parent, exc) from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        archive.unlink(missing_ok=True)
    return target


def _the_lora(tar: tarfile.TarFile, label: str) -> tarfile.TarInfo:
    """The archive's one .safetensors member (or its one lora.safetensors), read member by member:
    an archive of thousands of members is refused once MAX_MEMBERS have been read."""
    members = []
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise LoraFormatError(f"{label} is a tar of more than {MAX_MEMBERS} members, not a LoRA's archive", label)
        if member.isfile() and member.name.endswith(".safetensors"):
            members.append(member)
    if len(members) == 1:
        return members[0]
    named = [m for m in members if os.path.basename(m.name) == "lora.safetensors"]
    if len(named) == 1:
        return named[0]
    found = listing("it holds", [m.name for m in members]) if members else "it holds none"
    raise LoraFormatError(
        f"{label} is a tar that must hold exactly one .safetensors file (or one lora.safetensors); {found}", label
    )
