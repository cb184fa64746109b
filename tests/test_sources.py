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
    assert readers == {"wanlora/settings.py", "wanlora/parallel/__init__.py"}
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


def test_the_wheel_holds_the_library_and_no_test_scaffolding(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    shutil.copytree(ROOT / "wanlora", source / "wanlora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("wanlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"wanlora", wheel.name.split("-py3")[0] + ".dist-info"}
    code = "".join(zipfile.ZipFile(wheel).read(name).decode() for name in names if name.endswith(".py"))
    for scaffolding in ("def write_lora", "def lora_tensors", "def random_transformer", "from tests", "import pytest"):
        assert scaffolding not in code, scaffolding


def test_no_task_name_is_compared_as_a_string_outside_the_catalogue():
    """What a task decides is asked of its record (`models.Task`: `spec.task.takes_images`, its pipeline class,
    its framing), never by comparing its name, so that a new task is one record and its catalogue rows."""
    import ast

    from wanlora.models import TASKS

    def named(node: ast.AST) -> bool:  # a task's name as a literal, or a model's task (or its name) itself
        literal = isinstance(node, ast.Constant) and node.value in TASKS
        listed = isinstance(node, ast.Tuple | ast.List | ast.Set) and any(named(item) for item in node.elts)
        task = isinstance(node, ast.Attribute) and (node.attr == "task" or named(node.value) and node.attr == "name")
        return literal or listed or task

    found = []
    for path in sorted((ROOT / "wanlora").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == "wanlora/models.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            compared = isinstance(node, ast.Compare) and any(named(n) for n in (node.left, *node.comparators))
            looked_up = isinstance(node, ast.Subscript) and ast.unparse(node.value) == "TASKS"
            if compared or looked_up:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "ask the task's record instead:\n" + "\n".join(found)
