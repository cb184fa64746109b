"""wanlora's generate() against a plain diffusers WanPipeline: same components, same arguments.

Both run in one process on a tiny model, alternating, so that machine noise hits both
alike. The ratio is wanlora's median time over diffusers'; the goal is 1.05 or less.
`--model tiny-t2v-a14b` measures Wan2.2's two experts (the switch and its bookkeeping).

    python -m benchmarks.overhead [--model tiny] [--runs 15] [--frames 17] [--steps 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from wanlora import WanLoraPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a tiny stand-in: tiny, tiny-t2v-a14b, ...")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--height", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    ours = WanLoraPipeline.from_pretrained(args.model)
    plain = ours.diffusers_pipeline  # the very same diffusers WanPipeline and components
    plain.set_progress_bar_config(disable=True)
    common = {"width": args.width, "height": args.height, "num_frames": args.frames}

    def run_wanlora() -> None:
        ours.generate(
            "a fox in the snow",
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            flow_shift=3.0,
            seed=1,
            fps=16,
            progress=False,
            **common,
        )

    def run_diffusers() -> None:
        plain(
            prompt="a fox in the snow",
            negative_prompt="",
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="np",
            **common,
        )

    run_wanlora(), run_diffusers()  # warm-up
    times: dict[str, list[float]] = {"wanlora": [], "diffusers": []}
    for _ in range(args.runs):
        for name, run in (("wanlora", run_wanlora), ("diffusers", run_diffusers)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)

    ours_s, theirs_s = statistics.median(times["wanlora"]), statistics.median(times["diffusers"])
    print(f"{args.model}, {args.width}x{args.height}, {args.frames} frames, {args.steps} steps, {args.runs} runs each")
    print(f"  diffusers WanPipeline  {theirs_s * 1000:8.1f} ms (median)")
    print(f"  wanlora generate()     {ours_s * 1000:8.1f} ms (median)")
    print(f"  overhead ratio         {ours_s / theirs_s:8.3f}   (goal <= 1.05)")


if __name__ == "__main__":
    main()
