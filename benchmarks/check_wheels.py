"""Check the wheels in .whl/ against the device: its Python and torch, and the carry limit.

    python -m benchmarks.check_wheels .whl [--torch 2.11.0] [--python 3.12] [--limit-mib 64]

Exits 1, saying why, when a wheel needs another torch or Python, or the folder is too big.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def requirements(wheel: Path) -> tuple[str | None, list[Requirement]]:
    """A wheel's Requires-Python and its unconditional Requires-Dist."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    needs = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return metadata.get("Requires-Python"), [r for r in needs if r.marker is None or "extra" not in str(r.marker)]


def problems(folder: Path, torch: str, python: str, limit_mib: float) -> list[str]:
    found = []
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        requires_python, needs = requirements(wheel)
        if requires_python and Version(python) not in SpecifierSet(requires_python):
            found.append(f"{wheel.name} needs Python {requires_python}, the device has {python}")
        for need in needs:
            if need.name == "torch" and not need.specifier.contains(torch, prereleases=True):
                found.append(f"{wheel.name} needs torch{need.specifier}, the device has {torch}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    if total > limit_mib:
        found.append(f"the wheels take {total:.1f} MiB, over the {limit_mib:g} MiB a device call carries")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--torch", default="2.11.0")
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--limit-mib", type=float, default=64)
    args = parser.parse_args()
    found = problems(args.folder, args.torch, args.python, args.limit_mib)
    for wheel in sorted(args.folder.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    if found:
        print("\n".join(f"refused: {problem}" for problem in found), file=sys.stderr)
        sys.exit(1)
    print(f"ok: every wheel fits torch {args.torch} and Python {args.python}, within {args.limit_mib:g} MiB")


if __name__ == "__main__":
    main()
