"""Sampling loops over a denoiser callable, and the schedule arithmetic they share."""

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

__all__ = [
    "Denoised", "DenoiseFn", "Level", "Plan", "SAMPLERS", "alpha_sigma", "diffusers_model_fn", "from_x0", "invert_ddim",
    "plan_from_scheduler", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral", "to_eps",
    "to_x0", "sample_renoise", "call_network", "network_input_scale", "scheduler_prediction_type",
    "SolverStats", "Transition", "sample_inverse",
    "RESAMPLERS", "SMCResult", "Weighted", "effective_sample_size", "multinomial_resample", "normalize_log_weights",
    "sample_smc", "stratified_resample", "systematic_resample",
]
