"""LoRA swap speed on the CPU: wanlora's set_loras against diffusers' unfuse/unload/load/fuse cycle.

Setup: the real Wan2.1-1.3B transformer shape (30 blocks, dim 1536, ffn 8960) with random
bf16 weights, and two rank-32 LoRAs on all 300 block linears, written once to a cache
folder. Each side swaps A -> B -> A ... in one process; the floor is a plain copy of the
touched weights. Every figure is a median, and every ratio is against a baseline measured in
the same run:
- the bf16 swap, against diffusers' cycle (goal: at least 5x faster) and the copy floor;
- the same swap with one of two cores kept busy by a spinning process this benchmark starts,
  against its own idle time (goal: at most 2.5x; half the cores should cost about 2x);
- the fp8 swap (the same model quantized, the same LoRAs), against the bf16 swap (goal: 2x);
- the first touch: proving one 13824x5120 weight's W0 from its checkpoint file;
- a 14B figure, extrapolated from a few real-shaped 14B blocks.
Then the same again in a second process with torch, oneDNN and numba held to AVX2 (`AVX2` below), as
on a CPU with no native bf16 GEMM (`--isa native` or `--isa avx2` runs one alone).

    python -m benchmarks.lora_swap [--swaps 4] [--blocks14b 2] [--isa both|native|avx2]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import WanPipeline

from tests.builders import block_linears, lora_tensors, random_transformer
from wanlora.lora.merge import native_gemm_is_faster
from wanlora.models import WAN_1_3B, WAN_14B, tiny_spec
from wanlora.pipeline import WanLoraPipeline
from wanlora.tiny import flow_scheduler
from wanlora.weights.formats.fp8 import quantize_transformer

CACHE = Path(tempfile.gettempdir()) / "wanlora-bench-loras"
# torch's kernels, oneDNN's and numba's (the fp8 conversions, weights/formats/fp8_cpu.py), each told to use AVX2 at most
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "",  # the named CPU's own features, not this one's
}


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


def wanlora_swapper(model, paths):
    """A pipeline around `model`, warm (both files parsed, W0 held), and its swap A <-> B."""
    from diffusers.hooks import HookRegistry

    from wanlora.runtime.guidance import BatchedGuidance

    HookRegistry.check_if_exists_or_initialize(model).remove_hook(BatchedGuidance.name)  # an earlier pipeline's
    wan = WanPipeline(None, None, None, flow_scheduler(), transformer=model)
    pipe = WanLoraPipeline(wan, tiny_spec(), torch.device("cpu"))
    pipe.set_loras([(paths[1], 1.0)])
    pipe.set_loras([(paths[0], 1.0)])
    return pipe, lambda i: pipe.set_loras([(paths[(i + 1) % 2], 1.0)])


def time_wanlora(model, paths, swaps: int) -> float:
    pipe, swap = wanlora_swapper(model, paths)
    seconds = median_seconds(swap, swaps)
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


@contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core for the duration, as a Ray actor, ffmpeg or a neighbour does."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # running, and scheduled
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def measure_1_3b(swaps: int) -> dict[str, float]:
    model = random_transformer(WAN_1_3B, WAN_1_3B.num_layers)
    paths = cached_loras(model, "1.3b")
    results = {"copy": time_copy_floor(model, swaps), "wanlora": time_wanlora(model, paths, swaps)}
    pipe, swap = wanlora_swapper(model, paths)
    with busy_core():
        results["wanlora busy"] = median_seconds(swap, swaps)
    pipe.set_loras([])
    del pipe, swap
    results["diffusers"] = time_diffusers(model, paths, swaps)
    quantize_transformer(model)  # the same weights in fp8, the same LoRAs
    results["wanlora fp8"] = time_wanlora(model, paths, swaps)
    del model
    gc.collect()
    return results


def measure_first_touch(repeats: int = 3) -> float:
    """Seconds to prove one 14B FFN weight's W0 (13824x5120 bf16) from its checkpoint file, page cache warm,
    on one thread as a merge runs it (lora/spread.py)."""
    from safetensors.torch import save_file

    from wanlora.weights import formats
    from wanlora.weights.checkpoint import Checkpoint, CheckpointFile, TensorRef
    from wanlora.weights.spread import single_threaded_ops

    weight = torch.randn(WAN_14B.ffn_dim, WAN_14B.dim).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        save_file({"w": weight}, str(path))
        checkpoint = Checkpoint({"w": TensorRef(CheckpointFile(path), "w")}, torch.bfloat16)
        stored = formats.full_precision().weight(weight)
        checkpoint.pristine("w", stored)  # the page cache warm, as after loading

        def prove(_: int) -> None:
            assert checkpoint.pristine("w", stored) is not None

        with single_threaded_ops():
            return median_seconds(prove, repeats)


def measure_14b(blocks: int, swaps: int) -> dict[str, float]:
    model = random_transformer(WAN_14B, blocks)
    paths = cached_loras(model, f"14b-{blocks}")
    results = {
        "copy": time_copy_floor(model, swaps),
        "wanlora": time_wanlora(model, paths, swaps),
        "diffusers": time_diffusers(model, paths, swaps),
    }
    del model
    gc.collect()
    return results


def report_1_3b(r: dict[str, float]) -> None:
    print("\nWan2.1 1.3B shape: 30 blocks, 300 linears")
    print(f"  wanlora swap (bf16)            {r['wanlora']:8.2f} s")
    print(f"  diffusers unfuse..fuse         {r['diffusers']:8.2f} s")
    print(f"  copy floor (touched)           {r['copy']:8.2f} s")
    print(f"  diffusers / wanlora            {r['diffusers'] / r['wanlora']:8.2f} x   (goal >= 5)")
    print(f"  wanlora / copy floor           {r['wanlora'] / r['copy']:8.2f} x")
    print(f"  wanlora, one core kept busy    {r['wanlora busy']:8.2f} s")
    print(f"  busy / idle                    {r['wanlora busy'] / r['wanlora']:8.2f} x   (goal <= 2.5)")
    print(f"  wanlora swap (fp8)             {r['wanlora fp8']:8.2f} s")
    print(f"  fp8 / bf16                     {r['wanlora fp8'] / r['wanlora']:8.2f} x   (goal <= 2)")


def report_14b(r: dict[str, float], blocks: int) -> None:
    scale = WAN_14B.num_layers / blocks
    print(f"\nWan2.1 14B shape: {blocks} real blocks, x{scale:g} to 40")
    print(f"  wanlora set_loras swap         {r['wanlora'] * scale:8.2f} s")
    print(f"  diffusers unfuse..fuse         {r['diffusers'] * scale:8.2f} s")
    print(f"  copy floor (touched)           {r['copy'] * scale:8.2f} s")
    print(f"  diffusers / wanlora            {r['diffusers'] / r['wanlora']:8.2f} x")


def run(isa: str, swaps: int, blocks14b: int) -> None:
    torch.set_grad_enabled(False)
    path = "one bf16 GEMM" if native_gemm_is_faster(torch.bfloat16, "cpu") else "fp32, rounded once"
    print(f"\n=== {isa}: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}: bf16 merges in {path} (measured at first use)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the start: {load:.2f} (other processes on this machine make every figure noisier)")
    report_1_3b(measure_1_3b(swaps))
    first = measure_first_touch()
    dim, ffn = WAN_14B.dim, WAN_14B.ffn_dim
    weights = WAN_14B.num_layers * (8 * dim * dim + 2 * dim * ffn) / (dim * ffn)  # a 14B's block linears, in these
    print(f"\nfirst touch: W0 of one 13824x5120 bf16 weight proven from its file in {first:.3f} s")
    print(f"  a 14B's 400 block linears ({weights:.0f} of these): {first * weights:.1f} s on one thread; merges")
    print(f"  spread it over the cores: ~{first * weights / torch.get_num_threads():.1f} s here")
    report_14b(measure_14b(blocks14b, swaps), blocks14b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=4, help="timed swaps per method (median reported)")
    parser.add_argument("--blocks14b", type=int, default=2, help="real-shaped 14B blocks to extrapolate from")
    parser.add_argument("--isa", choices=("both", "native", "avx2"), default="both", help="which CPU paths to run")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # read at start: a new process
        env = {**os.environ, **AVX2}
        command = [sys.executable, "-m", "benchmarks.lora_swap", "--isa", "avx2"]
        command += ["--swaps", str(args.swaps), "--blocks14b", str(args.blocks14b)]
        sys.exit(subprocess.run(command, env=env).returncode)
    run(args.isa if args.isa != "both" else "native", args.swaps, args.blocks14b)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GiB")
    if args.isa == "both":
        sys.stdout.flush()
        command = [sys.executable, "-m", "benchmarks.lora_swap", "--isa", "avx2"]
        command += ["--swaps", str(args.swaps), "--blocks14b", str(args.blocks14b)]
        subprocess.run(command, env={**os.environ, **AVX2}, check=True)


if __name__ == "__main__":
    main()
