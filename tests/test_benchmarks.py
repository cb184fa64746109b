"""The GPU run must already work before a device is lent: its CPU rehearsal, its accounting, and the wheel check."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks.check_wheels import canonical, image_packages

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "step-14b-480p",
    "fp8-14b",
    "compile-14b-480p",
    "e2e-14b-480p-4step",
    "swap-14b",
    "step-14b-720p",
    "pinned-bandwidth",
    "a14b-switch",
]


def carried_wheels() -> set[str]:
    lines = (ROOT / "benchmarks" / "device_wheels.txt").read_text().splitlines()
    return {canonical(line.split("#")[0].split("==")[0]) for line in lines if line.split("#")[0].strip()}


def with_dependencies(names: set[str]) -> set[str]:
    """`names` and everything they need as installed here (the image installed its packages with theirs; ours
    may be newer and need others, as huggingface_hub's httpx2)."""
    installed = {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found or name not in installed:
            continue
        found.add(name)
        for line in installed[name].requires or []:
            need = Requirement(line)
            if need.marker is None or need.marker.evaluate({"extra": ""}):
                todo.append(canonical(need.name))
    return found


def device_image_site(folder: Path) -> set[str]:
    """A `sitecustomize` that puts in place of this venv's site-packages a mirror of it holding only what the
    device image has (benchmarks/device_image.txt, with what those need) and the wheels the run carries;
    returns what it hides."""
    image = with_dependencies(set(image_packages(ROOT / "benchmarks" / "device_image.txt")))
    allowed = image | carried_wheels() | {"wanlora"}
    kept, hidden = set(), set()
    for dist in importlib.metadata.distributions():
        entries = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}
        (kept if canonical(dist.metadata["Name"]) in allowed else hidden).update(entries)
    hidden -= kept  # an entry two distributions share (a namespace package) stays if one of them may
    site = Path(sysconfig.get_paths()["purelib"])
    mirror = folder / "site-packages"
    mirror.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in hidden:
            (mirror / entry.name).symlink_to(entry)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path[:] = [{str(mirror)!r} if p == {str(site)!r} else p for p in sys.path]\n"
    )
    return hidden


def test_the_gpu_run_rehearses_every_section_on_the_cpu_with_only_the_devices_packages(tmp_path):
    hidden = device_image_site(tmp_path / "site")
    assert {"imageio_ffmpeg", "ray", "cog"} <= hidden  # what the image lacks is not importable
    path = f"{tmp_path / 'site'}:{ROOT}"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PYTHONPATH": path}
    lacking = subprocess.run([sys.executable, "-c", "import imageio_ffmpeg"], env=env, capture_output=True, text=True)
    assert "No module named 'imageio_ffmpeg'" in lacking.stderr
    # ftfy is carried because diffusers' Wan pipelines clean every prompt with it, as the product does;
    # without it they silently skip that (mojibake stays mojibake)
    clean = "from diffusers.pipelines.wan.pipeline_wan import prompt_clean; print(prompt_clean('caf\\u00c3\\u00a9'))"
    with_ftfy = subprocess.run([sys.executable, "-c", clean], env=env, capture_output=True, text=True)
    (tmp_path / "site" / "site-packages" / "ftfy").unlink()
    without = subprocess.run([sys.executable, "-c", clean], env=env, capture_output=True, text=True)
    assert (with_ftfy.stdout, without.stdout) == ("caf\u00e9\n", "caf\u00c3\u00a9\n"), (with_ftfy, without)
    (tmp_path / "site" / "site-packages" / "ftfy").symlink_to(Path(sysconfig.get_paths()["purelib"]) / "ftfy")
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "terminate called" not in run.stderr and "outlived" not in run.stderr
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    sections = {section["name"].split(":")[0]: section for section in results["sections"]}
    assert list(sections) == [*SECTIONS, "context-parallel"]  # in order of value, the parallel case after
    assert all(section["status"] == "ok" for section in sections.values()), sections
    assert all("peak host GB" in sections[name] for name in SECTIONS)  # memory per section
    step = sections["step-14b-480p"]["rows"]
    assert [row["attention"] for row in step][0] == "sdpa" and "attention" in step[0]["kernel"]  # which kernel ran
    assert any("sdpa-cudnn: not available here" in note for note in sections["step-14b-480p"]["notes"])
    e2e = {row["run"].split(",")[0]: row for row in sections["e2e-14b-480p-4step"]["rows"]}
    assert float(e2e["wanlora generate"]["seconds"]) > 0 and float(e2e["diffusers WanPipeline"]["seconds"]) > 0
    fp8 = {row["case"]: row for row in sections["fp8-14b"]["rows"]}
    assert float(fp8["14B 480p fp8 weight-only"]["error"]) < 0.2
    assert [row["swap"].split(":")[0] for row in sections["swap-14b"]["rows"]] == ["bf16", "fp8"]
    switch = sections["a14b-switch"]["rows"]
    assert float(switch[0]["GB out"]) > 0 and float(switch[1]["GB out"]) == float(switch[2]["GB out"]) == 0
    environment = results["environment"]
    assert {"torch", "diffusers", "SDPA picks", "SDPA kernel that ran", "matmul peak"} <= set(environment)
    markdown = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "| case | attention | s/forward |" in markdown and "## swap-14b: ok" in markdown
    # the real run, accounted at real shapes on meta: 8 minutes, 70 GB of GPU memory, 100 GB of host memory
    account = results["accounting"]
    assert [s["section"] for s in account["sections"]] == SECTIONS
    assert account["run s"] <= account["run limit s"] == 480
    for section in account["sections"]:
        assert section["estimated s"] <= section["limit s"], section
        assert section["peak GPU GB"] < 70 and section["peak host GB"] < 100, section
    assert account["peak GPU GB"] > 40  # the 14B model and the e2e section's encoder and VAE are counted
    assert account["peak host GB"] > 50  # the A14B switch's two 28.6 GB arenas are counted


def test_a_section_stopped_at_its_limit_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    from benchmarks import gpu_step
    from benchmarks.results import Results

    def slow(bench):
        bench.row(case="measured before the limit")
        time.sleep(5)

    monkeypatch.setattr(gpu_step, "SECTIONS", [("slow", slow, 1), ("next", lambda bench: bench.row(case="next"), 5)])
    results = Results(tmp_path, "test", fresh=True)
    bench = gpu_step.Bench(gpu_step.Setup.make(rehearse=True), results)
    gpu_step.run_sections(bench, budget=60)
    written = json.loads((tmp_path / "gpu_results.json").read_text())
    first, second = written["sections"]
    assert first["status"].startswith("failed: SectionTimeout") and first["rows"] == [
        {"case": "measured before the limit"}
    ]
    assert second["status"] == "ok" and second["rows"] == [{"case": "next"}]


def fake_wheel(folder: Path, name: str, version: str, *requires: str, python: str = ">=3.9", size: int = 0) -> None:
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Python: {python}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
        wheel.writestr(f"{name}/padding.bin", os.urandom(size))


@pytest.mark.parametrize(
    ("wheels", "refused"),
    [
        ([("x", "1", "torch>=2.10", "numpy", "huggingface-hub<3,>=1.32")], None),  # the image has them
        ([("x", "1", "torch==2.10.0")], "needs torch==2.10.0, the device has 2.11.0"),
        ([("x", "1", "torch>=2.12; python_version >= '3.10'")], "needs torch>=2.12"),
        ([("x", "1", "torch[opt-einsum]; extra == 'all'", "pywin32; sys_platform == 'win32'")], None),
        ([("x", "1", "imageio-ffmpeg")], "needs imageio-ffmpeg, which neither the device image nor the wheels have"),
        ([("x", "1", "lazy-importer>=0.1; python_version < '3.15'")], "neither the device image nor the wheels"),
        ([("x", "1", "y>=2"), ("y", "2")], None),  # met by another carried wheel
        ([("x", "1", "y>=2"), ("y", "1.5")], "needs y>=2, the wheels carry 1.5"),
        ([("x", "1")], None),
    ],
)
def test_the_wheel_check_follows_every_requirement_of_every_wheel(tmp_path, wheels, refused):
    for name, version, *requires in wheels:
        fake_wheel(tmp_path, name, version, *requires)
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.check_wheels", str(tmp_path), "--limit-mib", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == (1 if refused else 0), run.stderr
    if refused:
        assert refused in run.stderr


def test_the_wheel_check_refuses_another_python_and_too_many_bytes(tmp_path):
    fake_wheel(tmp_path, "x", "1", python=">=3.13", size=2 * 2**20)
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.check_wheels", str(tmp_path), "--limit-mib", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "needs Python >=3.13, the device has 3.12.3" in run.stderr and "over the 1 MiB left for them" in run.stderr


def test_the_carried_wheels_are_what_the_run_imports_beyond_the_image():
    """Every pinned wheel is one the image lacks; the rehearsal shows nothing else is missing."""
    image = image_packages(ROOT / "benchmarks" / "device_image.txt")
    assert carried_wheels() == {"diffusers", "xformers", "ftfy", "wcwidth", "importlib-metadata"}
    assert not carried_wheels() & set(image) and image["torch"] == "2.11.0"


def test_the_cpu_swap_benchmarks_first_touch_runs_on_the_librarys_current_api():
    # the benchmark calls the checkpoint's W0 proof directly: an API change must fail here, not in a long run
    from benchmarks.lora_swap import measure_first_touch

    assert measure_first_touch(repeats=1) > 0


@pytest.mark.parametrize(
    "name", ["overhead", "lora_swap", "cpu_step", "expert_switch", "fp8", "sweep_batch", "lora_retention"]
)
def test_each_cpu_benchmark_starts_as_the_docs_say_to_run_it(name):
    # `python -m benchmarks.NAME --help`: its imports resolve from the repository root
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr
