"""Fitting Wan into GPUs: expert switching, model and group offloading, and VAE tiling above 480p.

GPU memory per variant, bf16. Estimates: weight sizes are exact (parameter counts x 2
bytes), activations and workspace are rough; `benchmarks/gpu.sh` measures real peaks.

| variant (81 frames; TI2V 121) | "none" | "experts" | "model" | "group" |
|---|---|---|---|---|
| t2v-1.3b 480p | ~12 GB (2.8 transformer + 11.4 UMT5 + VAE) | - | ~8 GB | ~5 GB |
| t2v-14b 480p | ~48 GB | - | ~37 GB (transformer + activations) | ~12 GB |
| t2v-14b 720p | ~62 GB | - | ~50 GB | ~24 GB |
| i2v-14b 720p | ~66 GB | - | ~53 GB | ~26 GB |
| t2v-a14b / i2v-a14b 480p | ~77 GB (2 x 28.6 experts) | ~48 GB | ~37 GB | ~12 GB |
| t2v-a14b / i2v-a14b 720p | ~91 GB | ~62 GB | ~50 GB | ~24 GB |
| ti2v-5b 720p | ~32 GB (10 transformer + 11.4 UMT5 + VAE) | - | ~22 GB | ~14 GB |

Host memory holds the LoRA pristine copies of the weights a LoRA set touches: up to the
whole transformer (28.6 GB per 14B expert in bf16, so 57 GB for both A14B experts, 10 GB
for TI2V-5B) when LoRAs cover every block, about half that for attention-only LoRAs. With
"experts", the waiting expert's weights (28.6 GB) sit in pinned host memory too.

- "auto" (the default) is "experts" for Wan2.2 A14B on a GPU, else "none".
- "experts" keeps only the active A14B expert on the GPU, the other in pinned host memory,
  and swaps them at the expert boundary, and back when the next generation starts (see
  `ExpertSwitch`; benchmarks/expert_switch.py estimates a switch per link).
- "model" moves each component (text encoder, transformer, VAE) to the GPU only while it
  runs, so the 11 GB text encoder leaves the GPU right after encoding.
- "group" streams the transformer's blocks from pinned host memory one at a time,
  overlapping copies with compute.

LoRA merges work with all of them: weights are rewritten wherever they live.
"""

from __future__ import annotations

import logging
import time

import torch

from .errors import InvalidInput
from .settings import OFFLOAD_MODES

logger = logging.getLogger(__name__)

VAE_TILING_MIN_PIXELS = 832 * 480 + 1  # tile the VAE decode above 480p-sized frames


def resolve_offload(mode: str, device: torch.device, two_experts: bool) -> str:
    """`mode` checked against the device and the model; "auto" picks expert switching where it applies."""
    if mode not in OFFLOAD_MODES:
        raise InvalidInput("offload", mode, f"one of {', '.join(OFFLOAD_MODES)}")
    if mode == "auto":
        return "experts" if two_experts and device.type == "cuda" else "none"
    if mode != "none" and device.type != "cuda":
        raise InvalidInput("offload", mode, f"offloading moves weights to a GPU on demand; the model is on {device}")
    if mode == "experts" and not two_experts:
        raise InvalidInput("offload", mode, "a model with two experts (Wan2.2 A14B)")
    return mode


def place(pipe, device: torch.device, mode: str) -> None:
    """Put the pipeline's components on `device`, or arrange for them to come on demand."""
    if mode == "none":
        pipe.to(device)
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
