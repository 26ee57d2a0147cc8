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
    """The corrector's time is ``(t + dt)`` in float32, then in the latents' dtype (bfloat16: 800, not 799.9)."""
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


# ---- CFG-Zero* ---------------------------------------------------------------------------------------------------
def official_zero_star(v_c, v_u, w, prompts=None):
    """The official combination: ``optimized_scale`` on float32 copies (diffusers' ``.float()``; the official
    ``autocast(float32)``), ``alpha.to(dtype)``, then ``u * alpha + w (c - u * alpha)`` in the input dtype. One
    ``s*`` per prompt: ``view(prompts, -1)`` (prompts = batch for one image per prompt)."""
    prompts = len(v_c) if prompts is None else prompts
    positive, negative = v_c.reshape(prompts, -1).float(), v_u.reshape(prompts, -1).float()
    alpha = (positive * negative).sum(1, keepdim=True) / ((negative**2).sum(1, keepdim=True) + 1e-8)
    alpha = alpha.repeat_interleave(len(v_c) // prompts, 0).view(len(v_c), *[1] * (v_c.ndim - 1)).to(v_c.dtype)
    return v_u * alpha + w * (v_c - v_u * alpha)


def zero_star_step(c, u, index=3, family=None):
    return Step(c, torch.tensor(500.0), torch.tensor(0.5), torch.tensor(0.5), index, 10, c, u, "flow_prediction",
                family=family)


def predictions(dtype, seed=0, scale=11.0):
    g = torch.Generator().manual_seed(seed)
    c = scale * torch.randn(4, 4, 16, 16, generator=g)
    return c.to(dtype), (0.8 * c + scale * 0.3 * torch.randn(c.shape, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cfg_zero_star_official_arithmetic_is_bit_for_bit(dtype):
    """``arithmetic="official"`` == the official combination and diffusers' ClassifierFreeZeroStarGuidance, bit for
    bit; the default float32 combination is not (bf16 / fp16 inputs)."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    c, u = predictions(dtype)
    ours = guidance.CFGZeroStar(4.0, arithmetic="official").combine(zero_star_step(c, u)).denoise
    assert ours.dtype == dtype and torch.equal(ours, official_zero_star(c, u, 4.0))
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    guider.set_state(3, 10, torch.tensor(500.0))
    assert torch.equal(ours, guider.forward(pred_cond=c, pred_uncond=u).pred)
    default = guidance.CFGZeroStar(4.0).combine(zero_star_step(c, u)).denoise
    assert torch.equal(default, ours) == (dtype == torch.float32)


def test_cfg_zero_star_float32_combination_is_closer_to_float64_than_the_official_one():
    """bfloat16 inputs of magnitude ~11 (4 x 1024 values, 3 seeds; results up to ~70): the float32 combination
    rounded once is within half a bf16 ulp of the float64 result and equals it correctly rounded (measured 99.95-100%
    of values); the official one, combining in bfloat16, is correctly rounded for 41-45% of values, off by 1.2-1.3
    ulps on average (ours 0.24) and by up to 0.5 in absolute terms where terms cancel."""
    for seed in range(3):
        c, u = predictions(torch.bfloat16, seed)
        s = (c.double().flatten(1) * u.double().flatten(1)).sum(1) / (u.double().flatten(1).pow(2).sum(1) + 1e-8)
        s = s.view(-1, 1, 1, 1)
        exact = s * u.double() + 4.0 * (c.double() - s * u.double())
        ours = guidance.CFGZeroStar(4.0).combine(zero_star_step(c, u)).denoise.double()
        theirs = official_zero_star(c, u, 4.0).double()
        # a bfloat16 ulp (8 significant bits) at |exact|, at least that of 1 (near-zero results cancel in float32)
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1.0))) - 7)
        err_ours, err_theirs = (ours - exact).abs() / ulp, (theirs - exact).abs() / ulp
        assert float(err_ours.max()) <= 0.5 + 1e-3, float(err_ours.max())
        assert float((ours == exact.to(torch.bfloat16).double()).double().mean()) > 0.999
        assert float(err_theirs.max()) > 1.0 and float(err_theirs.mean()) > 3 * float(err_ours.mean())
        assert float((theirs == exact.to(torch.bfloat16).double()).double().mean()) < 0.6


def test_cfg_zero_star_s_star_per_sample_keeps_samples_independent_of_their_batch_mates():
    """Ours: one ``s*`` per sample, so a sample's prediction is the same alone or beside another image of its
    prompt. The official per-prompt ``s*`` (two images of one prompt share it) is not."""
    c, u = predictions(torch.float32)
    c, u = c[:2], u[:2]
    guide = guidance.CFGZeroStar(4.0)
    pair = guide.combine(zero_star_step(c, u)).denoise
    alone = torch.cat([guide.combine(zero_star_step(c[i:i + 1], u[i:i + 1])).denoise for i in range(2)])
    assert torch.equal(pair, alone)
    torch.testing.assert_close(pair, official_zero_star(c, u, 4.0), rtol=1e-5, atol=1e-5)  # one image per prompt
    per_prompt = official_zero_star(c, u, 4.0, prompts=1)
    assert (per_prompt - pair).abs().max() > 1e-2


def test_cfg_zero_star_zero_init_steps_k_is_the_official_zero_steps_k_minus_one():
    """Official: zero for ``use_zero_init and i <= zero_steps``; ours: ``i < zero_init_steps``."""
    c, u = predictions(torch.float32)
    for k in range(4):
        guide = guidance.CFGZeroStar(4.0, zero_init_steps=k)
        use_zero_init, zero_steps = k > 0, k - 1
        for i in range(5):
            zeroed = not guide.combine(zero_star_step(c, u, index=i)).denoise.any()
            assert zeroed == (use_zero_init and i <= zero_steps), (k, i)


def test_cfg_zero_star_at_scale_one_is_the_official_sd3_code_no_cfg_block():
    """w = 1: the official SD3 pipeline skips the CFG block (no zero-init, no unconditional rows). Through apply
    on tiny SD3, CFGZeroStar(1.0) is bit-identical to the native call at guidance_scale=1, conditional rows only."""
    c, u = predictions(torch.float32)
    assert torch.equal(guidance.CFGZeroStar(1.0).combine(zero_star_step(c, u, index=0)).denoise, c)
    pipe = tiny_sd3()
    kw = dict(embeds("sd3", 2), num_inference_steps=2, output_type="latent")
    native = pipe(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))[0]
    with guidance.apply(pipe, guidance.CFGZeroStar(1.0)) as stats:
        hooked = pipe(**kw, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(native, hooked) and stats.rows == 2 * 2


def test_cfg_zero_star_default_zero_init_follows_the_family_demo():
    """Family.zero_init_steps: the official demos' zero_steps + 1 (Wan T2V, CogView4: 2; SD3: 1). Outside apply
    (no family) a flow model gets 1. Through apply on tiny Wan, the default equals zero_init_steps=2 bit for bit."""
    family = {name: f for f in FAMILIES for name in f.pipelines}
    assert family["WanPipeline"].zero_init_steps == family["CogView4Pipeline"].zero_init_steps == 2
    assert family["StableDiffusion3Pipeline"].zero_init_steps == 1
    c, u = predictions(torch.float32)
    guide = guidance.CFGZeroStar(4.0)
    zeroed = lambda fam: not guide.combine(zero_star_step(c, u, index=1, family=fam)).denoise.any()
    assert zeroed(family["WanPipeline"]) and not zeroed(family["StableDiffusion3Pipeline"]) and not zeroed(None)
    pipe = tiny_wan()
    kw = dict(embeds("wan", 1), num_inference_steps=3, output_type="latent")
    runs = {}
    for k in (None, 1, 2):
        with guidance.apply(pipe, guidance.CFGZeroStar(4.0, zero_init_steps=k)):
            runs[k] = pipe(**kw, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(runs[None], runs[2]) and not torch.equal(runs[None], runs[1])
