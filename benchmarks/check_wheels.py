"""Check the wheels in .whl/ against the device: every requirement of every wheel, and the carry limit.

    python -m benchmarks.check_wheels .whl [--image benchmarks/device_image.txt] [--python 3.12.3] [--limit-mib 48]

Each wheel's Requires-Python, and each of its requirements that applies on the device (markers
evaluated for CPython 3.12 on Linux x86_64, no extras), must be met by another carried wheel or by
the device image's packages (benchmarks/device_image.txt), at the version the image lists where it
lists one. Exits 1, saying why, otherwise, or when the wheels take more than a device call can carry.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

HERE = Path(__file__).resolve().parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path) -> dict[str, str | None]:
    """The device image's packages: {canonical name: version, or None where the list gives none}."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonical(name)] = version or None
    return packages


def metadata(wheel: Path) -> tuple[str, str, str | None, list[Requirement]]:
    """A wheel's name, version, Requires-Python and Requires-Dist."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        fields = Parser().parsestr(archive.read(name).decode())
    needs = [Requirement(line) for line in fields.get_all("Requires-Dist") or []]
    return fields["Name"], fields["Version"], fields.get("Requires-Python"), needs


def device_environment(python: str) -> dict[str, str]:
    major_minor = ".".join(python.split(".")[:2])
    return {
        "python_version": major_minor,
        "python_full_version": python,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def problems(folder: Path, image: dict[str, str | None], python: str, limit_mib: float) -> list[str]:
    wheels = sorted(folder.glob("*.whl"))
    read = {wheel: metadata(wheel) for wheel in wheels}
    carried = {canonical(name): version for name, version, _, _ in read.values()}
    environment = device_environment(python)
    found = []
    for wheel, (_, _, requires_python, needs) in read.items():
        if requires_python and Version(python) not in SpecifierSet(requires_python):
            found.append(f"{wheel.name} needs Python {requires_python}, the device has {python}")
        for need in needs:
            if need.marker is not None and not need.marker.evaluate(environment):
                continue  # an extra, or another platform's
            name = canonical(need.name)
            have, source = (
                (carried[name], "the wheels carry") if name in carried else (image.get(name), "the device has")
            )
            if name not in carried and name not in image:
                found.append(f"{wheel.name} needs {need}, which neither the device image nor the wheels have")
            elif have is not None and not need.specifier.contains(have, prereleases=True):
                found.append(f"{wheel.name} needs {need.name}{need.specifier}, {source} {have}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    if total > limit_mib:
        found.append(f"the wheels take {total:.1f} MiB, over the {limit_mib:g} MiB left for them in a device call")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--image", type=Path, default=HERE / "device_image.txt")
    parser.add_argument("--python", default="3.12.3")
    parser.add_argument(
        "--limit-mib", type=float, default=48, help="of the 64 MiB a call carries; the tree takes the rest"
    )
    args = parser.parse_args()
    found = problems(args.folder, image_packages(args.image), args.python, args.limit_mib)
    for wheel in sorted(args.folder.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    if found:
        print("\n".join(f"refused: {problem}" for problem in found), file=sys.stderr)
        sys.exit(1)
    print(f"ok: every requirement of every wheel is on the device or carried, within {args.limit_mib:g} MiB")


if __name__ == "__main__":
    main()
