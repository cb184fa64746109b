"""The GPU run's accounting at real shapes: each section's time, peak GPU memory and peak host memory.

The rehearsal (`bash benchmarks/gpu.sh --rehearse`) ends with this, so that the first GPU session
is known to fit before it starts: the whole run in 8 minutes, every section under 70 GB of GPU
memory and 100 GB of host memory (an H100 has 80 GB; the device machine 128 GB of RAM).

GPU memory: the weights each section holds, counted on `meta` (wanlora.runtime.memory's sizes), plus its
largest activations traced on `meta` (tests/tracing.py: live bytes, flash-like attention). Host
memory: the process (ASSUMED["process host GB"]), and the buffers a section makes: the LoRA
merges' host copies of W0 as PyTorch pins them (each tensor rounded up to a power of two), the
expert switch's arenas (exactly their bytes), the bandwidth buffers. Time: each forward's FLOPs at
the throughput the reference Wan code reaches on an H100 (its 14B 720p step), copies at PCIe
rates, page-locking at a modest rate, and a compile and VAE decode allowance (ASSUMED).
"""

from __future__ import annotations

import torch

from benchmarks.gpu_step import RUN_SECONDS, SECTIONS, STARTUP_SECONDS
from tests.builders import block_linears, forward_flops
from tests.tracing import meta_transformer, trace_step, traced_peak, transformer_inputs
from wanlora.models import CATALOGUE
from wanlora.runtime.memory import catalogue_sizes, vae_decode_bytes
from wanlora.weights.host_memory import arena_layout, caching_allocator_bytes

GB = 1e9
ASSUMED = {
    # Wan2.1's published 14B 720p step on one H100 (1838 s for 50 steps with CFG) is ~360 TFLOP/s by
    # forward_flops' count: take 300, for random weights, SDPA, and no tuning.
    "bf16 TFLOP/s": 300,
    "fp8 weight-only slowdown": 1.5,  # the weights dequantized every call
    "host to GPU GB/s": 20,  # PCIe 5.0 x16 from pinned memory, in practice
    "GPU to host GB/s": 20,
    "pageable GB/s": 8,
    "page-locking GB/s": 4,  # cudaHostAlloc / cudaHostRegister of fresh pages
    "host CPU random GB/s": 0.5,  # the LoRA factors, made on the host
    "compile s": 70,  # inductor, one Wan block's graph, on the device's 16 cores
    "VAE decode s (480p, 81 frames)": 15,
    "process host GB": 8,  # Python, torch, CUDA's host side, the libraries
}


def forward_seconds(spec, height: int, width: int, batch: int = 1) -> float:
    return batch * forward_flops(spec.arch, 81, height, width) / (ASSUMED["bf16 TFLOP/s"] * 1e12)


def account() -> dict:
    spec = CATALOGUE["t2v-14b"]
    sizes, fp8_sizes = catalogue_sizes(spec, "bf16"), catalogue_sizes(spec, "fp8")
    model, text, vae = sizes.weights["transformer"], sizes.weights["text_encoder"], sizes.weights["vae"]
    one_block = meta_transformer(spec, "bf16", num_layers=1)
    shapes = {name: tuple(p.shape) for name, p in one_block.named_parameters()}
    linears = [one_block.get_submodule(name).weight for name in block_linears(shapes)]
    layers = spec.arch.num_layers
    fp8_linears = layers * sum(w.numel() * 1 + w.shape[0] * 4 for w in linears)  # fp8 rows and fp32 scales
    biggest = max(w.numel() for w in linears)
    pristine_bf16 = layers * caching_allocator_bytes({str(i): w for i, w in enumerate(linears)})
    pristine_fp8 = layers * sum(
        caching_allocator_bytes({"q": torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="meta")})
        + caching_allocator_bytes({"s": torch.empty(w.shape[0], device="meta")})
        for w in linears
    )
    lora = 2 * layers * sum(32 * (w.shape[0] + w.shape[1]) * 2 for w in linears)  # two rank-32 LoRAs in bf16
    arena = arena_layout({name: p for name, p in meta_transformer(spec).named_parameters()})[1]

    def act(resolution: str, weights: str = "bf16", batch: int = 1) -> int:
        width, height = (832, 480) if resolution == "480p" else (1280, 720)
        if batch == 1:
            return trace_step(spec, "denoise", (width, height, 81), weights, False)
        two = meta_transformer(spec, weights, num_layers=2)
        inputs = transformer_inputs(spec, width, height, 81, batch=batch)
        return traced_peak(lambda: two(**inputs, return_dict=False))

    a480, a720 = act("480p"), act("720p")
    probe = 2 * 32760 * spec.arch.dim * 2  # the attention probe's query and output
    decode = trace_step(spec, "decode", (832, 480, 81), "bf16", False)
    assert decode <= vae_decode_bytes(8, 832, 480, 81, False)  # the plan's formula holds here too
    text_act = trace_step(spec, "text", (832, 480, 81), "bf16", False)
    f480, f720 = forward_seconds(spec, 480, 832), forward_seconds(spec, 720, 1280)
    up, down, lock = (
        ASSUMED["host to GPU GB/s"] * GB,
        ASSUMED["GPU to host GB/s"] * GB,
        ASSUMED["page-locking GB/s"] * GB,
    )
    base_host = ASSUMED["process host GB"] * GB
    bandwidth = 2 * 2**30
    rows = {
        "step-14b-480p": (
            (1 + 5 + 1) * f480 + 2 * f480,  # a warm-up, each of five kernels once, cuDNN's warm-up; CFG's pair once
            model + max(a480 + probe, act("480p", batch=2)),
            base_host,
        ),
        "fp8-14b": (
            f480
            + 2 * f480
            + f480 * ASSUMED["fp8 weight-only slowdown"]
            + 2,  # bf16 once, scaled twice, weight-only once
            model + fp8_linears + act("480p", "fp8") + biggest * 4,
            base_host,
        ),
        "compile-14b-480p": (ASSUMED["compile s"] + 2 * f480, model + a480, base_host),
        "e2e-14b-480p-4step": (
            2 * (4 * f480 + ASSUMED["VAE decode s (480p, 81 frames)"] + 1) + 2,
            model + text + vae + max(a480, decode, text_act),
            base_host + 4 * 81 * 480 * 832 * 3 * 4,  # the two videos, as diffusers and wanlora hand them over
        ),
        "swap-14b": (
            lora / (ASSUMED["host CPU random GB/s"] * GB)
            + (pristine_bf16 / lock + model / down)
            + 3 * model / up  # W0 to the host once, then read back per swap
            + 2
            + (pristine_fp8 / lock + fp8_linears / down)
            + 2 * fp8_linears / up,
            model + fp8_linears + 2 * biggest * 4,  # the merge's fp32 work buffers, one layer's
            base_host + lora + max(pristine_bf16, pristine_fp8),
        ),
        "step-14b-720p": (f720, model + a720, base_host),
        "pinned-bandwidth": (
            bandwidth / lock + 3 * 8 * bandwidth / (ASSUMED["pageable GB/s"] * GB),
            model + bandwidth,
            base_host + 3 * bandwidth,
        ),
        "a14b-switch": (
            2 * (arena / lock + model / down) + 3 * model / up + f480,  # each expert parked once; three switches in
            2 * model,  # the second expert made on the GPU before it is parked
            base_host + 2 * arena,
        ),
    }
    sections = []
    for name, _, limit in SECTIONS:
        seconds, gpu, host = rows[name]
        sections.append(
            {
                "section": name,
                "estimated s": round(seconds, 1),
                "limit s": limit,
                "peak GPU GB": round(gpu / GB, 1),
                "peak host GB": round(host / GB, 1),
            }
        )
    limits = sum(limit for _, _, limit in SECTIONS)
    return {
        "sections": sections,
        "run s": STARTUP_SECONDS + limits,
        "run limit s": RUN_SECONDS,
        "startup s": STARTUP_SECONDS,
        "peak GPU GB": max(s["peak GPU GB"] for s in sections),
        "peak host GB": max(s["peak host GB"] for s in sections),
        "assumed": ASSUMED,
        "fp8 weights GB": round(fp8_sizes.weights["transformer"] / GB, 1),
    }
