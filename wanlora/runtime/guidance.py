"""Classifier-free guidance's two passes per step, rearranged without rewriting diffusers' loop.

Wan pipelines call the transformer for "cond" and then "uncond" (their cache contexts) and
combine the two results afterwards. A `GuidancePairHook` answers the "cond" call with a
tensor that it fills in place during the "uncond" call, before the pipeline reads it. The
second call is then free to produce both results at once:

- `BatchedGuidance` runs cond and uncond as one batch-of-two forward;
- `SplitGuidance` (CFG-parallel) runs each branch on its own half of the processes and
  swaps the results.

The pipeline makes a hook active only when it guides (guidance above 1), so that there
really is an "uncond" call to wait for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class _NoState:
    def reset(self) -> None:
        pass


class GuidancePairHook(ModelHook, ABC):
    """The cond/uncond hand-over; subclasses say how each call is answered."""

    _is_stateful = True  # so that the pipeline's cache context (the branch name) reaches it
    name: str

    def __init__(self) -> None:
        super().__init__()
        self.state_manager = StateManager(_NoState)
        self.active = False
        self.cond: torch.Tensor | None = None  # what the "cond" call returned
        self.cond_kwargs: dict | None = None

    def install(self, transformer: torch.nn.Module) -> GuidancePairHook:
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(self, self.name)
        return self

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.state_manager.context.name == "cond":
            self.cond_kwargs = kwargs
            self.cond = output = self.answer_cond(module, kwargs)
        else:
            cond, output = self.answer_uncond(module, kwargs)
            assert self.cond is not None, "an uncond call without its cond call"
            self.cond.copy_(cond)
            self.cond = self.cond_kwargs = None
        return (output,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=output)

    @abstractmethod
    def answer_cond(self, module: torch.nn.Module, kwargs: dict) -> torch.Tensor:
        """The "cond" call's output: computed now, or a placeholder filled at the "uncond" call."""

    @abstractmethod
    def answer_uncond(self, module: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches' outputs, (cond, uncond), at the "uncond" call."""

    def forward(self, kwargs: dict) -> torch.Tensor:
        """The transformer's own forward (and any hooks inside this one)."""
        return self.fn_ref.original_forward(**{**kwargs, "return_dict": False})[0]

    @staticmethod
    def placeholder(module: WanTransformer3DModel, kwargs: dict) -> torch.Tensor:
        """An unfilled tensor of the transformer's output shape."""
        latents = kwargs["hidden_states"]
        return latents.new_empty((latents.shape[0], module.config.out_channels, *latents.shape[2:]))

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cond = self.cond_kwargs = None
        return module


class BatchedGuidance(GuidancePairHook):
    """cond and uncond in one forward of batch two: fewer, larger matmuls, twice the activations."""

    name = "wanlora_batched_guidance"

    def answer_cond(self, module, kwargs):
        return self.placeholder(module, kwargs)

    def answer_uncond(self, module, kwargs):
        both = {
            key: torch.cat([self.cond_kwargs[key], value]) if isinstance(value, torch.Tensor) else value
            for key, value in kwargs.items()
        }
        cond, uncond = self.forward(both).chunk(2)
        return cond, uncond


class SplitGuidance(GuidancePairHook):
    """CFG-parallel: this process computes one branch (0: cond, 1: uncond); `group` pairs the two."""

    name = "wanlora_split_guidance"

    def __init__(self, branch: int, group) -> None:
        super().__init__()
        self.branch = branch
        self.group = group

    def answer_cond(self, module, kwargs):
        return self.forward(kwargs) if self.branch == 0 else self.placeholder(module, kwargs)

    def answer_uncond(self, module, kwargs):
        mine = self.cond if self.branch == 0 else self.forward(kwargs)
        results = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(results, mine.contiguous(), group=self.group)
        return results[0], results[1]
