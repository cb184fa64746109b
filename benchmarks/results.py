"""Benchmark results that survive a killed run: each section is written out the moment it ends.

`$OUT/gpu_results.json` holds every section (its status, seconds and rows); `gpu_results.md`
renders the same as tables. A run stopped at its time limit still leaves both, complete up
to the last section that finished.
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

    def add(self, name: str, status: str, seconds: float, rows: list[dict], notes: list[str]) -> None:
        self.data["sections"].append(
            {"name": name, "status": status, "seconds": round(seconds, 1), "rows": rows, "notes": notes}
        )
        self.write()

    def write(self) -> None:
        self.json_path.write_text(json.dumps(self.data, indent=1))
        self.md_path.write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"# {self.data['title']}", ""]
        lines += [f"- {key}: {value}" for key, value in self.data["environment"].items()]
        for section in self.data["sections"]:
            lines += ["", f"## {section['name']}: {section['status']} ({section['seconds']} s)", ""]
            rows = section["rows"]
            if rows:
                columns = list(dict.fromkeys(key for row in rows for key in row))
                lines.append("| " + " | ".join(columns) + " |")
                lines.append("|" + "---|" * len(columns))
                lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
            lines += [f"- {note}" for note in section["notes"]]
        return "\n".join(lines) + "\n"
