"""Where users compare with the authors' code: Rectified-CFG++'s official preset and CFG-Zero*'s official options.

Oracles are few-line transcriptions of the official loops, written here from reading them:
* Rectified-CFG++, shreshthsaini/Rectified-CFGpp ``rect-cfg-SD3-pipeline/pipeline.py`` (denoising loop): ``dt`` from
  the scheduler's sigmas, ``x_pred = latents + dt v_c``, ``sigma_noise`` noise while ``t > 0.1``, both branches at
  ``x_pred`` and time ``(t + dt).to(latents.dtype)``, ``v = v_c + true_cfg (v_c2 - v_u2)``, ``scheduler.step``.
* CFG-Zero*, WeichenFan/CFG-Zero-star ``models/*/pipeline.py``: ``optimized_scale`` in float32, ``alpha.to(dtype)``,
  ``u * alpha + w (c - u * alpha)`` in the input dtype, zero for ``i <= zero_steps``, nothing for ``w <= 1``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffguide import guidance
from diffguide.guidance.base import Step
from diffguide.guidance.families import FAMILIES
from diffguide.samplers import diffusers_model_fn, plan_from_scheduler, sample_euler
from diffguide.samplers.base import Level
from diffguide.tasks.gmm import FlowMatchingGMM, GaussianMixture
from tiny_pipes import embeds, tiny_sd3, tiny_wan

F64 = torch.float64


# ---- Rectified-CFG++ ---------------------------------------------------------------------------------------------
def mixture() -> FlowMatchingGMM:
    t = lambda x: torch.tensor(x, dtype=F64)
    c0 = GaussianMixture(t([0.6, 0.4]), t([[-2.0, 0.5], [1.0, 1.0]]), t([[[0.3, 0.1], [0.1, 0.2]]] * 2))
    c1 = GaussianMixture.isotropic(t([1.0]), t([[1.5, -2.0]]), t([0.2]))
    return FlowMatchingGMM([c0, c1], sample_shape=(1, 2, 1))


def official_rcfgpp_loop(network, x, scheduler, true_cfg, sigma_noise, generator, cond, uncond):
    """The official SD3 denoising loop, transcribed (``network(x, t, cond)`` -> velocity)."""
    for i, t in enumerate(scheduler.timesteps):
        dt = scheduler.sigmas[i + 1] - scheduler.sigmas[i]
        v_c = network(x, t, cond)
        x_pred = x + dt * v_c
        if sigma_noise > 0.0 and t > 0.1:
            x_pred = x_pred + sigma_noise * torch.randn(x_pred.shape, generator=generator, dtype=x_pred.dtype)
        t_corrector = (t + dt).to(x.dtype)
        v = v_c + true_cfg * (network(x_pred, t_corrector, cond) - network(x_pred, t_corrector, uncond))
        x = scheduler.step(v, t, x, return_dict=False)[0] if x.dtype != F64 else x + dt * v  # float64: Euler as is
    return x


@pytest.mark.parametrize("sigma_noise", [0.0, 0.05])
def test_rcfgpp_official_preset_equals_the_official_loop_on_the_exact_mixture(sigma_noise):
    """Our sampler (flow Euler on the scheduler's plan) with RectifiedCFGPlusPlus.official == the official loop on
    exact mixture velocities, float64 states, 8 steps (shift 3), the same noise draws; and far from Alg. 1. The
    official ``dt`` is a difference of the scheduler's float32 sigmas (ours float64): up to 3e-8 per step, measured
    8e-9 at the end, 2e-7 on 2 steps; hence 1e-6."""
    model, steps, n = mixture(), 8, 64
    labels, null = torch.zeros(n, dtype=torch.long), torch.full((n,), 2)
    z = torch.randn(n, 1, 2, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    want = official_rcfgpp_loop(model.velocity, z.clone(), scheduler, 4.5, sigma_noise,
                                torch.Generator().manual_seed(5), labels, null)
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), steps)

    def run(guide):
        den = guidance.GuidedDenoiser(diffusers_model_fn(model), guide, {"class_labels": labels},
                                      {"class_labels": null}, "flow")
        return sample_euler(den, z, plan, disable=True)  # starts at pure noise: VP and flow states coincide

    got = run(guidance.RectifiedCFGPlusPlus.official(4.5, sigma_noise, torch.Generator().manual_seed(5), plan))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    paper = run(guidance.RectifiedCFGPlusPlus(4.5, plan))
    assert (paper - want).abs().max() > 0.1  # Alg. 1 at the same lambda is another sampler


def test_rcfgpp_official_preset_through_apply_equals_the_official_sd3_loop():
    """Tiny SD3 under apply with RectifiedCFGPlusPlus.official vs the official loop written on its transformer
    (batched [u; c] calls, float32, 3 steps, sigma_noise from a seeded generator): 1e-5."""
    pipe = tiny_sd3()
    kw = dict(embeds("sd3", 2), num_inference_steps=3, output_type="latent")
    start = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    with guidance.apply(pipe, guidance.RectifiedCFGPlusPlus.official(4.5, 0.005, torch.Generator().manual_seed(3))):
        hooked = pipe(**kw, latents=start.clone())[0]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    text = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    pooled = torch.cat([kw["negative_pooled_prompt_embeds"], kw["pooled_prompt_embeds"]])

    def network(x, t, half):  # one batched [uncond; cond] call, as the official pipeline makes it
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(4), encoder_hidden_states=text,
                               pooled_projections=pooled, return_dict=False)[0]
        return out.chunk(2)[half]

    with torch.no_grad():
        want = official_rcfgpp_loop(network, start.clone(), scheduler, 4.5, 0.005, torch.Generator().manual_seed(3),
                                    1, 0)
    assert start.shape == hooked.shape
    torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)
    with guidance.apply(pipe, guidance.RectifiedCFGPlusPlus(4.5)):
        paper = pipe(**kw, latents=start.clone())[0]
    assert (paper - want).abs().max() > 1e-3  # Alg. 1 is measurably another update


def test_rcfgpp_official_corrector_time_is_rounded_like_the_code():
    """The corrector's time is ``(t + dt)`` in float32, then in the latents' dtype (bfloat16 keeps 3 digits)."""
    s, s_next, seen = 0.8, 0.7, []

    def evaluate(x, cond, level=None):
        seen.append(level)
        return torch.zeros_like(x)

    t = torch.tensor(1000 * s, dtype=torch.float32)
    nxt = Level(torch.tensor(1000 * s_next, dtype=F64), torch.tensor(1 - s_next), torch.tensor(s_next), 4, 10)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(1, 4, dtype=dtype)
        step = Step(x, t, torch.tensor(1 - s), torch.tensor(s), 3, 10, x, x, "flow_prediction", cond=1,
                    evaluate=evaluate, uncond=0, next_level=nxt)
        guidance.RectifiedCFGPlusPlus.official(4.5, 0.0).combine(step)
        want = (t + (torch.tensor(s_next, dtype=torch.float32) - torch.tensor(s, dtype=torch.float32))).to(dtype)
        assert float(seen[-1].t) == float(want), (dtype, float(seen[-1].t), float(want))
    assert float(seen[0].t) == pytest.approx(799.9) and float(seen[-1].t) == 800.0
