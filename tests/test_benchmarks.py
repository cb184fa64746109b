"""The GPU run must already work before a device is lent: its CPU rehearsal, and the wheel check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_run_rehearses_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    sections = {section["name"].split(":")[0]: section for section in results["sections"]}
    assert list(sections) == [
        "step-14b-480p",
        "compile-14b-480p",
        "e2e-14b-480p-4step",
        "fp8-14b",
        "a14b-480p-4step",
        "swap-14b",
        "fast-mode-1.3b",
        "cfg-batch-1.3b",
        "step-14b-720p",
        "context-parallel",
    ]  # in order of value, the parallel case after
    assert all(section["status"] == "ok" for section in sections.values()), sections
    assert any(row.get("attention") == "sdpa" for row in sections["step-14b-480p"]["rows"])
    assert "LightX2V" in json.dumps(sections["e2e-14b-480p-4step"]["rows"])
    assert "with 2 switches" in json.dumps(sections["a14b-480p-4step"]["rows"])  # to high first, to low after 2
    fp8 = {row["case"]: row for row in sections["fp8-14b"]["rows"]}
    assert float(fp8["14B 480p fp8 scaled"]["error"]) < 0.2 and "fp8 swap" in json.dumps(fp8)
    markdown = (tmp_path / "gpu_results.md").read_text()
    assert "| case | attention | compile | s/forward |" in markdown and "## swap-14b: ok" in markdown


def fake_wheel(folder: Path, name: str, *requires: str, size: int = 0) -> None:
    metadata = "Metadata-Version: 2.1\nName: x\nVersion: 1\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / name, "w") as wheel:
        wheel.writestr("x-1.dist-info/METADATA", metadata)
        wheel.writestr("x/padding.bin", os.urandom(size))


@pytest.mark.parametrize(
    ("requires", "size", "refused"),
    [
        (["torch>=2.10", "numpy"], 0, None),
        (["torch==2.10.0"], 0, "needs torch==2.10.0, the device has 2.11.0"),
        (["torch>=2.12; python_version >= '3.10'"], 0, "needs torch>=2.12"),
        (["torch[opt-einsum]; extra == 'all'"], 0, None),
        ([], 2 * 2**20, "over the 1 MiB a device call carries"),
    ],
)
def test_the_wheel_check_refuses_what_the_device_cannot_take(tmp_path, requires, size, refused):
    fake_wheel(tmp_path, "x-1-py3-none-any.whl", *requires, size=size)
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "check_wheels.py"), str(tmp_path), "--limit-mib", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == (1 if refused else 0), run.stderr
    if refused:
        assert refused in run.stderr
