"""What a sweep and a batch save: `wanlora sweep` against one `wanlora generate` per cell, and
`wanlora batch` against one `wanlora generate` per job, all as a user runs them (fresh processes).

The separate runs are the shell loop people write today: each one imports torch, loads the
model, fetches and merges its LoRAs, and encodes its text again. The ratio is the separate
runs' total wall time over the sweep's or the batch's; on the tiny models it is mostly
start-up, which is what the loop repeats.

    python -m benchmarks.sweep_batch [--frames 9] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.builders import block_linears, write_lora
from wanlora.tiny import tiny_transformer


def wanlora(*args: str) -> float:
    """Seconds of wall time for one `wanlora` command, which must succeed."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wanlora.frontends.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    size = {"num_frames": args.frames, "num_inference_steps": args.steps, "width": 112, "height": 64}
    flags = ["--frames", str(args.frames), "--steps", str(args.steps), "--width", "112", "--height", "64"]

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = tiny_transformer()
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        loras = []
        for n, layout in enumerate(("original", "kohya")):
            loras.append(str(folder / f"lora-{n}.safetensors"))
            write_lora(loras[-1], model, layout, seed=n, targets=block_linears(shapes, [0, 1]))

        strengths = ["0", "0.5", "1", "1.5"]
        sweep = wanlora("sweep", "a fox", "--model", "tiny", "--lora", loras[0], "--strengths", ",".join(strengths),
                        "--seed", "1", *flags, "-o", str(folder / "grid.mp4"))  # fmt: skip
        cells = sum(
            wanlora(
                "generate",
                "a fox",
                "--model",
                "tiny",
                "--lora",
                f"{loras[0]}:{s}",
                "--seed",
                "1",
                *flags,
                "-o",
                str(folder / f"cell-{s}.mp4"),
            )  # fmt: skip
            for s in strengths
        )
        print(f"sweep of 4 cells: {sweep:.1f} s; 4 generate runs: {cells:.1f} s; ratio {cells / sweep:.2f}x")

        plan = [("tiny", 0), ("tiny-t2v-a14b", 0), ("tiny", 1), ("tiny", 0),
                ("tiny-t2v-a14b", None), ("tiny", None), ("tiny-t2v-a14b", 0), ("tiny", 1)]  # fmt: skip
        jobs = [
            {"prompt": "a fox", "model": m, "loras": [] if k is None else [[loras[k], 1.0]], "seed": n, **size}
            for n, (m, k) in enumerate(plan)
        ]
        (folder / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
        batch = wanlora("batch", str(folder / "jobs.jsonl"), "--out", str(folder / "batch"))
        single = sum(
            wanlora(
                "generate",
                "a fox",
                "--model",
                m,
                *([] if k is None else ["--lora", loras[k]]),
                "--seed",
                str(n),
                *flags,
                "-o",
                str(folder / f"job-{n}.mp4"),
            )  # fmt: skip
            for n, (m, k) in enumerate(plan)
        )
        print(f"batch of 8 jobs (2 models, 3 LoRA sets): {batch:.1f} s; 8 generate runs: {single:.1f} s; "
              f"ratio {single / batch:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
