"""LoRA swap speed: wanlora's set_loras against diffusers' unfuse/unload/load/fuse cycle.

Setup: the real Wan2.1-1.3B transformer shape (30 blocks, dim 1536, ffn 8960) with random
bf16 weights, and two rank-32 LoRAs on all 300 block linears, written once to a cache
folder. Each side swaps A -> B -> A ... in one process; the floor is a plain copy of the
touched weights. A 14B figure is extrapolated from a few real-shaped 14B blocks.

    python -m benchmarks.lora_swap [--swaps 4] [--blocks14b 2]
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanPipeline

from tests.builders import block_linears, lora_tensors, random_transformer
from wanlora.lora.merge import native_gemm_is_faster
from wanlora.models import WAN_1_3B, WAN_14B, tiny_spec
from wanlora.pipeline import WanLoraPipeline
from wanlora.tiny import flow_scheduler

CACHE = Path(tempfile.gettempdir()) / "wanlora-bench-loras"


def cached_loras(model: torch.nn.Module, tag: str, rank: int = 32) -> list[str]:
    """Two rank-32 LoRAs (original-Wan names, layout A) on every block linear, written once."""
    from safetensors.torch import save_file

    CACHE.mkdir(exist_ok=True)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    paths = []
    for seed in (1, 2):
        path = CACHE / f"{tag}-r{rank}-{seed}.safetensors"
        if not path.exists():
            tensors, _ = lora_tensors(shapes, "original", rank=rank, seed=seed, dtype=torch.bfloat16)
            save_file(tensors, path)
        paths.append(str(path))
    return paths


def median_seconds(step, swaps: int) -> float:
    times = []
    for i in range(swaps):
        started = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_wanlora(model, paths, swaps: int) -> float:
    wan = WanPipeline(None, None, None, flow_scheduler(), transformer=model)
    pipe = WanLoraPipeline(wan, tiny_spec(), torch.device("cpu"))
    pipe.set_loras([(paths[1], 1.0)])  # warm: parse both files, make the pristine copies
    pipe.set_loras([(paths[0], 1.0)])
    seconds = median_seconds(lambda i: pipe.set_loras([(paths[(i + 1) % 2], 1.0)]), swaps)
    pipe.set_loras([])
    return seconds


def time_diffusers(model, paths, swaps: int) -> float:
    pipe = WanPipeline(None, None, None, None, transformer=model)
    names = ["a", "b"]
    pipe.load_lora_weights(paths[0], adapter_name="a")
    pipe.set_adapters(["a"], [1.0])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)

    def swap(i: int) -> None:
        pipe.unfuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        which = (i + 1) % 2
        pipe.load_lora_weights(paths[which], adapter_name=names[which])
        pipe.set_adapters([names[which]], [1.0])
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)

    seconds = median_seconds(swap, swaps)
    pipe.unfuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return seconds


def time_copy_floor(model, swaps: int) -> float:
    names = {f"{m}.weight" for m in block_linears({n: tuple(p.shape) for n, p in model.named_parameters()})}
    params = [p for n, p in model.named_parameters() if n in names]
    copies = [p.detach().clone() for p in params]

    def copy(_: int) -> None:
        for param, source in zip(params, copies, strict=True):
            param.copy_(source)

    return median_seconds(copy, swaps)


def measure(arch, num_layers: int, tag: str, swaps: int) -> dict[str, float]:
    model = random_transformer(arch, num_layers)
    paths = cached_loras(model, tag)
    results = {
        "copy": time_copy_floor(model, swaps),
        "wanlora": time_wanlora(model, paths, swaps),
        "diffusers": time_diffusers(model, paths, swaps),
    }
    del model
    gc.collect()
    return results


def report(title: str, r: dict[str, float], scale: float = 1.0) -> None:
    print(f"\n{title}")
    print(f"  wanlora set_loras swap     {r['wanlora'] * scale:8.2f} s")
    print(f"  diffusers unfuse..fuse     {r['diffusers'] * scale:8.2f} s")
    print(f"  copy floor (touched)       {r['copy'] * scale:8.2f} s")
    print(f"  diffusers / wanlora        {r['diffusers'] / r['wanlora']:8.2f} x   (goal >= 5)")
    print(f"  wanlora / copy floor       {r['wanlora'] / r['copy']:8.2f} x   (goal <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=4, help="timed swaps per method (median reported)")
    parser.add_argument("--blocks14b", type=int, default=2, help="real-shaped 14B blocks to extrapolate from")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 weights, rank-32 LoRAs")
    path = "one bf16 GEMM" if native_gemm_is_faster(torch.bfloat16, "cpu") else "fp32, rounded once"
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}: merges in {path} (measured at first use)")

    small = measure(WAN_1_3B, WAN_1_3B.num_layers, "1.3b", args.swaps)
    report("Wan2.1 1.3B shape: 30 blocks, 300 linears", small)

    big = measure(WAN_14B, args.blocks14b, f"14b-{args.blocks14b}", args.swaps)
    report(
        f"Wan2.1 14B shape: {args.blocks14b} real blocks, x{WAN_14B.num_layers / args.blocks14b:g} to 40",
        big,
        WAN_14B.num_layers / args.blocks14b,
    )

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
