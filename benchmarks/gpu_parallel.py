"""Context-parallel scaling: one transformer forward on 1 GPU, then split across all of them.

Run under torchrun, one process per GPU (benchmarks/gpu.sh does this when it sees several):

    torchrun --standalone --nproc-per-node 8 -m benchmarks.gpu_parallel [--model 14b] [--resolution 720p]

Rank 0 first times the forward alone (the others wait), then every rank times it with the
tokens split by wanlora's auto plan (Ulysses as far as the heads allow, ring for the rest).
It prints the speedup next to the one the reference Wan code publishes for 14B 720p on
H100s (1838 s on 1 GPU, 945 on 2, 497 on 4, 288 on 8). Random weights at the real shapes.
On a CPU machine `--model tiny` runs it with gloo, to check the script itself.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.results import Results, out_dir
from tests.builders import forward_flops, random_transformer, step_inputs
from wanlora.models import SIZE_PRESETS, TINY_ARCH, WAN_1_3B, WAN_14B
from wanlora.parallel import ParallelPlan
from wanlora.parallel.distributed import Parallel, init_distributed, leave_group
from wanlora.runtime.attention import choose_backend, install_backend

ARCHES = {"14b": WAN_14B, "1.3b": WAN_1_3B, "tiny": TINY_ARCH}
PUBLISHED_SECONDS = {1: 1838, 2: 945, 4: 497, 8: 288}  # Wan2.1 14B 720p, 81 frames, H100s


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(ARCHES), default="14b")
    parser.add_argument("--resolution", choices=list(SIZE_PRESETS), default="720p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    arch = ARCHES[args.model]
    width, height = (112, 64) if args.model == "tiny" else SIZE_PRESETS[args.resolution]["16:9"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_transformer(arch, dtype=dtype, device=str(device))
    inputs = step_inputs(arch, args.frames, height, width, dtype=dtype, device=str(device))
    forward = functools.partial(model, **inputs, return_dict=False)

    plan = ParallelPlan.auto(world, arch.num_attention_heads)
    install_backend(model, choose_backend("auto", device, plan.attention_split))
    alone = timed(forward, device, args.repeats) if rank == 0 else 0.0
    dist.barrier()
    Parallel([model], plan, device)
    split = timed(forward, device, args.repeats)
    if rank == 0:
        flops = forward_flops(arch, args.frames, height, width)
        case = f"{args.model} {width}x{height}, {args.frames} frames, {plan.describe()} on {world} x {device.type}"
        rows = [
            {"processes": 1, "s/forward": f"{alone:.2f}", "TFLOP/s": f"{flops / alone / 1e12:.1f}", "speedup": "1.00"},
            {"processes": world, "s/forward": f"{split:.2f}", "speedup": f"{alone / split:.2f}"},
        ]
        if world in PUBLISHED_SECONDS:
            published = PUBLISHED_SECONDS[1] / PUBLISHED_SECONDS[world]
            rows.append(
                {"processes": f"{world}, published (reference code, H100, 14B 720p)", "speedup": f"{published:.2f}"}
            )
        Results(out_dir(), "wanlora GPU run").add(
            f"context-parallel: {case}", "ok", time.perf_counter() - started, rows, []
        )
        print("\n".join(f"{row}" for row in rows))
    del forward, model  # its context-parallel hooks hold the groups: they must go before the groups do
    left = leave_group()
    if left:
        raise SystemExit(f"rank {rank}: the process group outlived its teardown, threads {', '.join(left)} still run")


if __name__ == "__main__":
    main()
