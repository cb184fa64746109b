"""The samplers, on the timesteps Wan's reference code samples.

Wan-Video/Wan2.1 and Wan2.2 sample with `FlowUniPCMultistepScheduler`: UniPC on flow
sigmas `linspace(sigma_max, 0, N + 1)[:-1]`, shifted by `shift * s / (1 + (shift - 1) * s)`,
where `sigma_max` is the first sigma of its 1000-step training schedule, 1 - 1/1000 in
float32. diffusers' `UniPCMultistepScheduler` has used `linspace(1, 1/1000, N + 1)[:-1]`
since 0.37, which moves every timestep (by up to 7 at T2V-A14B's 40 steps and shift 12) and,
at some step counts, which expert takes a step. `WanFlowUniPC` keeps diffusers' solver and
feeds it the reference's sigmas.

The accelerators were distilled on fixed timesteps: `FixedSigmaEuler` samples exactly those,
whatever step count the pipeline asks for.
"""

from __future__ import annotations

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

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
