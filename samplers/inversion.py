"""DDIM inversion: run the deterministic DDIM step backwards, from clean data to noise.

The network is evaluated at the current (less noisy) state and the next (noisier) level, the usual DDIM
inversion approximation: the network is handed the state in its own parametrisation unchanged (a VP network
the VP state, a flow network the flow state ``x / (alpha + sigma)``) and its output is assumed to be the one it
would give at the sampling step. Each inversion step is then the exact algebraic inverse of the DDIM (= Euler)
step for that output: the step ``x' = alpha' x0(p_data, x) + sigma' eps(p_noise, x)`` is affine in ``x`` for
fixed predictions ``p`` in any parametrisation (``schedule.to_x0`` / ``to_eps``), and is solved for ``x``. For an
epsilon network that is the classic ``x = alpha x0_hat + sigma eps_data`` with ``x0_hat = (x' - sigma' eps_noise) /
alpha'``; for a flow network it is ``x_flow = x'_flow - (s' - s) v`` (the Euler step reversed).

With a CFG++ denoiser the roles of the two estimates swap with respect to sampling (CFG++ Sec. 4.3, Alg. 3): the
data term uses the guided prediction and the noise term the unconditional one, so one inversion step is the exact
inverse of one sampling step when the predictions agree. With plain CFG both use the guided prediction, which is
not invertible for a scale != 1 once the predictions depend on the state.
"""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn, Level, as_denoised
from .sampling import Callback
from .schedule import Plan, check_prediction_type, from_x0, network_input_scale, to_eps, to_x0


def invert_ddim(model: DenoiseFn, x0: Tensor, plan: Plan, callback: Callback | None = None,
                disable: bool = False, prediction_type: str | None = None) -> Tensor:
    """Map clean data ``x0`` (at the plan's final level) to the noise at ``plan``'s first level.

    ``prediction_type`` is the network's output type (default ``plan.prediction_type``, else ``"epsilon"``): the
    quantity the inversion approximation holds fixed between the inversion and the sampling step. Sampling
    ``sample_ddim(model, invert_ddim(model, x0, plan), plan)`` reconstructs ``x0`` up to that approximation.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point tensor")
    kind = check_prediction_type(prediction_type or plan.prediction_type or "epsilon")
    z = x0 * plan.alpha(plan.num_steps).to(x0.device, x0.dtype)
    for i in trange(plan.num_steps - 1, -1, -1, disable=disable, desc="inverting"):
        alpha, sigma = plan.alpha(i).to(z.device, z.dtype), plan.sigma_vp(i).to(z.device, z.dtype)
        alpha_next, sigma_next = plan.alpha(i + 1).to(z.device, z.dtype), plan.sigma_vp(i + 1).to(z.device, z.dtype)
        # the network's own input for the state z (level i + 1), re-expressed as a VP state of level i
        z_in = z * (network_input_scale(alpha_next, sigma_next, kind) / network_input_scale(alpha, sigma, kind))
        d = as_denoised(model(z_in, Level(t=plan.timesteps[i], alpha=alpha, sigma=sigma, index=i,
                                          num_steps=plan.num_steps)))
        pred_data = from_x0(d.x0, z_in, alpha, sigma, kind)
        pred_noise = from_x0(d.x0_renoise, z_in, alpha, sigma, kind)
        # sampling step z -> z' = a z + b for these predictions (affine in z); solve for z
        a = alpha_next * to_x0(0.0, 1.0, alpha, sigma, kind) + sigma_next * to_eps(0.0, 1.0, alpha, sigma, kind)
        b = alpha_next * to_x0(pred_data, 0.0, alpha, sigma, kind) + sigma_next * to_eps(pred_noise, 0.0, alpha, sigma,
                                                                                         kind)
        z_prev = z
        z = (z - b) / a
        if callback is not None:
            callback({"x": z, "i": i, "t": plan.timesteps[i],
                      "x0_hat": to_x0(pred_data, z, alpha, sigma, kind), "x_next": z_prev})
    return z
