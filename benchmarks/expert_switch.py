"""Wan2.2 A14B on the CPU: what an expert switch moves, and a LoRA swap on one expert against diffusers'.

Setup: two experts at Wan2.1/2.2 14B's real block shapes (a few blocks, scaled to 40),
random bf16 weights, and rank-32 LoRAs on every block linear.

1. The switch. `offload="experts"` keeps the waiting expert in pinned host memory and
   copies it in (and the other out) at the boundary. A CPU has no device to copy to, so
   this measures the host side, the same `copy_` into preallocated buffers, and estimates
   the GPU switch from link bandwidths: 28.6 GB each way, one after the other.
2. A swap on one expert: wanlora re-merges the high-noise expert from its own pristine
   copies while the low-noise one keeps its LoRA untouched; diffusers' cycle for the same
   change is unfuse, unload, load and fuse on `transformer`.

    python -m benchmarks.expert_switch [--blocks 2] [--swaps 4]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time

import torch
from diffusers import WanPipeline

from tests.builders import random_transformer
from wanlora.models import WAN_14B, tiny_spec
from wanlora.pipeline import WanLoraPipeline
from wanlora.tiny import flow_scheduler

from .lora_swap import cached_loras, median_seconds, time_diffusers

# Sustained host<->GPU copy rates for pinned memory, per direction (GB/s): what the links
# give in practice, below their nominal 32 / 64 / 450 GB/s.
LINKS = {"PCIe 4.0 x16": 25.0, "PCIe 5.0 x16 (H100/H200 PCIe)": 50.0, "NVLink-C2C (GH200)": 400.0}
EXPERT_PARAMS = 14_288_491_584  # one A14B expert (models.CATALOGUE["t2v-a14b"].published_params)


def host_copy_seconds(model: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """(seconds, GB) to copy every weight into preallocated host buffers, as ExpertSwitch's offload does."""
    params = [p.data for p in model.parameters()]
    buffers = [torch.empty_like(p) for p in params]
    size = sum(p.numel() * p.element_size() for p in params) / 1e9
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for buffer, param in zip(buffers, params, strict=True):
            buffer.copy_(param)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), size


def time_wanlora_one_expert(high, low, paths, keep: str, swaps: int) -> tuple[float, float]:
    """(swap on the high-noise expert only, swap on both), while `keep` stays on the low-noise expert."""
    wan = WanPipeline(None, None, None, flow_scheduler(), transformer=high, transformer_2=low, boundary_ratio=0.875)
    pipe = WanLoraPipeline(wan, tiny_spec(kind="t2v-a14b"), torch.device("cpu"))
    for path in (paths[1], paths[0]):  # warm: parse the files, make both experts' pristine copies
        pipe.set_loras([(path, 1.0), (keep, 1.0, "low")])
        pipe.set_loras([(path, 1.0, "high"), (keep, 1.0, "low")])
    one = median_seconds(lambda i: pipe.set_loras([(paths[(i + 1) % 2], 1.0, "high"), (keep, 1.0, "low")]), swaps)
    both = median_seconds(lambda i: pipe.set_loras([(paths[i % 2], 1.0)]), swaps)
    pipe.set_loras([])
    return one, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="real-shaped 14B blocks per expert")
    parser.add_argument("--swaps", type=int, default=4, help="timed swaps per method (median reported)")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("wanlora").setLevel(logging.WARNING)
    torch.set_grad_enabled(False)
    scale = WAN_14B.num_layers / args.blocks
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, {args.blocks} real 14B blocks per "
        f"expert, x{scale:g} to 40"
    )

    high, low = random_transformer(WAN_14B, args.blocks), random_transformer(WAN_14B, args.blocks)
    seconds, gb = host_copy_seconds(high, args.swaps)
    expert_gb = EXPERT_PARAMS * 2 / 1e9
    print(f"\nthe switch: one expert is {expert_gb:.1f} GB in bf16; it moves out and the other in")
    print(f"  host copy into preallocated buffers   {gb / seconds:8.1f} GB/s  ({gb:.2f} GB in {seconds:.3f} s)")
    print(f"  the same for a whole expert           {expert_gb / (gb / seconds):8.2f} s   (measured rate)")
    for link, rate in LINKS.items():
        print(f"  estimate, {link:<29} {2 * expert_gb / rate:8.2f} s   ({rate:g} GB/s each way)")

    paths = cached_loras(high, f"14b-{args.blocks}")
    keep = cached_loras(low, f"14b-{args.blocks}", rank=16)[0]
    one, both = time_wanlora_one_expert(high, low, paths, keep, args.swaps)
    del high, low
    gc.collect()  # the experts and their pristine copies: diffusers' side runs in the same memory
    diffusers = time_diffusers(random_transformer(WAN_14B, args.blocks), paths, args.swaps)
    print("\na LoRA swap on the high-noise expert (the low-noise one keeps its own LoRA)")
    print(f"  wanlora, one expert                   {one * scale:8.2f} s")
    print(f"  wanlora, both experts                 {both * scale:8.2f} s")
    print(f"  diffusers unfuse..fuse, transformer   {diffusers * scale:8.2f} s")
    print(f"  diffusers / wanlora (one expert)      {diffusers / one:8.2f} x")
    print(f"  both / one (wanlora)                  {both / one:8.2f} x   (2 when the other expert costs nothing)")


if __name__ == "__main__":
    main()
