"""Putting a pipeline's components where the memory plan (wanlora.runtime.memory) says, and moving them there.

Host buffers that feed the GPU are `HostArena`s (wanlora.weights.host_memory): one plain
allocation of exactly the bytes they hold, registered with CUDA as pinned pages.

Two movers keep copies to what changed:
- `EncoderStream`: the text encoder lives in a pinned arena and comes to the GPU one block at a
  time while it encodes; its weights never change, so leaving costs nothing.
- `ExpertSwitch`: Wan2.2 A14B's two experts, one on the GPU at a time. Each keeps its host copy
  while it works, and on leaving copies back only the weights a LoRA merge changed meanwhile.
"""

from __future__ import annotations

import logging
import time

import torch

from ..weights.host_memory import HostArena
from .memory import blocks_of

logger = logging.getLogger(__name__)

STREAM = "_wanlora_stream"  # the attribute of a text encoder that streams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.data for name, param in module.named_parameters()}


class EncoderStream:
    """The text encoder on the GPU only while it encodes: its embedding and final norm for the whole call,
    its blocks one at a time. Host copies in a pinned arena; nothing is ever copied back."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.params = dict(encoder.named_parameters())
        self.arena = HostArena(_tensors(encoder), pin=device.type == "cuda")
        self.moved = 0  # bytes brought to the GPU, for the logs and benchmarks
        for name, param in self.params.items():
            param.data = self.arena.views[name]
        for buffer in encoder.buffers():  # small, and read every call: they stay on the GPU
            buffer.data = buffer.data.to(device)
        blocks = blocks_of(encoder)
        where = next(name for name, module in encoder.named_modules() if module is blocks)
        in_blocks = {id(p) for p in blocks.parameters()}
        rest = [n for n, p in self.params.items() if id(p) not in in_blocks]
        self.hooks = [
            encoder.register_forward_pre_hook(lambda *_: self._bring(rest)),
            encoder.register_forward_hook(lambda *_: self._drop(rest)),
        ]
        for index, block in enumerate(blocks):
            names = [f"{where}.{index}.{n}" for n, _ in block.named_parameters()]
            self.hooks.append(block.register_forward_pre_hook(lambda *_, names=names: self._bring(names)))
            self.hooks.append(block.register_forward_hook(lambda *_, names=names: self._drop(names)))
        setattr(encoder, STREAM, self)  # a pipeline that shares this encoder finds it streaming already

    @classmethod
    def of(cls, encoder: torch.nn.Module, device: torch.device) -> EncoderStream:
        """The encoder's stream: the one it has (a shared encoder), or a new one."""
        stream = getattr(encoder, STREAM, None)
        return stream if stream is not None and stream.device == device else cls(encoder, device)

    def close(self, encoder: torch.nn.Module) -> None:
        """Stop streaming: the weights stay in host memory, where a new placement takes them from."""
        for hook in self.hooks:
            hook.remove()
        setattr(encoder, STREAM, None)

    def _bring(self, names: list[str]) -> None:
        for name in names:
            view = self.arena.views[name]
            self.params[name].data = view.to(self.device, non_blocking=True)
            self.moved += view.numel() * view.element_size()

    def _drop(self, names: list[str]) -> None:
        for name in names:  # the GPU copy goes back to the allocator, in stream order
            self.params[name].data = self.arena.views[name]


def _same_terms(a: list | None, b: list | None) -> bool:
    """Whether two LoRA plans give a weight the same terms: the merge's result depends on nothing else."""
    return [(id(t.delta), t.strength) for t in a or []] == [(id(t.delta), t.strength) for t in b or []]


class ExpertSwitch:
    """Wan2.2 A14B on one GPU: the expert at work on the GPU, the other in pinned host memory.

    A forward pre-hook on each expert brings it to the GPU on its first call of a generation (the
    high-noise expert at the start, the low-noise one at the boundary), so the switch happens once
    each way per generation. Each expert has a host arena that keeps its weights' copy while it
    works; leaving, it copies back only the weights whose LoRA terms changed since it arrived (the
    merged weights depend on the base and the LoRA set alone), and usually nothing. The waiting
    expert's LoRA state is deferred: a change made meanwhile is merged when it comes back, on the
    GPU. Buffers (rotary tables, a weight format's scales: a few MB) travel with the weights, so that
    a weight's stored tensors (a quantized layer's rows and scales) are always in one place.
    """

    def __init__(self, experts: list, device: torch.device) -> None:
        """`experts`: (module, TransformerLoras) pairs, the first of them on `device` now."""
        self.device = device
        self.arenas: dict[int, HostArena] = {}
        self.arrived: dict[int, dict] = {}  # the LoRA plan each expert's host copy holds
        self.active: torch.nn.Module | None = experts[0][0]  # None: a switch failed half-way, both wait
        self.switches = 0
        self.seconds = 0.0  # time spent moving weights, for the logs and benchmarks
        self.bytes_in = self.bytes_back = 0
        self._loras = {id(module): loras for module, loras in experts}
        for module, loras in experts:
            module.register_forward_pre_hook(lambda mod, args, loras=loras: self.activate(mod, loras))
            if module is not self.active:
                self._offload(module, loras)
        self.arrived[id(self.active)] = dict(experts[0][1].merger.plan)
        _sync(device)

    def activate(self, module: torch.nn.Module, loras) -> None:
        if module is self.active:
            return
        started = time.perf_counter()
        if self.active is not None:
            self._offload(self.active, self._loras[id(self.active)])
            self.active = None  # both wait on the host until `module` is wholly on the GPU
        views = self.arenas[id(module)].views
        try:
            for name, param in module.named_parameters():
                # a copy even on the CPU (the tests), so that the host copy stays the expert's own
                param.data = views[name].to(self.device, non_blocking=True, copy=True)
                self.bytes_in += param.numel() * param.element_size()
            _move_buffers(module, self.device)
            _sync(self.device)
        except BaseException:  # out of memory, a cancellation: the copies made go, and the next call comes again
            for name, param in module.named_parameters():
                param.data = views[name]
            _move_buffers(module, torch.device("cpu"))
            raise
        self.active = module
        self.arrived[id(module)] = dict(loras.merger.plan)
        loras.deferred = False
        loras.flush()
        self.switches += 1
        self.seconds += time.perf_counter() - started
        logger.info("expert switch: %.2fs", time.perf_counter() - started)

    def _offload(self, module: torch.nn.Module, loras) -> None:
        params = dict(module.named_parameters())
        arena = self.arenas.get(id(module))
        if arena is None:  # the first time: every weight
            arena = self.arenas[id(module)] = HostArena(_tensors(module), pin=self.device.type == "cuda")
            changed: set[str] = set()
            self.bytes_back += arena.nbytes
        else:
            before, now = self.arrived.get(id(module), {}), loras.merger.plan
            changed = {n for n in set(before) | set(now) if n in params and not _same_terms(before.get(n), now.get(n))}
        for name, param in params.items():
            if name in changed:
                arena.views[name].copy_(param.data, non_blocking=True)
                self.bytes_back += param.numel() * param.element_size()
            param.data = arena.views[name]
        _move_buffers(module, torch.device("cpu"))
        loras.deferred = True
        _sync(self.device)


def _move_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """The module's buffers to `device`, values and all (a merge may have rewritten a scale)."""
    for buffer in module.buffers():
        buffer.data = buffer.data.to(device)


def set_vae_tiling(vae, why: str | None) -> None:
    """Decode untiled (the reference's computation) unless the plan says memory requires tiles (`why`)."""
    if why is None:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    logger.info("VAE decode tiled: %s", why)


def place(pipe, device: torch.device, mode: str) -> dict[str, object]:
    """Put the pipeline's components on `device`, or arrange for them to come on demand; return the
    arenas and streams to keep as long as their components, by component."""
    components = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    kept: dict[str, object] = {}
    stream = getattr(pipe.text_encoder, STREAM, None)
    if stream is not None and mode not in ("encoder", "experts"):  # shared from a pipeline that streamed it
        stream.close(pipe.text_encoder)
    if mode == "none":
        pipe.to(device)
    elif mode in ("encoder", "experts"):  # the experts' switch (WanLoraPipeline) takes the second one from here
        for name, component in components.items():
            if name not in ("text_encoder", "transformer_2" if mode == "experts" else ""):
                component.to(device)
        kept["text_encoder"] = EncoderStream.of(pipe.text_encoder, device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        pin = device.type == "cuda"
        for name in ("transformer", "transformer_2", "text_encoder"):
            module = components.get(name)
            if module is None:
                continue
            # diffusers pins each tensor itself (power-of-two blocks) unless it already is pinned: an arena first
            arena = HostArena(_tensors(module), pin=pin)
            for param_name, param in module.named_parameters():
                param.data = arena.views[param_name]
            kept[name] = arena
            level = "leaf_level" if name == "text_encoder" else "block_level"
            extra = {} if level == "leaf_level" else {"num_blocks_per_group": 1}
            apply_group_offloading(module, onload_device=device, offload_type=level, use_stream=True, **extra)
        pipe.vae.to(device)
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.image_encoder.to(device)
    logger.info("placement: offload=%s on %s", mode, device)
    return kept
