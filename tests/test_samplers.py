"""Samplers against diffusers' schedulers, against an exact Gaussian mixture, and CFG++ identities."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from diffguide import guidance
from diffguide.guidance import CFGPlusPlus, Guidance, Guided, GuidedDenoiser, Step, equivalent_cfg_scale
from diffguide.samplers import Plan, plan_from_scheduler, sample_ddim, sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from diffguide.tasks.gmm import ClassConditionalGMM, GaussianMixture

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def t64(x):
    return torch.tensor(x, dtype=F64)


def mixture_2d() -> GaussianMixture:
    covs = t64([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]])
    return GaussianMixture(t64([0.3, 0.5, 0.2]), t64([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]]), covs)


def mixture_1d() -> GaussianMixture:
    return GaussianMixture.isotropic(t64([0.3, 0.7]), t64([[-2.0], [2.0]]), t64([0.25, 0.5]))


def sd_ddim(float64: bool = False) -> DDIMScheduler:
    """SD-1.5's DDIM configuration; ``float64`` makes ``step`` compute in float64 (it follows ``alphas_cumprod``)."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if float64:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(F64)
    return scheduler


def two_class_model(scheduler) -> ClassConditionalGMM:
    c0 = mixture_2d()
    c1 = GaussianMixture.isotropic(t64([0.5, 0.5]), t64([[1.5, 1.5], [2.5, -2.0]]), t64([0.1, 0.2]))
    return ClassConditionalGMM([c0, c1], scheduler.alphas_cumprod, sample_shape=(1, 2, 1))


# ------------------------------------------------------------------------------------------------------------
# step by step against diffusers' schedulers
# ------------------------------------------------------------------------------------------------------------
CASES = {  # name -> (scheduler class, extra config, our sampler, sampler kwargs, stochastic)
    "ddim_eta0": (DDIMScheduler, {}, sample_ddim, {"eta": 0.0}, False),
    "ddim_eta1": (DDIMScheduler, {}, sample_ddim, {"eta": 1.0}, True),
    "euler": (EulerDiscreteScheduler, {}, sample_euler, {}, False),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, sample_euler_ancestral, {}, True),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
                 sample_dpmpp_2m, {}, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_diffusers_scheduler(name):
    """Same model (exact GMM eps, float64), same initial state, same noise generator, same plan.

    DDIM: diffusers computes in the dtype of ``alphas_cumprod``, which we cast to float64, so atol 1e-12.
    Euler, Euler-ancestral and DPM-Solver++ cast the state to float32 inside ``step``; their tolerance is the
    accumulated float32 rounding ``num_steps * eps32 * max |VE state|`` (about 100x below the difference the
    two initial-noise conventions make, see below).
    """
    cls, extra, sampler, kwargs, stochastic = CASES[name]
    num_steps = 20
    base = sd_ddim()
    model = two_class_model(base)
    labels = torch.tensor([0, 1, 2, 0] * 8)
    theirs = sd_ddim(float64=True) if cls is DDIMScheduler else cls.from_config(base.config, **extra)
    theirs.set_timesteps(num_steps)
    z = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = x_start = z * theirs.init_noise_sigma  # diffusers' own start (Euler "linspace": sigma_max z, VE state)
    gen = torch.Generator().manual_seed(1)
    step_kwargs = {"generator": gen} if stochastic else {}
    if cls is DDIMScheduler:
        step_kwargs["eta"] = kwargs["eta"]
    ve_scale = hasattr(theirs, "sigmas") and cls is not DPMSolverMultistepScheduler
    ref, max_state = [], 0.0
    for i, t in enumerate(theirs.timesteps):
        eps = model.eps(theirs.scale_model_input(x, t), t, labels)
        x = theirs.step(eps, t, x, **step_kwargs).prev_sample
        max_state = max(max_state, float(x.abs().max()))
        ref.append(x / (1 + theirs.sigmas[i + 1].to(F64) ** 2).sqrt() if ve_scale else x)

    plan = plan_from_scheduler(cls.from_config(base.config, **extra), num_steps)
    if cls is DDIMScheduler:
        assert torch.allclose(plan.sigmas[:-1], ((1 - theirs.alphas_cumprod[plan.timesteps]) /
                                                 theirs.alphas_cumprod[plan.timesteps]).sqrt())
    start = x_start / (1 + plan.sigmas[0] ** 2).sqrt() if ve_scale else x_start  # the same state in VP form
    ours = []
    sampler_kwargs = dict(kwargs, generator=torch.Generator().manual_seed(1)) if stochastic else kwargs
    sampler(GuidedDenoiser(model.eps, None, labels), start, plan, callback=lambda d: ours.append(d["x"]),
            disable=True, **sampler_kwargs)
    assert len(ours) == len(ref) == num_steps
    atol = 1e-12 if cls is DDIMScheduler else num_steps * EPS32 * max(max_state, 1.0)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"{name}: step {i} differs by {float((a - b).abs().max())}"


def test_euler_initial_noise_conventions_differ():
    """Why the test above hands both the same state: diffusers' Euler ("linspace") starts from ``sigma_max z``,
    our samplers from VP ``z`` (``sqrt(1 + sigma_max^2) z`` in VE); the runs then differ well above the tolerance."""
    base = sd_ddim()
    model = two_class_model(base)
    euler = EulerDiscreteScheduler.from_config(base.config)
    euler.set_timesteps(20)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = z * euler.init_noise_sigma
    for t in euler.timesteps:
        x = euler.step(model.eps(euler.scale_model_input(x, t), t, None), t, x).prev_sample
    ours = sample_euler(GuidedDenoiser(model.eps, None, None), z, plan_from_scheduler(euler, 20), disable=True)
    assert float((ours - x).abs().max()) > 100 * 20 * EPS32 * 50


# ------------------------------------------------------------------------------------------------------------
# unconditional sampling recovers the mixture
# ------------------------------------------------------------------------------------------------------------
# Bias allowed on top of 4 Monte-Carlo standard errors, measured by benchmarks/bench_samplers.py --particles-1d
# 200000 --particles 20000 --steps 10 25 50 100 200 --repeats 3 (VP plan): at 200 steps (100 for DPM-Solver++) the
# largest errors
# there are 0.017 (mean), 0.064 (variance, Euler-ancestral in 1-D) and 0.004 (mode mass), discretisation and the
# N(0, I) start included.
BIAS_TOL = {"mean": 0.02, "var": 0.08, "mass": 0.005}
STAT_CASES = {  # name -> (sampler, kwargs, steps)
    "ddim_eta0": (sample_ddim, {"eta": 0.0}, 200),
    "ddim_eta1": (sample_ddim, {"eta": 1.0}, 200),
    "euler": (sample_euler, {}, 200),
    "euler_ancestral": (sample_euler_ancestral, {}, 200),
    "dpmpp_2m": (sample_dpmpp_2m, {}, 100),
}
DDPM = EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # sigmas end at 0


def moment_errors(samples: torch.Tensor, mixture: GaussianMixture) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(error, Monte-Carlo standard error) of the mean, per-coordinate variance and mode masses E[r_k(x)]."""
    n = samples.shape[0]
    centred = samples - samples.mean(0)
    var = centred.pow(2).mean(0)
    resp = mixture.responsibilities(samples)
    return {
        "mean": (samples.mean(0) - mixture.mean(), (var / n).sqrt()),
        "var": (var - torch.diagonal(mixture.cov()), ((centred.pow(4).mean(0) - var**2) / n).sqrt()),
        "mass": (resp.mean(0) - mixture.weights, (resp.var(0) / n).sqrt()),
    }


def within_tolerance(samples: torch.Tensor, mixture: GaussianMixture) -> dict[str, bool]:
    return {key: bool((err.abs() <= 4 * se + BIAS_TOL[key]).all())
            for key, (err, se) in moment_errors(samples, mixture).items()}


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", list(STAT_CASES))
def test_unconditional_sampler_recovers_mixture(name, dim):
    sampler, kwargs, steps = STAT_CASES[name]
    mixture = mixture_1d() if dim == 1 else mixture_2d()
    n = 20_000 if dim == 1 else 4_000
    denoise = ClassConditionalGMM([mixture], DDPM.alphas_cumprod).denoiser()
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(10 + dim), dtype=F64)
    if name in ("ddim_eta1", "euler_ancestral"):
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(20 + dim))
    samples = sampler(denoise, x, plan_from_scheduler(DDPM, steps), disable=True, **kwargs)
    ok = within_tolerance(samples, mixture)
    assert all(ok.values()), (ok, moment_errors(samples, mixture))


def test_moment_check_rejects_a_coarse_sampler():
    """Power check: ten Euler steps (covariance bias about 0.7 in the benchmark) fail the same check."""
    mixture = mixture_2d()
    denoise = ClassConditionalGMM([mixture], DDPM.alphas_cumprod).denoiser()
    x = torch.randn(4_000, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    samples = sample_euler(denoise, x, plan_from_scheduler(DDPM, 10), disable=True)
    assert not within_tolerance(samples, mixture)["var"]


# ------------------------------------------------------------------------------------------------------------
# CFG++ identities
# ------------------------------------------------------------------------------------------------------------
class ScheduledCFG(Guidance):
    """CFG with one scale per step (test helper): ``u + scales[i] (c - u)``."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = scales

    def combine(self, step: Step) -> Guided:
        pred = step.pred_uncond + self.scales[step.index] * (step.pred_cond - step.pred_uncond)
        return Guided(pred, pred)


def test_cfgpp_equals_cfg_with_step_dependent_scale():
    """CFG++(lam) DDIM run == CFG DDIM run with omega_i = lam s_i / (s_i - s_{i+1}) (VE sigmas), float64."""
    base = sd_ddim()
    model = two_class_model(base)
    plan = plan_from_scheduler(base, 25)
    lam = 0.6
    abar = 1 / (1 + plan.sigmas**2)
    omegas = [float(equivalent_cfg_scale(lam, abar[i], abar[i + 1])) for i in range(plan.num_steps)]
    labels = torch.tensor([0, 1] * 16)
    null = torch.full_like(labels, model.null_class_label)
    x = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    runs = {}
    for key, guide in (("cfgpp", CFGPlusPlus(lam)), ("cfg_omega", ScheduledCFG(omegas)),
                       ("cfg_lam", ScheduledCFG([lam] * plan.num_steps))):
        traj: list[torch.Tensor] = []
        sample_ddim(GuidedDenoiser(model.eps, guide, labels, null), x, plan,
                    callback=lambda d, out=traj: out.append(d["x"]), disable=True)
        runs[key] = torch.stack(traj)
    assert torch.allclose(runs["cfgpp"], runs["cfg_omega"], atol=1e-10, rtol=0)
    assert float((runs["cfgpp"] - runs["cfg_lam"]).abs().max()) > 1e-2  # the schedule matters


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cfgpp_hook_on_class_pipeline_matches_scheduler_formula(eta):
    """``guidance.apply`` CFG++ step == ``DDIMScheduler.step(eps_lam) + sqrt(1 - abar_prev - std^2) (eps_u - eps_lam)``
    (eta = 1 also checks that the pipeline still passes ``eta`` and ``generator`` to the wrapped step)."""
    from diffguide.tasks.pipelines import ClassConditionalPipeline

    scheduler = sd_ddim(float64=True)
    model = two_class_model(scheduler)
    pipe = ClassConditionalPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    lam, steps = 0.6, 12
    labels = torch.tensor([0, 1, 1, 0])
    latents = torch.randn(4, 1, 2, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    seen = []
    with guidance.apply(pipe, CFGPlusPlus(lam)) as stats:
        pipe(labels, num_inference_steps=steps, eta=eta, latents=latents, output_type="pt",
             generator=torch.Generator().manual_seed(5),
             callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].clone()) or {})
    assert stats.calls == steps and len(seen) == steps
    ref = sd_ddim(float64=True)
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(5)
    null = torch.full_like(labels, model.null_class_label)
    x = latents
    for i, t in enumerate(ref.timesteps):
        eps_u, eps_c = model.eps(x, t, null), model.eps(x, t, labels)
        eps_lam = eps_u + lam * (eps_c - eps_u)
        prev_t = int(t) - ref.config.num_train_timesteps // steps
        abar_prev = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod
        std_sq = eta**2 * ref._get_variance(int(t), prev_t)
        out = ref.step(eps_lam, t, x, eta=eta, generator=gen).prev_sample
        expected = out + (1 - abar_prev - std_sq).sqrt() * (eps_u - eps_lam)
        gap = float((seen[i] - expected).abs().max())
        assert gap <= 1e-12, f"step {i}: {gap}"
        x = seen[i]


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    plan = plan_from_scheduler(DDPM, 5)
    denoise = ClassConditionalGMM([mixture_1d()], DDPM.alphas_cumprod).denoiser()
    x = torch.zeros(3, 1, dtype=F64)
    for eta in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="eta"):
            sample_ddim(denoise, x, plan, eta=eta, disable=True)
    for eta in (-0.1, 2.0):
        with pytest.raises(ValueError, match="eta"):
            sample_euler_ancestral(denoise, x, plan, eta=eta, disable=True)
    for sampler in (sample_ddim, sample_euler, sample_euler_ancestral, sample_dpmpp_2m):
        with pytest.raises(TypeError, match="Plan"):
            sampler(denoise, x, plan.sigmas, disable=True)
        with pytest.raises(TypeError, match="floating-point"):
            sampler(denoise, torch.zeros(3, 1, dtype=torch.long), plan, disable=True)
    with pytest.raises(ValueError, match="sigmas"):
        Plan(timesteps=torch.arange(3), sigmas=t64([2.0, 1.0, 0.0]))
