"""House rules that keep one source of truth: the environment is read in one place, and
nothing the project says points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted((ROOT / "wanlora").rglob("*.py")) + [ROOT / "predict.py"]
READS = re.compile(r"os\.environ\.get\(|os\.getenv\(|in os\.environ\b|os\.environ\[[^\]]+\](?!\s*=)")


def test_the_environment_is_read_in_settings_and_torchruns_protocol_in_parallel():
    readers = {path.relative_to(ROOT).as_posix() for path in CODE if READS.search(path.read_text())}
    assert readers == {"wanlora/settings.py", "wanlora/parallel.py"}
    for name in re.findall(
        r'_raw\("([A-Z_]+)"\)|_number\(\s*"([A-Z_]+)"|_flag\("([A-Z_]+)"\)', (ROOT / "wanlora/settings.py").read_text()
    ):
        variable = next(n for n in name if n)
        elsewhere = [p for p in CODE if p.name != "settings.py" and f'"{variable}"' in p.read_text()]
        assert not elsewhere, (variable, elsewhere)


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|(?<!docs/)lora-formats\.md|\bsection [0-9]\b|\((?:[A-J])\)\s*$")
    for path in [*CODE, *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*"))]:
        if path.is_file() and path != Path(__file__):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not outside.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
    assert (ROOT / "docs" / "lora-formats.md").is_file()
