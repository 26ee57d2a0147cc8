"""CFG++ on diffusers' SDE schedulers through ``scheduler_step.renoise_step``, against few-line oracles, and the
schedulers on which CFG++ is refused by name (directly and through ``guidance.apply``)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, DPMSolverSDEScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                       UniPCMultistepScheduler)

from diffguide import guidance
from diffguide.guidance import CFGPlusPlus
from diffguide.guidance.scheduler_step import check_scheduler, renoise_step
from diffguide.tasks.gmm import ClassConditionalGMM, GaussianMixture

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
LAM = 0.6
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def t64(x):
    return torch.tensor(x, dtype=F64)


def model(scheduler) -> ClassConditionalGMM:
    c0 = GaussianMixture(t64([0.3, 0.7]), t64([[-2.0, 0.5], [2.0, -1.0]]),
                         t64([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]]]))
    c1 = GaussianMixture.isotropic(t64([0.5, 0.5]), t64([[1.5, 1.5], [2.5, -2.0]]), t64([0.1, 0.2]))
    return ClassConditionalGMM([c0, c1], scheduler.alphas_cumprod)


LABELS = torch.tensor([0, 1] * 8)
NULL = torch.full_like(LABELS, 2)


def predictions(gmm, x, t):
    eps_c, eps_u = gmm.eps(x, t, LABELS), gmm.eps(x, t, NULL)
    return eps_u + LAM * (eps_c - eps_u), eps_u


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpmsolver_cfgpp_equals_oracle(solver_type):
    """DPM++ 2M SDE CFG++ (VP): ``x' = alpha' D_l + e^(-h) (sigma'/sigma) (x - alpha D_u) + c (D_l - D_u_prev) / r +
    sigma' sqrt(1 - e^(-2h)) z``, c = alpha' (1 - e^(-2h)) / 2 (midpoint) or alpha' ((1 - e^(-2h)) / (-2h) + 1) (heun),
    first order on the first and last step; z the scheduler's own draw (float32, same generator)."""
    steps = 10
    config = dict(SD, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type)
    scheduler = DPMSolverMultistepScheduler(**config)
    gmm = model(scheduler)
    scheduler.set_timesteps(steps)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gen, state, ours = torch.Generator().manual_seed(1), {}, []
    for t in scheduler.timesteps:
        eps_l, eps_u = predictions(gmm, x, t)
        x = renoise_step(scheduler, scheduler.step, eps_l, eps_u, t, x, "epsilon", state, generator=gen,
                         return_dict=False)[0].to(F64)
        ours.append(x)
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(steps)
    alphas, sigmas = (v.to(F64) for v in ref._sigma_to_alpha_sigma_t(ref.sigmas.to(F64)))
    gen, x, prev = torch.Generator().manual_seed(1), ours[0] * 0 + torch.randn(
        16, 2, generator=torch.Generator().manual_seed(0), dtype=F64), None
    for i, t in enumerate(ref.timesteps):
        eps_l, eps_u = predictions(gmm, x, t)
        a, s, a2, s2 = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        d_l, d_u = (x - s * eps_l) / a, (x - s * eps_u) / a
        z = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(F64)
        h = torch.log(a2 / s2) - torch.log(a / s) if s2 > 0 else t64(math.inf)
        x_new = a2 * d_l + torch.exp(-h) * (s2 / s) * (x - a * d_u) + s2 * torch.sqrt(1 - torch.exp(-2 * h)) * z
        if prev is not None and i < steps - 1:
            d1 = (d_l - prev[0]) / (prev[1] / h)
            c = 0.5 * a2 * (1 - torch.exp(-2 * h)) if solver_type == "midpoint" else \
                a2 * ((1 - torch.exp(-2 * h)) / (-2 * h) + 1)
            x_new = x_new + c * d1
        prev, x = (d_u, h), x_new
        gap = float((ours[i] - x).abs().max())
        assert gap < 20 * (i + 1) * EPS32 * max(1.0, float(x.abs().max())), (i, gap)


def test_dpmsolver_sde_scheduler_cfgpp_equals_oracle():
    """DPMSolverSDEScheduler without noise (``s_noise=0``; its Brownian tree is then unused), VE state: stage 1
    ``x_2 = D_l + s_d1 e_u`` to the log-midpoint, stage 2 ``x' = (s_d/s) D_l + s_d e_u + (1 - s_d/s) D_l(x_2)``."""
    steps = 6
    scheduler = DPMSolverSDEScheduler(**SD, noise_sampler_seed=0)
    gmm = model(scheduler)
    scheduler.set_timesteps(steps)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * scheduler.init_noise_sigma
    x, state, ours = x0, {}, []
    for t in scheduler.timesteps:
        eps_l, eps_u = predictions(gmm, scheduler.scale_model_input(x, t), t)
        x = renoise_step(scheduler, scheduler.step, eps_l, eps_u, t, x, "epsilon", state, s_noise=0.0,
                         return_dict=False)[0].to(F64)
        ours.append(x)
    ref = DPMSolverSDEScheduler(**SD)
    ref.set_timesteps(steps)
    sig, ts = ref.sigmas.to(F64), ref.timesteps
    levels = [float(sig[0])] + [float(v) for v in sig[1::2]]  # the N + 1 levels (sigmas are interleaved)
    x = x0
    for k in range(steps):
        s, s_next = levels[k], levels[k + 1]
        eps_l, eps_u = predictions(gmm, x / math.sqrt(1 + s**2), ts[2 * k])
        d_l, e_u = x - s * eps_l, eps_u
        if s_next == 0:
            x = d_l
            assert float((ours[-1] - x).abs().max()) < 1e-4
            continue
        s_mid = math.sqrt(s * s_next)
        down_1 = math.sqrt(s_mid**2 - s_mid**2 * (s**2 - s_mid**2) / s**2)
        x_2 = d_l + down_1 * e_u
        assert float((ours[2 * k] - x_2).abs().max()) < 1e-4 * max(1.0, float(x_2.abs().max())), k
        eps_l2, _ = predictions(gmm, x_2 / math.sqrt(1 + s_mid**2), ts[2 * k + 1])
        d_l2 = x_2 - s_mid * eps_l2
        down = math.sqrt(s_next**2 - s_next**2 * (s**2 - s_next**2) / s**2)
        x = (down / s) * d_l + down * e_u + (1 - down / s) * d_l2
        assert float((ours[2 * k + 1] - x).abs().max()) < 1e-4 * max(1.0, float(x.abs().max())), k


@pytest.mark.parametrize("cls, config", [(HeunDiscreteScheduler, {}), (KDPM2DiscreteScheduler, {}),
                                         (KDPM2AncestralDiscreteScheduler, {}), (LMSDiscreteScheduler, {}),
                                         (UniPCMultistepScheduler, {}),
                                         (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver",
                                                                        "final_sigmas_type": "sigma_min"})])
def test_cfgpp_refused_by_name(cls, config):
    with pytest.raises(ValueError, match=cls.__name__):
        check_scheduler(cls(**SD, **config))


def test_apply_refuses_cfgpp_on_heun_and_runs_it_on_dpmpp_sde():
    from diffguide.tasks.pipelines import ClassConditionalPipeline

    base = DPMSolverMultistepScheduler(**SD)
    gmm = model(base)
    gmm_img = ClassConditionalGMM([gmm.mixture(0), gmm.mixture(1)], base.alphas_cumprod, sample_shape=(1, 2, 1))
    labels = torch.tensor([0, 1])
    pipe = ClassConditionalPipeline(unet=gmm_img, scheduler=HeunDiscreteScheduler.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        with guidance.apply(pipe, CFGPlusPlus(LAM)):
            pass
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="sde-dpmsolver++")
    latents = torch.randn(2, 1, 2, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    with guidance.apply(pipe, CFGPlusPlus(LAM)) as stats:
        out = pipe(labels, num_inference_steps=6, latents=latents, output_type="pt",
                   generator=torch.Generator().manual_seed(4))
    images = out.images if hasattr(out, "images") else out[0]
    assert stats.calls == 6 and torch.isfinite(torch.as_tensor(images)).all()


@pytest.mark.parametrize("options", [dict(solver_type="midpoint"), dict(solver_type="heun"), dict(solver_order=1),
                                     dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
                                     dict(final_sigmas_type="sigma_min", lower_order_final=False)])
def test_sde_dpmsolver_cfgpp_with_equal_estimates_is_the_scheduler_step(options):
    """cond == uncond: the CFG++ step is DPMSolverMultistepScheduler(sde-dpmsolver++).step, noise included."""
    prediction_type = options.get("prediction_type", "epsilon")
    plain, ours = (DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", **options) for _ in range(2))
    plain.set_timesteps(8), ours.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    gen_plain, gen_ours, state = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5), {}
    for t in plain.timesteps:
        pred = torch.randn(x.shape, generator=g)
        x_plain = plain.step(pred, t, x, generator=gen_plain).prev_sample
        x_ours = renoise_step(ours, ours.step, pred, pred, t, x, prediction_type, state,
                              generator=gen_ours).prev_sample
        assert torch.allclose(x_ours, x_plain, atol=2e-5, rtol=1e-5), (t, (x_ours - x_plain).abs().max())
        x = x_plain


def test_dpmsolver_sde_scheduler_cfgpp_with_equal_estimates_is_the_scheduler_step():
    plain, ours = (DPMSolverSDEScheduler(**SD, noise_sampler_seed=7) for _ in range(2))
    plain.set_timesteps(5), ours.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x, state = torch.randn(2, 3, 4, 4, generator=g) * plain.init_noise_sigma, {}
    for t in plain.timesteps:
        pred = torch.randn(x.shape, generator=g)
        x_plain = plain.step(pred, t, x).prev_sample
        x_ours = renoise_step(ours, ours.step, pred, pred, t, x, "epsilon", state).prev_sample
        assert torch.allclose(x_ours, x_plain, atol=1e-5, rtol=1e-6), (t, (x_ours - x_plain).abs().max())
        x = x_plain
