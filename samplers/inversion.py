"""DDIM inversion: run the deterministic DDIM step backwards, from clean data to noise.

The network is evaluated at the current (less noisy) state and the next (noisier) level, the usual DDIM
inversion approximation. With a CFG++ denoiser the roles of the two estimates swap with respect to sampling
(CFG++ Sec. 4.3, Alg. 3): the Tweedie estimate uses the renoise (unconditional) epsilon and the renoising uses
the guided one, which makes one inversion step the exact inverse of one sampling step when the epsilons agree.
With plain CFG both use the guided epsilon, which is not invertible for a scale != 1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn, Level, as_denoised
from .sampling import Callback
from .schedule import Plan


def invert_ddim(model: DenoiseFn, x0: Tensor, plan: Plan, callback: Callback | None = None,
                disable: bool = False) -> Tensor:
    """Map clean data ``x0`` (at the plan's final level) to the noise at ``plan``'s first level.

    Sampling ``sample_ddim(model, invert_ddim(model, x0, plan), plan)`` reconstructs ``x0`` up to the
    inversion approximation.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point tensor")
    z = x0 * plan.alpha(plan.num_steps).to(x0.device, x0.dtype)
    for i in trange(plan.num_steps - 1, -1, -1, disable=disable, desc="inverting"):
        alpha, sigma = plan.alpha(i).to(z.device, z.dtype), plan.sigma_vp(i).to(z.device, z.dtype)
        alpha_prev = plan.alpha(i + 1).to(z.device, z.dtype)
        sigma_prev = plan.sigma_vp(i + 1).to(z.device, z.dtype)
        d = as_denoised(model(z, Level(t=plan.timesteps[i], alpha=alpha, sigma=sigma, index=i,
                                       num_steps=plan.num_steps)))
        # epsilons of the two estimates as the network saw them (input z at level i)
        eps_guided = (z - alpha * d.x0) / sigma
        eps_renoise = (z - alpha * d.x0_renoise) / sigma
        x0_hat = (z - sigma_prev * eps_renoise) / alpha_prev
        z = alpha * x0_hat + sigma * eps_guided
        if callback is not None:
            callback({"x": z, "i": i, "t": plan.timesteps[i], "x0_hat": x0_hat})
    return z
