"""GPU step benchmark at the real Wan2.1 shapes with random weights (no network needed).

Prints one table: seconds per transformer forward and per denoising step (two forwards
with classifier-free guidance) for 1.3B at 480p and 14B at 480p and 720p, 81 frames, for
each installed attention backend, with torch.compile off and on; the effective TFLOP/s
against the bf16 matmul peak measured first; peak GPU memory. Then fast mode and CFG
batching at 1.3B, the LoRA swap at 14B, and the 4-step accelerated 14B 480p time end to
end (random UMT5 text encoder and VAE at their real shapes). Run it through
benchmarks/gpu.sh.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from wanlora.attention import BACKENDS, install_backend, unavailable_reason
from wanlora.fastmode import apply_fast_mode
from wanlora.lora.formats import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.models import CATALOGUE, WAN_1_3B, WAN_14B
from wanlora.testing import forward_flops, lora_tensors, random_transformer, step_inputs

CUDA = torch.device("cuda")
FRAMES = 81


def cuda_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b, repeats=10, warmup=3)
    return 2 * 8192**3 / seconds / 1e12


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if unavailable_reason(name, CUDA) is None]


def bench_case(name, model, arch, height, width, peak, repeats, compile_too, rows):
    inputs = step_inputs(arch, FRAMES, height, width, dtype=torch.bfloat16, device="cuda")
    flops = forward_flops(arch, FRAMES, height, width)
    for backend in installed_backends():
        try:
            install_backend(model, backend)
            torch.cuda.reset_peak_memory_stats()
            seconds = cuda_time(lambda: model(**inputs, return_dict=False), repeats)
        except Exception as exc:  # a kernel that rejects these shapes is a result to report, not a crash
            rows.append((name, backend, "off", f"failed: {type(exc).__name__}", "", "", "", ""))
            continue
        rows.append(row(name, backend, "off", seconds, flops, peak))
    if compile_too:
        install_backend(model, "sdpa")
        started = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=True)
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        compile_seconds = time.perf_counter() - started
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(lambda: model(**inputs, return_dict=False), repeats, warmup=0)
        rows.append(row(name, "sdpa", f"on ({compile_seconds:.0f}s)", seconds, flops, peak))


def row(name, backend, compiled, seconds, flops, peak):
    tflops = flops / seconds / 1e12
    gib = torch.cuda.max_memory_allocated() / 2**30
    return (name, backend, compiled, f"{seconds:.2f}", f"{2 * seconds:.2f}", f"{tflops:.0f}",
            f"{100 * tflops / peak:.0f}%", f"{gib:.1f}")  # fmt: skip


def bench_fast_mode(model, repeats: int) -> str:
    inputs = step_inputs(WAN_1_3B, FRAMES, 480, 832, dtype=torch.bfloat16, device="cuda")

    def ten_steps():
        model._reset_stateful_cache()
        latents = inputs["hidden_states"]
        for step in range(10):
            t = torch.full_like(inputs["timestep"], 1000.0 * (1 - step / 10))
            with model.cache_context("cond"):
                latents = latents - 0.05 * model(**{**inputs, "hidden_states": latents, "timestep": t},
                                                 return_dict=False)[0]  # fmt: skip

    off = cuda_time(ten_steps, repeats)
    apply_fast_mode(model, CATALOGUE["t2v-1.3b"], "balanced", steps=10)
    on = cuda_time(ten_steps, repeats)
    apply_fast_mode(model, CATALOGUE["t2v-1.3b"], "off", steps=10)
    return f"fast mode, 1.3B 480p, 10 steps: off {off:.2f} s, balanced {on:.2f} s ({on / off:.2f}x; random weights)"


def bench_cfg_batch(model, repeats: int) -> str:
    """One guided step as two batch-one forwards, or as one batch-of-two forward (cfg_batch)."""
    single = step_inputs(WAN_1_3B, FRAMES, 480, 832, dtype=torch.bfloat16, device="cuda")
    pair = step_inputs(WAN_1_3B, FRAMES, 480, 832, batch=2, dtype=torch.bfloat16, device="cuda")
    two = cuda_time(lambda: [model(**single, return_dict=False) for _ in range(2)], repeats)
    one = cuda_time(lambda: model(**pair, return_dict=False), repeats)
    return f"CFG step, 1.3B 480p: two forwards {two:.2f} s, one batch of two {one:.2f} s ({one / two:.2f}x)"


def bench_lora_swap(model, folder: Path) -> str:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    loras = []
    for seed in (1, 2):
        tensors, _ = lora_tensors(shapes, "original", rank=32, seed=seed, dtype=torch.bfloat16)
        save_file(tensors, folder / f"{seed}.safetensors")
        loras.append(read_lora(folder / f"{seed}.safetensors"))
    merger = LoraMerger(model)
    merger.apply([(loras[1], 1.0)])
    times = []
    for i in range(4):
        torch.cuda.synchronize()
        started = time.perf_counter()
        merger.apply([(loras[i % 2], 1.0)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    merger.apply([])
    return f"LoRA swap, 14B, two rank-32 LoRAs on all 400 block linears: {statistics.median(times):.2f} s (median)"


def bench_accelerated(model, repeats: int) -> str:
    """4 steps at guidance 1 (one pass each), plus UMT5-XXL encoding and the VAE decode."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                              num_layers=24, feed_forward_proj="gated-gelu"))  # fmt: skip
    encoder = encoder.to_empty(device=CUDA).to(torch.bfloat16)
    for param in encoder.parameters():
        param.data.normal_(0, 0.02)
    vae = AutoencoderKLWan().to(CUDA).eval()
    tokens = torch.randint(0, 256384, (1, 512), device=CUDA)
    inputs = step_inputs(WAN_14B, FRAMES, 480, 832, dtype=torch.bfloat16, device="cuda")
    latents = torch.randn(1, 16, 21, 60, 104, device=CUDA)

    def end_to_end():
        encoder(tokens)
        for _ in range(4):
            model(**inputs, return_dict=False)
        vae.decode(latents)

    seconds = cuda_time(end_to_end, repeats)
    return f"4-step accelerated 14B 480p, 81 frames, end to end: {seconds:.1f} s (goal < 15 s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    peak = matmul_peak()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s")
    print(f"attention backends installed: {', '.join(installed_backends())}")
    rows: list[tuple] = []
    extras = []
    small = random_transformer(WAN_1_3B, device="cuda")
    bench_case("1.3B 480p", small, WAN_1_3B, 480, 832, peak, args.repeats, not args.no_compile, rows)
    extras.append(bench_fast_mode(small, args.repeats))
    extras.append(bench_cfg_batch(small, args.repeats))
    del small
    torch.cuda.empty_cache()
    big = random_transformer(WAN_14B, device="cuda")
    bench_case("14B 480p", big, WAN_14B, 480, 832, peak, args.repeats, not args.no_compile, rows)
    bench_case("14B 720p", big, WAN_14B, 720, 1280, peak, 1, False, rows)
    with tempfile.TemporaryDirectory() as folder:
        extras.append(bench_lora_swap(big, Path(folder)))
    extras.append(bench_accelerated(big, 1))

    header = ("case", "attention", "compile", "s/forward", "s/step (CFG)", "TFLOP/s", "of peak", "peak GiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))
    print("\n".join(extras))


if __name__ == "__main__":
    main()
