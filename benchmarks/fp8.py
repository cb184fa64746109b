"""fp8 weights on the CPU: sizes, LoRA swap speed, host memory for W0, and quality against bf16.

1. Parameter bytes of each variant's transformer(s), bf16 and fp8, counted on the meta device.
2. A LoRA swap (two rank-32 LoRAs on every block linear, A -> B) at the real 1.3B shape and on
   a few real 14B blocks (scaled to 40): wanlora's fp8 merge (sum in fp32, scales from the
   sum, one rounding, written in place) against its bf16 merge, and against the naive way:
   dequantize the whole weight to bf16, add the LoRA in bf16, requantize.
3. Host memory a LoRA set covering every block linear costs for its pristine W0: host copies
   against the memory-mapped checkpoint (anonymous RSS, the process's own memory).
4. Quality, with random weights (which flatter fp8: no outlier channels, unlike trained Wan
   weights, so real errors will be larger): one real-shape block's output, fp8 (weight-only,
   and fp8 x fp8 with per-token or per-tensor activation scales) against bf16 weights; a
   merged LoRA's error after quantization against the LoRA's own size; and the PSNR of fp8
   against full-precision videos on the tiny models.

    python -m benchmarks.fp8 [--swaps 3] [--blocks14b 2]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.lora_swap import cached_loras
from tests.builders import random_transformer, step_inputs
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.models import CATALOGUE, WAN_1_3B, WAN_14B
from wanlora.runtime.memory import transformer_bytes
from wanlora.weights.checkpoint import Checkpoint
from wanlora.weights.formats.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    dequantize,
    fp8_layers,
    quantize_rows,
    quantize_transformer,
)


def median_seconds(step, repeats: int) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------------------- 1. sizes


def sizes() -> None:
    print("\n1. transformer weights, as loaded on a GPU (meta device: exact counts)")
    for spec in CATALOGUE.values():
        bf16, fp8 = (len(spec.experts) * transformer_bytes(spec.arch, w) / 1e9 for w in ("bf16", "fp8"))
        print(f"  {spec.name:14s} bf16 {bf16:6.2f} GB   fp8 {fp8:6.2f} GB   ({fp8 / bf16:.2f}x)")


# ---------------------------------------------------------------------------- 2. swaps


def swap_seconds(model: torch.nn.Module, paths: list[str], repeats: int) -> float:
    loras = [read_lora(path) for path in paths]
    merger = LoraMerger(model)
    merger.write(merger.prepare([(loras[1], 1.0)]))  # warm: the pristine copies
    merger.write(merger.prepare([(loras[0], 1.0)]))
    return median_seconds(lambda i: merger.write(merger.prepare([(loras[(i + 1) % 2], 1.0)])), repeats)


def naive_seconds(model: torch.nn.Module, paths: list[str], repeats: int) -> float:
    """Dequantize, add the LoRA in bf16, requantize: each weight, each swap (unfusing the old one first)."""
    lora = [read_lora(path) for path in paths]
    layers = fp8_layers(model)

    def swap(i: int) -> None:
        old, new = lora[i % 2], lora[(i + 1) % 2]
        for name, layer in layers.items():
            weight = dequantize(layer.weight, layer.weight_scale, torch.bfloat16)
            for file, sign in ((old, -1.0), (new, 1.0)):
                delta = file.deltas.get(name)
                if delta is not None:
                    up, down = delta.gemm_factors(torch.bfloat16, weight.device)
                    weight.addmm_(up, down, alpha=sign * delta.alpha_scale)
            quantized, scale = quantize_rows(weight)
            layer.weight.copy_(quantized)
            layer.weight_scale.copy_(scale)

    return median_seconds(swap, repeats)


def swaps(arch, layers: int, tag: str, repeats: int, scale: float) -> None:
    model = random_transformer(arch, layers)
    paths = cached_loras(model, tag)
    bf16 = swap_seconds(model, paths, repeats)
    quantize_transformer(model)
    fp8 = swap_seconds(model, paths, repeats)
    naive = naive_seconds(model, paths, repeats)
    print(f"  fp8 swap (exact)            {fp8 * scale:8.2f} s   {fp8 / bf16:5.2f}x the bf16 swap")
    print(f"  bf16 swap (exact)           {bf16 * scale:8.2f} s")
    print(f"  naive dequant-add-requant   {naive * scale:8.2f} s   {naive / fp8:5.2f}x the fp8 swap (and drifts)")
    del model
    gc.collect()


# ---------------------------------------------------------------------------- 3. host memory


def anon_rss() -> int:
    """The process's own resident memory (not the page cache's), after handing freed heap back to the OS."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def host_memory(blocks: int) -> None:
    from diffusers import WanTransformer3DModel

    print(f"\n3. host memory for W0 of a LoRA on every block linear (1.3B shape, {blocks} blocks, bf16 file)")
    folder = Path(tempfile.mkdtemp(prefix="wanlora-bench-ckpt-"))
    random_transformer(WAN_1_3B, blocks).save_pretrained(folder)
    paths = cached_loras(random_transformer(WAN_1_3B, blocks), f"1.3b-{blocks}")
    lora = read_lora(paths[0])
    for label, with_file in (("host copies", False), ("mapped checkpoint", True)):
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        for param in model.parameters():  # in memory of its own, as on a GPU
            param.data = param.data.clone()
        gc.collect()
        before = anon_rss()
        merger = LoraMerger(model, Checkpoint.of_folder(folder, torch.bfloat16) if with_file else None)
        merger.write(merger.prepare([(lora, 1.0)]))
        merger._workspace(torch.device("cpu"), 0).zero_()  # the merge's own buffer, the same either way
        grown = anon_rss() - before
        touched = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in merger.pristine)
        print(f"  {label:18s} +{grown / 2**20:8.1f} MiB anonymous memory (touched weights: {touched / 2**20:.1f} MiB)")
        del model, merger
        gc.collect()


# ---------------------------------------------------------------------------- 4. quality


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def block_error(arch, tokens_frames: int) -> None:
    model = random_transformer(arch, 1, dtype=torch.float32)
    block = model.blocks[0]
    inputs = step_inputs(arch, tokens_frames, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        hidden = model.patch_embedding(inputs["hidden_states"]).flatten(2).transpose(1, 2)
        embedded = model.condition_embedder(inputs["timestep"], inputs["encoder_hidden_states"], None)
        _, timestep_proj, text, _ = embedded
        rotary = model.rope(inputs["hidden_states"])
        projection = timestep_proj.unflatten(1, (6, -1))
        reference = block(hidden, text, projection, rotary)
        for matmul in ("weight-only", "scaled"):
            quantized = random_transformer(arch, 1, dtype=torch.float32).blocks[0]
            quantized.load_state_dict(block.state_dict())
            quantize_transformer(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([quantized])}), matmul)
            got = quantized(hidden, text, projection, rotary)
            print(f"  {arch.dim}-wide block, fp8 {matmul:12s} relative error {relative_error(got, reference):.4f}")
        bf16 = random_transformer(arch, 1, dtype=torch.float32).blocks[0]
        bf16.load_state_dict(block.state_dict())
        bf16.to(torch.bfloat16)
        got = bf16(hidden.bfloat16(), text.bfloat16(), projection.bfloat16(), rotary)
        error = relative_error(got, reference)
        print(f"  {arch.dim}-wide block, bf16 weights   relative error {error:.4f} (for scale)")


def activation_scaling() -> None:
    """fp8 x fp8 with per-token against per-tensor activation scales, one real-width linear, outlier tokens."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(1536, 8960)
    linear.weight.data = torch.randn(8960, 1536, generator=generator) * 0.02
    x = torch.randn(1024, 1536, generator=generator)
    x[::97] *= 30  # a few large-magnitude tokens, as transformers' activations have
    want = linear(x)
    layer = Fp8Linear.of(linear, "scaled")
    per_token = relative_error(layer(x), want)
    scale = torch.full((x.shape[0], 1), float(x.abs().max()) / FP8_MAX)  # one scale for every token
    quantized = (x / scale).to(FP8)
    per_tensor = torch._scaled_mm(
        quantized, layer.weight.t(), scale_a=scale, scale_b=layer.weight_scale.view(1, -1), out_dtype=torch.float32
    )
    per_tensor = relative_error(per_tensor + linear.bias, want)
    print(f"  activations scaled per token: relative error {per_token:.4f}; per tensor: {per_tensor:.4f}")


def merged_delta_error() -> None:
    generator = torch.Generator().manual_seed(1)
    w0 = torch.randn(1536, 1536, generator=generator) * 0.02
    up, down = torch.randn(1536, 32, generator=generator), torch.randn(32, 1536, generator=generator)
    for strength in (0.1, 0.5, 1.0):
        delta = strength * (up @ down) * (0.02 / 32)
        exact = w0 + delta
        quantized, scale = quantize_rows(exact)
        error = (dequantize(quantized, scale) - exact).norm() / delta.norm()
        size = float(delta.norm() / w0.norm())
        print(f"  LoRA delta at {size:.2f} of |W0|: quantization error {error:.3f} of |delta|")


def tiny_psnr() -> None:
    from PIL import Image

    from wanlora import WanLoraPipeline

    image = Image.new("RGB", (64, 64), (200, 90, 40))
    for model in ("tiny", "tiny-i2v", "tiny-t2v-a14b", "tiny-i2v-a14b", "tiny-ti2v-5b"):
        extra = {"image": image} if "i2v" in model else {}
        request = {"seed": 3, "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 4, **extra}
        full = WanLoraPipeline.from_pretrained(model).generate("a fox", **request).frames.astype(float)
        fp8 = WanLoraPipeline.from_pretrained(model, quantize="fp8").generate("a fox", **request).frames.astype(float)
        mse = max(float(np.mean((fp8 - full) ** 2)), 1e-12)
        print(f"  {model:14s} PSNR fp8 vs full precision {10 * np.log10(255**2 / mse):6.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=3, help="timed swaps per method (median reported)")
    parser.add_argument("--blocks14b", type=int, default=2, help="real-shaped 14B blocks to extrapolate from")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {capability}")
    sizes()
    print("\n2. LoRA swap, Wan2.1 1.3B shape: 30 blocks, 300 linears")
    swaps(WAN_1_3B, WAN_1_3B.num_layers, "1.3b", args.swaps, 1.0)
    print(f"   Wan2.1 14B shape: {args.blocks14b} real blocks, x{WAN_14B.num_layers / args.blocks14b:g} to 40")
    swaps(WAN_14B, args.blocks14b, f"14b-{args.blocks14b}", args.swaps, WAN_14B.num_layers / args.blocks14b)
    host_memory(blocks=6)
    print("\n4. quality (random weights: they flatter fp8)")
    block_error(WAN_1_3B, 5)
    activation_scaling()
    merged_delta_error()
    tiny_psnr()


if __name__ == "__main__":
    main()
