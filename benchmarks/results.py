"""Benchmark results that survive a killed run: every row is written out the moment it is measured.

`$OUT/gpu_results.json` holds the environment, every section (its status, seconds, peak memory,
rows and notes) and, for the rehearsal, the run's accounting at real shapes; `gpu_results.md`
renders the same as tables. A run stopped at a time limit, or a section stopped at its own,
still leaves both, with every row measured before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def out_dir() -> Path:
    """$OUT (the device tool's folder of files to bring back), else ./gpu-results."""
    folder = Path(os.environ.get("OUT") or "gpu-results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Results:
    def __init__(self, folder: Path, title: str, fresh: bool = False) -> None:
        self.json_path, self.md_path = folder / "gpu_results.json", folder / "gpu_results.md"
        if self.json_path.exists() and not fresh:  # an earlier script of the same run wrote first: add to it
            self.data = json.loads(self.json_path.read_text())
        else:
            self.data = {"title": title, "environment": {}, "sections": []}

    def environment(self, **facts: Any) -> None:
        self.data["environment"].update(facts)
        self.write()

    def start(self, name: str) -> dict:
        """A section, written as running: its rows and notes land in it as they come."""
        section = {"name": name, "status": "running", "seconds": 0.0, "rows": [], "notes": []}
        self.data["sections"].append(section)
        self.write()
        return section

    def row(self, section: dict, row: dict) -> None:
        section["rows"].append(row)
        self.write()

    def note(self, section: dict, note: str) -> None:
        section["notes"].append(note)
        self.write()

    def finish(self, section: dict, status: str, seconds: float, **memory: Any) -> None:
        section.update(status=status, seconds=round(seconds, 1), **memory)
        self.write()

    def add(self, name: str, status: str, seconds: float, rows: list[dict], notes: list[str]) -> None:
        """A whole section at once (the context-parallel script's)."""
        section = self.start(name)
        section.update(rows=rows, notes=notes)
        self.finish(section, status, seconds)

    def accounting(self, account: dict) -> None:
        self.data["accounting"] = account
        self.write()

    def write(self) -> None:
        partial = self.json_path.with_suffix(".json.partial")  # never a half-written file, even if killed
        partial.write_text(json.dumps(self.data, indent=1))
        os.replace(partial, self.json_path)
        self.md_path.write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"# {self.data['title']}", ""]
        lines += [f"- {key}: {value}" for key, value in self.data["environment"].items()]
        for section in self.data["sections"]:
            memory = ", ".join(f"{k} {section[k]}" for k in ("peak GPU GB", "peak host GB") if k in section)
            lines += [
                "",
                f"## {section['name']}: {section['status']} ({section['seconds']} s{', ' if memory else ''}{memory})",
            ]
            lines += [""] + table(section["rows"])
            lines += [f"- {note}" for note in section["notes"]]
        if "accounting" in self.data:
            account = self.data["accounting"]
            lines += ["", "## accounting at real shapes (on meta)", ""] + table(account["sections"])
            lines += [f"- {key}: {value}" for key, value in account.items() if key != "sections"]
        return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
