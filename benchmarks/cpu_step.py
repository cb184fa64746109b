"""Transformer step cost on CPU: wanlora's settings against plain diffusers, measured in one run.

Two shapes: the tiny test model, and the real Wan2.1-1.3B transformer (30 blocks, dim
1536) with random bf16 weights at a small latent (5 frames, 240x416) so that it fits a
CPU. For each it prints ratios (lower is faster):

- merged LoRA (wanlora) vs the same rank-32 LoRA as unfused diffusers/PEFT adapters;
- guidance <= 1 (one pass) vs classifier-free guidance in two passes;
- cond+uncond batched into one forward vs two forwards;
- torch.compile of the repeated blocks vs eager (compile time printed apart);
- fast mode (First Block Cache) vs off over an 8-step loop, with the block runs skipped.

    python -m benchmarks.cpu_step [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import WanPipeline
from diffusers.hooks import FirstBlockCacheConfig
from safetensors.torch import save_file

from tests.builders import lora_tensors, random_transformer, step_inputs
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.models import TINY_ARCH, WAN_1_3B

SHAPES = {
    "tiny": (TINY_ARCH, torch.float32, (9, 64, 112)),
    "1.3B": (WAN_1_3B, torch.bfloat16, (5, 240, 416)),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward(model, inputs):
    return lambda: model(**inputs, return_dict=False)[0]


def lora_file(model, folder: Path) -> str:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tensors, _ = lora_tensors(
        shapes, "original", rank=min(32, shapes["blocks.0.attn1.to_q.weight"][0]), dtype=model.dtype
    )
    path = folder / "lora.safetensors"
    save_file(tensors, path)
    return str(path)


def bench_shape(name: str, repeats: int, compile_blocks: bool, folder: Path) -> dict[str, float]:
    arch, dtype, (frames, height, width) = SHAPES[name]
    arch = replace(arch, rope_max_seq_len=1024)
    model = random_transformer(arch, dtype=dtype)
    one = step_inputs(arch, frames, height, width, batch=1, dtype=dtype)
    two = step_inputs(arch, frames, height, width, batch=2, dtype=dtype)
    ratios: dict[str, float] = {}

    base = median_time(forward(model, one), repeats)
    path = lora_file(model, folder)
    merger = LoraMerger(model)
    merger.write(merger.prepare([(read_lora(path), 1.0)]))
    merged = median_time(forward(model, one), repeats)
    merger.write(merger.prepare([]))
    pipe = WanPipeline(None, None, None, None, transformer=model)
    pipe.load_lora_weights(path, adapter_name="style")
    unfused = median_time(forward(model, one), repeats)
    pipe.unload_lora_weights()
    ratios["merged LoRA / diffusers unfused LoRA"] = merged / unfused
    ratios["merged LoRA / no LoRA"] = merged / base

    ratios["guidance<=1 (1 pass) / CFG (2 passes)"] = base / (2 * base)
    batched = median_time(forward(model, two), repeats)
    ratios["CFG batched (1 forward, batch 2) / 2 forwards"] = batched / (2 * base)

    runs = {"n": 0}
    handle = model.blocks[-1].ffn.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))

    def eight_steps() -> None:
        model._reset_stateful_cache()  # each loop is a fresh video, as the pipeline does per call
        latents = one["hidden_states"].clone()
        for step in range(8):
            t = torch.full_like(one["timestep"], 1000.0 * (1 - step / 8))
            with model.cache_context("cond"):
                out = model(**{**one, "hidden_states": latents, "timestep": t}, return_dict=False)[0]
            latents = latents - 0.05 * out

    plain = median_time(eight_steps, repeats)
    runs["n"] = 0
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    cached = median_time(eight_steps, repeats)
    model.disable_cache()
    handle.remove()
    ratios["fast mode (FBC 0.1, 8 steps) / off"] = cached / plain
    full_steps = runs["n"] / (repeats + 1)

    if compile_blocks:
        started = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=True)
        forward(model, one)()
        compile_seconds = time.perf_counter() - started
        ratios["torch.compile (inductor) / eager"] = median_time(forward(model, one), repeats) / base
        print(f"  {name}: compiling the blocks took {compile_seconds:.1f} s")
    print(f"  {name}: {base * 1000:.1f} ms per eager forward; fast mode ran {full_steps:.1f} of 8 steps in full")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        results = {name: bench_shape(name, args.repeats, not args.no_compile, Path(folder)) for name in SHAPES}
    print(f"\n{'ratio (lower is faster)':<48}" + "".join(f"{name:>10}" for name in SHAPES))
    for key in results["tiny"]:
        print(f"{key:<48}" + "".join(f"{results[name].get(key, float('nan')):>10.3f}" for name in SHAPES))


if __name__ == "__main__":
    main()
