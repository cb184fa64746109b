"""Fitting Wan into GPUs: where each component lives, expert switching, offloading, VAE tiling above 480p.

`offload="auto"` (the default) plans from the GPU's memory and the model: the first mode whose
estimate fits wins (`plan_offload`), and the log says which and why:

- "none": everything resident;
- "encoder": everything but the 11.4 GB UMT5 text encoder, which comes to the GPU to encode
  the prompts and leaves when the transformer starts;
- "experts" (Wan2.2 A14B): only the working expert resident, the other in pinned host
  memory, switched at the expert boundary (`ExpertSwitch`; benchmarks/expert_switch.py);
- "model": each component on the GPU only while it runs (diffusers' model offload);
- "group": the transformer's blocks streamed from pinned host memory, one at a time.

Estimates: transformer weights exact (parameter counts at their stored size: bf16, or fp8
block linears plus fp32 scales), the text encoder 11.4 GB, activations and the VAE decode at
the variant's default size and frames rough (`working_bytes`), within 85% of the GPU's memory.
A larger resolution than the default may need the next mode. `wanlora models --memory`
prints what "auto" picks per variant and GPU; the README has that table.

Host memory: the LoRA merges' pristine W0 is read from the memory-mapped checkpoint where it
gives the loaded bits back (wanlora.checkpoint), else copied on first touch: up to the whole
transformer (28.6 GB per 14B expert in bf16, 14.5 GB in fp8) when LoRAs cover every block.
With "experts", the waiting expert's weights sit in pinned host memory too.

LoRA merges work with all of them: weights are rewritten wherever they live.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from .errors import InvalidInput
from .models import CATALOGUE, Architecture, ModelSpec
from .settings import OFFLOAD_MODES

logger = logging.getLogger(__name__)

VAE_TILING_MIN_PIXELS = 832 * 480 + 1  # tile the VAE decode above 480p-sized frames
TEXT_ENCODER_BYTES = 11.4e9  # UMT5-XXL in bf16
VAE_DECODE_BYTES = 3e9  # rough: the decode runs frame by frame, tiled above 480p
USABLE = 0.85  # of the GPU's memory: the CUDA context, the allocator's slack, fragmentation
GPU_SIZES_GB = (24, 48, 80)  # the memory table's GPUs (GiB, as cards are sold): 4090/L4, L40S/A6000, A100/H100


@functools.cache
def transformer_bytes(arch: Architecture, quantized: bool) -> int:
    """One transformer's weights as loaded on a GPU: bf16, or fp8 block linears with fp32 scales (exact)."""
    from .fp8 import quantize_transformer
    from .pipeline import cast_keeping_fp32
    from .tiny import tiny_transformer

    with torch.device("meta"):
        model = tiny_transformer(arch)
    cast_keeping_fp32(model, torch.bfloat16)
    if quantized:
        quantize_transformer(model)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def working_bytes(spec: ModelSpec) -> float:
    """Rough activations at the default size: bf16 token rows, twice the FFN's hidden width (its projection
    and GELU) and six times the model's (q, k, v, the attention output, the norm, the residual), plus the VAE."""
    width, height = next(iter(spec.presets[spec.default_resolution].values()))
    tokens = spec.token_count(width, height, spec.default_frames)
    return tokens * 2 * (2 * spec.arch.ffn_dim + 6 * spec.arch.dim) + VAE_DECODE_BYTES


def plan_offload(spec: ModelSpec, gpu_bytes: float, quantized: bool) -> tuple[str, str]:
    """The fastest mode whose estimate fits `gpu_bytes`, and why, at the variant's default resolution."""
    weights = transformer_bytes(spec.arch, quantized)
    experts = len(spec.experts)
    working = working_bytes(spec)
    candidates = [
        ("none", experts * weights + TEXT_ENCODER_BYTES + working, "everything resident"),
        ("encoder", experts * weights + working, "the text encoder comes to the GPU only to encode"),
        ("experts", weights + TEXT_ENCODER_BYTES + working, "one expert resident at a time"),
        ("model", weights + working, "each component on the GPU only while it runs"),
    ]
    budget = USABLE * gpu_bytes
    for mode, need, why in candidates:
        if (mode != "experts" or experts == 2) and need <= budget:
            return mode, f"{why}: needs ~{need / 1e9:.0f} of {gpu_bytes / 1e9:.0f} GB"
    return "group", f"the transformer's blocks streamed: even one on the GPU needs ~{(weights + working) / 1e9:.0f} GB"


def check_offload(mode: str, device: torch.device, spec: ModelSpec) -> str:
    """`mode` checked against the device and the model, before anything loads; "auto" stays "auto"."""
    if mode not in OFFLOAD_MODES:
        raise InvalidInput("offload", mode, f"one of {', '.join(OFFLOAD_MODES)}")
    if mode in ("auto", "none"):
        return mode
    if device.type != "cuda":
        raise InvalidInput("offload", mode, f"offloading moves weights to a GPU on demand; the model is on {device}")
    if mode == "experts" and len(spec.experts) != 2:
        raise InvalidInput("offload", mode, "a model with two experts (Wan2.2 A14B)")
    return mode


def auto_offload(device: torch.device, spec: ModelSpec, quantized: bool) -> str:
    """offload="auto" once the model is loaded (its weights' size known): planned from the GPU's memory, logged."""
    if device.type != "cuda":
        return "none"
    mode, why = plan_offload(spec, torch.cuda.get_device_properties(device).total_memory, quantized)
    logger.info("offload auto: %s (%s)", mode, why)
    return mode


def memory_table() -> str:
    """What offload="auto" picks for each variant on 24, 48 and 80 GB GPUs, bf16 and fp8, as Markdown."""
    header = "| variant | weights bf16 / fp8 (GB) | " + " | ".join(f"{gb} GB: bf16 / fp8" for gb in GPU_SIZES_GB) + " |"
    lines = [header, "|---|---|" + "---|" * len(GPU_SIZES_GB)]
    for spec in CATALOGUE.values():
        sizes = [len(spec.experts) * transformer_bytes(spec.arch, q) / 1e9 for q in (False, True)]
        picks = [" / ".join(plan_offload(spec, gb * 2**30, q)[0] for q in (False, True)) for gb in GPU_SIZES_GB]
        lines.append(f"| `{spec.name}` | {sizes[0]:.1f} / {sizes[1]:.1f} | " + " | ".join(picks) + " |")
    return "\n".join(lines)


def place(pipe, device: torch.device, mode: str) -> None:
    """Put the pipeline's components on `device`, or arrange for them to come on demand."""
    if mode == "none":
        pipe.to(device)
    elif mode == "encoder":
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "text_encoder":
                component.to(device)
        EncoderShuttle(pipe, device)
    elif mode == "experts":  # the second expert stays in host memory: ExpertSwitch takes it from here
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "transformer_2":
                component.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                apply_group_offloading(
                    getattr(pipe, name),
                    onload_device=device,
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=True,
                )
        apply_group_offloading(pipe.text_encoder, onload_device=device, offload_type="leaf_level", use_stream=True)
        pipe.vae.to(device)
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.image_encoder.to(device)
    logger.info("placement: offload=%s on %s", mode, device)


class EncoderShuttle:
    """The text encoder on the GPU only to encode: it comes on its first call of a generation and
    leaves, back to host memory, when a transformer starts."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.encoder, self.device = pipe.text_encoder, device
        self.encoder.register_forward_pre_hook(lambda *_: self._move(self.device))
        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).register_forward_pre_hook(lambda *_: self._move(torch.device("cpu")))

    def _move(self, device: torch.device) -> None:
        if next(self.encoder.parameters()).device != device:
            self.encoder.to(device)


class ExpertSwitch:
    """Wan2.2 A14B on one GPU: the expert at work on the GPU, the other in pinned host memory.

    A forward pre-hook on each expert brings it to the GPU on its first call of a generation
    (the high-noise expert at the start, the low-noise one at the boundary), so the switch
    happens once each way per generation. The expert that leaves is copied into pinned host
    buffers allocated once; its LoRA state is deferred, and a LoRA change made meanwhile is
    merged when it comes back, on the GPU. Buffers (rotary tables) stay on the GPU.
    """

    def __init__(self, experts: list, device: torch.device) -> None:
        """`experts`: (module, TransformerLoras) pairs, the first of them on `device` now."""
        self.device = device
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        self.active = experts[0][0]
        self.switches = 0
        self.seconds = 0.0  # time spent moving weights, for the logs and benchmarks
        self._loras = {id(module): loras for module, loras in experts}
        for module, loras in experts:
            module.register_forward_pre_hook(lambda mod, args, loras=loras: self.activate(mod, loras))
            if module is not self.active:
                module.to(device)  # its buffers; the weights go to the host just below
                self._offload(module, loras)
        self._sync()

    def activate(self, module: torch.nn.Module, loras) -> None:
        if module is self.active:
            return
        started = time.perf_counter()
        self._offload(self.active, self._loras[id(self.active)])
        for param in module.parameters():
            param.data = param.data.to(self.device, non_blocking=True)
        self._sync()
        self.active = module
        loras.deferred = False
        loras.flush()
        self.switches += 1
        self.seconds += time.perf_counter() - started
        logger.info("expert switch: %.2fs", time.perf_counter() - started)

    def _offload(self, module: torch.nn.Module, loras) -> None:
        copies = self.host.setdefault(id(module), {})
        pin = self.device.type == "cuda"
        for name, param in module.named_parameters():
            if name not in copies:
                copies[name] = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
            if param.data.data_ptr() != copies[name].data_ptr():
                copies[name].copy_(param.data, non_blocking=True)
                param.data = copies[name]
        loras.deferred = True

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def set_vae_tiling(vae, width: int, height: int) -> None:
    """Decode in tiles when the frames are larger than 480p, to bound the VAE's peak memory."""
    if width * height >= VAE_TILING_MIN_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
