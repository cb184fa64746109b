"""The samplers, on the timesteps Wan's reference code samples.

Wan-Video/Wan2.1 and Wan2.2 sample with `FlowUniPCMultistepScheduler`: UniPC on flow
sigmas `linspace(sigma_max, 0, N + 1)[:-1]`, shifted by `shift * s / (1 + (shift - 1) * s)`,
where `sigma_max` is the first sigma of its 1000-step training schedule, 1 - 1/1000 in
float32. diffusers' `UniPCMultistepScheduler` has used `linspace(1, 1/1000, N + 1)[:-1]`
since 0.37, which moves every timestep (by up to 7 at T2V-A14B's 40 steps and shift 12) and,
at some step counts, which expert takes a step. `WanFlowUniPC` keeps diffusers' solver and
feeds it the reference's sigmas.

The accelerators were distilled on fixed timesteps: `FixedSigmaEuler` samples exactly those,
whatever step count the pipeline asks for, and `FixedTimestepEuler` the first N of a fixed list;
`RcmSampler` samples rCM's, as its own script does;
`Wan2gpEuler` samples Wan2GP's Euler grid, on which its three-phase Lightning recipe runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # the training schedule's first sigma, as float32


def reference_sigmas(steps: int) -> np.ndarray:
    """The reference's unshifted sigmas for `steps` steps (the solver shifts them)."""
    return np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]


class WanFlowUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC solver on Wan's reference schedule (see the module docstring)."""

    @classmethod
    def for_shift(cls, base_config, flow_shift: float) -> WanFlowUniPC:
        """From a model's scheduler config, as flow-matching UniPC at `flow_shift`."""
        flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
        return cls.from_config(base_config, flow_shift=flow_shift, **flow)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        if sigmas is None:
            sigmas = reference_sigmas(num_inference_steps)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)


class FixedSigmaEuler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler on a fixed list of sigmas, whatever step count it is asked for."""

    def __init__(self, sigmas: list[float], shift: float) -> None:
        super().__init__(shift=shift)
        self.fixed_sigmas = list(sigmas)

    def set_timesteps(self, num_inference_steps=None, device=None, **_):
        super().set_timesteps(device=device, sigmas=self.fixed_sigmas)


class FixedTimestepEuler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler from the first N of fixed integer timesteps to 0, unshifted (Wan2GP's "causvid"
    solver): the sigmas are the timesteps / 1000 in float32, and the model is given the timesteps themselves."""

    def __init__(self, timesteps: tuple[int, ...]) -> None:
        super().__init__(shift=1.0)
        self.fixed_timesteps = tuple(timesteps)

    def set_timesteps(self, num_inference_steps=None, device=None, **_):
        chosen = torch.tensor(self.fixed_timesteps[:num_inference_steps], dtype=torch.int64)
        super().set_timesteps(device=device, sigmas=(chosen / NUM_TRAIN_TIMESTEPS).tolist())
        self.timesteps = chosen.to(device=device, dtype=torch.float32)


# rCM's times (NVlabs/rcm rcm/inference/wan2pt2_i2v_rcm_infer.py, wan2pt1_t2v_rcm_infer.py): TrigFlow angles
# atan(sigma_max), then these, then 0; the rest of its steps' angles are the first `steps - 1` of them.
RCM_MID_ANGLES = (1.5, 1.4, 1.0)


def rcm_sigmas(steps: int, sigma_max: float) -> torch.Tensor:
    """rCM's rectified-flow sigmas for `steps` steps, with the final 0, in float64 as its script computes them."""
    angles = torch.tensor([math.atan(sigma_max), *RCM_MID_ANGLES[: steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def rcm_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """What the model is given: each sigma as float32, times 1000, rounded to bf16 (as rCM's script passes it)."""
    return (sigmas.float().double() * 1000).to(torch.bfloat16).float()


class RcmSampler(FlowMatchEulerDiscreteScheduler):
    """rCM's stochastic sampler: from x0 = x - sigma * v, the next latent is x0 noised afresh to the next sigma.

    The first latent is the noise times the first sigma (`initial_sigma`, below 1); the fresh noise is
    drawn from `generator`, the one the first latent came from, as rCM's script does. Its steps run in
    float64, as there.
    """

    def __init__(self, sigma_max: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma_max = sigma_max
        self.generator = generator

    @property
    def initial_sigma(self) -> float:
        """The first sigma, whatever the step count: the one of angle atan(sigma_max)."""
        return float(rcm_sigmas(1, self.sigma_max)[0])

    def set_timesteps(self, num_inference_steps=None, device=None, **_):
        self.num_inference_steps = num_inference_steps
        self.sigmas = rcm_sigmas(num_inference_steps, self.sigma_max)
        self.timesteps = rcm_timesteps(self.sigmas[:-1]).to(device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, return_dict=True, **_):
        index = 0 if self._step_index is None else self._step_index
        sigma, sigma_next = self.sigmas[index].item(), self.sigmas[index + 1].item()
        denoised = sample.to(torch.float64) - sigma * model_output.to(torch.float64)
        noise = randn_tensor(sample.shape, generator=self.generator, device=sample.device, dtype=torch.float32)
        sample_next = ((1 - sigma_next) * denoised + sigma_next * noise).to(sample.dtype)
        self._step_index = index + 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=sample_next) if return_dict else (sample_next,)


def wan2gp_timesteps(steps: int, shift: float) -> torch.Tensor:
    """Wan2GP's Euler timesteps (shared/utils/euler_scheduler.py): linspace(1000, 1, N) in float32, each shifted
    in float32 as `shift * s / (1 + (shift - 1) * s)` of s = t / 1000, then times 1000.

    Not Lightning's grid (linspace(1000, 0, N + 1)[:-1]): the last step starts near t = shift, not at 1000 / N.
    """
    unit = torch.from_numpy(np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32)) / NUM_TRAIN_TIMESTEPS
    return shift * unit / (1 + (shift - 1) * unit) * NUM_TRAIN_TIMESTEPS


class Wan2gpEuler(FlowMatchEulerDiscreteScheduler):
    """Wan2GP's Euler sampler: its timesteps, and its step `x - v * dt` with dt = (t - t_next) / 1000 (the
    last step to 0), computed as there: the float32 difference, divided in Python's double."""

    def __init__(self, shift: float) -> None:
        super().__init__(shift=shift)
        self.flow_shift = shift

    def set_timesteps(self, num_inference_steps=None, device=None, **_):
        self.num_inference_steps = num_inference_steps
        self.timesteps = wan2gp_timesteps(num_inference_steps, self.flow_shift).to(device)
        self.sigmas = torch.cat([self.timesteps.cpu() / NUM_TRAIN_TIMESTEPS, torch.zeros(1)])
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, return_dict=True, **_):
        index = 0 if self._step_index is None else self._step_index
        here = self.timesteps[index]
        after = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else torch.zeros_like(here)
        dt = (here - after).item() / NUM_TRAIN_TIMESTEPS
        sample_next = (sample.float() - model_output.float() * dt).to(sample.dtype)
        self._step_index = index + 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=sample_next) if return_dict else (sample_next,)
