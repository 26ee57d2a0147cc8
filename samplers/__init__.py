"""Sampling loops over a denoiser callable, and the schedule arithmetic they share.

One state for every model: the loops keep the VP state ``alpha x0 + sigma eps`` (finite at a flow schedule's
pure-noise first level) and the denoiser adapts it to the network's own input (``call_network``: a flow network
reads ``x / (alpha + sigma)``), as k-diffusion's ``c_in`` wrappers do; see ``samplers.sampling``.

k-diffusion's samplers: ``second_order`` (Heun, DPM-2, DPM-2 ancestral), ``dpmpp`` (DPM++ 2S-a, SDE, 2M SDE, 3M SDE,
with CFG++), ``multistep`` (LMS, UniPC); their plans (``sigmas``: Karras, exponential, any list) and noise
(``noise``: Gaussian or Brownian tree).
"""

from .base import Denoised, DenoiseFn, Level
from .inverse import SolverStats, Transition, sample_inverse
from .inversion import invert_ddim
from .models import call_network, diffusers_model_fn
from .sampling import (SAMPLERS, sample_ddim, sample_dpmpp_2m, sample_euler, sample_euler_ancestral,
                       sample_renoise)
from .schedule import (Plan, alpha_sigma, from_x0, network_input_scale, plan_from_scheduler, scheduler_prediction_type,
                       to_eps, to_x0)
from .resampling import (RESAMPLERS, effective_sample_size, multinomial_resample, normalize_log_weights,
                         stratified_resample, systematic_resample)
from .smc import SMCResult, Weighted, sample_smc
from .noise import BrownianTreeNoise, GaussianNoise, NoiseSampler
from .sigmas import SigmaPlan, exponential_plan, karras_plan, plan_from_sigmas, polyexponential_plan
from .second_order import sample_dpm_2, sample_dpm_2_ancestral, sample_heun
from .dpmpp import sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde
from .multistep import sample_lms, sample_unipc

SAMPLERS.update({
    "heun": sample_heun, "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral, "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral, "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_3m_sde": sample_dpmpp_3m_sde, "unipc": sample_unipc,
})

__all__ = [
    "Denoised", "DenoiseFn", "Level", "Plan", "SAMPLERS", "alpha_sigma", "diffusers_model_fn", "from_x0", "invert_ddim",
    "plan_from_scheduler", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral", "to_eps",
    "to_x0", "sample_renoise", "call_network", "network_input_scale", "scheduler_prediction_type",
    "SolverStats", "Transition", "sample_inverse",
    "RESAMPLERS", "SMCResult", "Weighted", "effective_sample_size", "multinomial_resample", "normalize_log_weights",
    "sample_smc", "stratified_resample", "systematic_resample",
    "BrownianTreeNoise", "GaussianNoise", "NoiseSampler", "SigmaPlan", "exponential_plan", "karras_plan",
    "plan_from_sigmas", "polyexponential_plan", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_heun",
    "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_lms",
    "sample_unipc",
]
