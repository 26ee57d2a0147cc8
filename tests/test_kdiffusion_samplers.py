"""The k-diffusion-style loops against k-diffusion's samplers of the same name, and the plan builders.

Both sides run in float64 on the exact denoiser of a Gaussian mixture (ours on the VP state through
``ClassConditionalGMM.denoiser``, k-diffusion's on its VE state ``x0 + s eps``), from the same initial noise and with
the same noise stream; they agree to float64 rounding (atol 1e-12 on states of size ~10).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

k_sampling = pytest.importorskip("k_diffusion.sampling")

from diffguide.guidance import CFGPlusPlus, GuidedDenoiser  # noqa: E402
from diffguide.samplers import (SAMPLERS, BrownianTreeNoise, GaussianNoise, diffusers_model_fn,  # noqa: E402
                                exponential_plan, karras_plan, plan_from_scheduler, plan_from_sigmas,
                                polyexponential_plan)
from diffguide.samplers.sigmas import timestep_at  # noqa: E402
from diffguide.tasks.gmm import ClassConditionalGMM, FlowMatchingGMM, GaussianMixture  # noqa: E402

F64 = torch.float64
DDPM = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def t64(x):
    return torch.tensor(x, dtype=F64)


def mixture() -> GaussianMixture:
    covs = t64([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]])
    return GaussianMixture(t64([0.3, 0.5, 0.2]), t64([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]]), covs)


def k_model(mix: GaussianMixture):
    """k-diffusion's denoiser: VE state ``x0 + s eps`` at sigma ``s`` -> E[x0 | x]."""
    return lambda x, sigma: mix.denoise(x, 1.0, sigma[0])


def our_model(mix: GaussianMixture):
    return ClassConditionalGMM([mix], DDPM.alphas_cumprod).denoiser()


def snap(level) -> float:
    return float(f"{float(level):.12g}")


def gaussian_stream(x, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda s, s_next: torch.randn(x.shape, generator=g, dtype=x.dtype)


CASES = {  # our name -> (k-diffusion sampler, kwargs, noise: None / "gauss" / "brownian" / "global")
    "heun": ("sample_heun", {}, None),
    "heun_churn": ("sample_heun", {"s_churn": 4.0, "s_noise": 1.003}, "global"),
    "dpm_2": ("sample_dpm_2", {}, None),
    "dpm_2_churn": ("sample_dpm_2", {"s_churn": 2.0}, "global"),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {"eta": 0.7}, "gauss"),
    "lms": ("sample_lms", {}, None),
    "lms_order_2": ("sample_lms", {"order": 2}, None),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}, "gauss"),
    "dpmpp_2s_ancestral_eta": ("sample_dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 0.9}, "gauss"),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, "brownian"),
    "dpmpp_sde_r": ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.3}, "brownian"),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, "brownian"),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, "brownian"),
    "dpmpp_2m_sde_eta0": ("sample_dpmpp_2m_sde", {"eta": 0.0}, "brownian"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, "brownian"),
    "dpmpp_3m_sde_eta": ("sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.1}, "brownian"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loop_equals_k_diffusion(case):
    name, kwargs, noise = CASES[case]
    ours_fn = SAMPLERS[name.removeprefix("sample_")]
    mix = mixture()
    plan = karras_plan(12, sigma_min=0.03, sigma_max=14.6, scheduler=DDPM)
    sigmas = plan.sigmas
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_ve = z * sigmas[0]  # k-diffusion's start; ours is the same state in VP form
    x_vp = x_ve / (1 + sigmas[0] ** 2).sqrt()
    theirs_kw, ours_kw = dict(kwargs), dict(kwargs)
    if noise == "gauss":
        theirs_kw["noise_sampler"], ours_kw["noise_sampler"] = gaussian_stream(z, 1), gaussian_stream(z, 1)
    elif noise == "brownian":
        # k-diffusion asks for exp(-(-log s)), one rounding away from s: both query the tree at 12 digits
        # (a Brownian path moves by sqrt(dt), 1e-8 for dt = 1e-16)
        low = float(sigmas[sigmas > 0].min())
        theirs_tree = k_sampling.BrownianTreeNoiseSampler(x_ve, t64(low), sigmas[0], seed=3)
        ours_tree = BrownianTreeNoise(x_vp, low, float(sigmas[0]), seed=3)
        theirs_kw["noise_sampler"] = lambda a, b: theirs_tree(t64(snap(a)), t64(snap(b)))
        ours_kw["noise_sampler"] = lambda a, b: ours_tree(snap(a), snap(b))
    elif noise == "global":
        ours_kw["noise_sampler"] = lambda s, s_next: torch.randn_like(z)
    torch.manual_seed(5)
    theirs = getattr(k_sampling, name)(k_model(mix), x_ve, sigmas, disable=True, **theirs_kw)
    torch.manual_seed(5)
    ours = ours_fn(our_model(mix), x_vp, plan, disable=True, **ours_kw)
    gap = float((ours - theirs).abs().max())
    assert torch.isfinite(ours).all() and gap < 1e-12, f"{case}: {gap}"
    assert float((theirs - z).abs().max()) > 1  # the run moved


def test_brownian_tree_noise_equals_k_diffusion_and_is_batch_independent():
    x = torch.zeros(3, 2, dtype=F64)
    ours, theirs = (BrownianTreeNoise(x, 0.1, 10.0, seed=7),
                      k_sampling.BrownianTreeNoiseSampler(x, t64(0.1), t64(10.0), seed=7))  # float64 times
    for a, b in ((10.0, 5.0), (5.0, 0.1), (3.0, 2.9)):
        torch.testing.assert_close(ours(a, b), theirs(t64(a), t64(b)), rtol=0, atol=1e-14)
    # one tree per image: image 1's noise does not depend on the batch around it
    batch = BrownianTreeNoise(x, 0.1, 10.0, seed=[11, 12, 13])(4.0, 2.0)
    alone = BrownianTreeNoise(x[:1], 0.1, 10.0, seed=[12])(4.0, 2.0)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    # a step split in two sees the same path: the increments add up (Brownian bridge)
    tree = BrownianTreeNoise(x, 0.1, 10.0, seed=5)
    whole = tree(4.0, 1.0) * math.sqrt(3.0)
    torch.testing.assert_close(tree(4.0, 2.0) * math.sqrt(2.0) + tree(2.0, 1.0), whole, rtol=0, atol=1e-12)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    rows = GaussianNoise(x, gens)(1.0, 0.5)
    torch.testing.assert_close(rows[2], torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=F64))


def test_sde_loop_with_brownian_noise_converges_as_steps_grow():
    """With one Brownian path, the DPM++ 2M SDE result at 2n steps is closer to the 4n-step one than at n steps
    (fresh Gaussian noise per step has no such limit)."""
    mix = mixture()
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = {}
    for n in (10, 20, 80):
        plan = karras_plan(n, sigma_min=0.03, sigma_max=14.6)
        noise = BrownianTreeNoise(z, 0.03, 14.6, seed=9)
        out[n] = SAMPLERS["dpmpp_2m_sde"](our_model(mix), z / math.sqrt(1 + 14.6**2), plan, noise_sampler=noise,
                                         disable=True)
    assert float((out[20] - out[80]).norm()) < 0.6 * float((out[10] - out[80]).norm())


# ------------------------------------------------------------------------------------------------------------
# UniPC against diffusers' UniPCMultistepScheduler
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{}, {"solver_order": 3}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                                    {"solver_order": 3, "disable_corrector": [0, 3]}])
def test_unipc_follows_diffusers(config):
    """diffusers steps in float32 (its sigmas); tolerance: steps * eps32 * max |state|. (bh1 ends at sigma_min:
    diffusers' bh1 step to sigma 0 computes -inf * 0.)"""
    steps = 12
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = UniPCMultistepScheduler(**base, **config)
    mix = mixture()
    gmm = ClassConditionalGMM([mix], scheduler.alphas_cumprod)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    scheduler.set_timesteps(steps)
    x, theirs = z, []
    for t in scheduler.timesteps:
        x = scheduler.step(gmm.eps(x, t), t, x).prev_sample.to(F64)
        theirs.append(x)
    plan = plan_from_scheduler(UniPCMultistepScheduler(**base, **config), steps)
    ours = []
    kwargs = {"order": config.get("solver_order", 2), "variant": config.get("solver_type", "bh2"),
              "disable_corrector": config.get("disable_corrector", ())}
    SAMPLERS["unipc"](GuidedDenoiser(gmm.eps, None, None), z, plan, callback=lambda d: ours.append(d["x"]),
                      disable=True, **kwargs)
    atol = steps * torch.finfo(torch.float32).eps * max(float(s.abs().max()) for s in theirs) * 4
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert float((a - b).abs().max()) < atol, (i, float((a - b).abs().max()), atol)


def test_unipc_follows_diffusers_with_flow_sigmas():
    steps = 10
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    mix = mixture()
    net = FlowMatchingGMM([mix])
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    scheduler = UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    x, theirs = z, []
    for t in scheduler.timesteps:
        x = scheduler.step(net.velocity(x, t), t, x).prev_sample.to(F64)
        theirs.append(x)
    plan = plan_from_scheduler(UniPCMultistepScheduler(**config), steps)
    den = GuidedDenoiser(lambda x_, t, c: net.velocity(x_, t), None, None, prediction_type="flow")
    ours = []
    start = z * (plan.alpha(0) + plan.sigma_vp(0))
    SAMPLERS["unipc"](den, start, plan, disable=True,
                      callback=lambda d: ours.append(d["x"] / (plan.alpha(d["i"] + 1) + plan.sigma_vp(d["i"] + 1))))
    atol = steps * torch.finfo(torch.float32).eps * max(float(s.abs().max()) for s in theirs) * 4
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert float((a - b).abs().max()) < atol, (i, float((a - b).abs().max()), atol)


# ------------------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs, kwargs", [
    (karras_plan, "get_sigmas_karras", {"rho": 7.0}),
    (karras_plan, "get_sigmas_karras", {"rho": 3.0}),
    (exponential_plan, "get_sigmas_exponential", {}),
    (polyexponential_plan, "get_sigmas_polyexponential", {"rho": 2.0}),
])
def test_schedules_equal_k_diffusion(ours, theirs, kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # k-diffusion builds its ramp in the default dtype
    try:
        ref = getattr(k_sampling, theirs)(17, 0.0292, 14.6146, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    plan = ours(17, sigma_min=0.0292, sigma_max=14.6146, **kwargs)
    assert plan.num_steps == 17 and float(plan.sigmas[-1]) == 0.0
    torch.testing.assert_close(plan.sigmas, ref, rtol=1e-14, atol=0)


def test_plan_timesteps_follow_the_training_table():
    """VP: log-sigma interpolation in alphas_cumprod (integer levels give their own timestep; k-diffusion's
    ``DiscreteSchedule.sigma_to_t``); flow: 1000 u; VE: the sigma itself."""
    abar = DDPM.alphas_cumprod.to(F64)
    table = ((1 - abar) / abar).sqrt()
    plan = plan_from_sigmas(torch.cat([table[[900, 500, 20]], t64([0.0])]), scheduler=DDPM)
    torch.testing.assert_close(plan.timesteps.to(F64), t64([900.0, 500.0, 20.0]), rtol=0, atol=1e-3)
    mid = math.exp(0.5 * (math.log(table[500]) + math.log(table[501])))
    assert abs(float(plan.timestep_fn(t64(mid))) - 500.5) < 1e-9
    flow = plan_from_sigmas([1.0, 0.6, 0.25, 0.0], kind="flow")
    assert math.isinf(flow.sigmas[0]) and torch.allclose(flow.timesteps, torch.tensor([1000.0, 600.0, 250.0]))
    ve = plan_from_sigmas([5.0, 1.0, 0.0])
    assert torch.equal(ve.timesteps, torch.tensor([5.0, 1.0]))
    # a plain plan interpolates its own levels; a FlowMatch plan exactly so (t = 1000 u)
    fm = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 8)
    s = math.sqrt(float(fm.sigmas[2] * fm.sigmas[3]))
    assert abs(float(timestep_at(fm, s, 2)) - 1000 * s / (1 + s)) < 1e-3
    assert torch.equal(timestep_at(fm, float(fm.sigmas[3]), 2), fm.timesteps[3])


def test_plan_builders_refuse_bad_arguments():
    for bad in ([1.0, 2.0, 0.0], [3.0, 3.0], [1.0], [2.0, -1.0], [[2.0, 1.0]], [math.nan, 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            plan_from_sigmas(bad)
    with pytest.raises(ValueError, match="flow levels"):
        plan_from_sigmas([1.5, 0.5, 0.0], kind="flow")
    with pytest.raises(ValueError, match="kind"):
        plan_from_sigmas([2.0, 0.0], kind="vp")
    with pytest.raises(ValueError, match="finite"):
        plan_from_sigmas([math.inf, 1.0, 0.0])
    for fn in (karras_plan, exponential_plan, polyexponential_plan):
        with pytest.raises(ValueError, match="sigma_min"):
            fn(10, sigma_min=2.0, sigma_max=1.0)
        with pytest.raises(ValueError, match="n must"):
            fn(0, sigma_min=0.1, sigma_max=1.0)
        with pytest.raises(ValueError, match="sigma_max must be <= 1"):
            fn(10, sigma_min=0.1, sigma_max=2.0, kind="flow")
    with pytest.raises(ValueError, match="rho"):
        karras_plan(10, sigma_min=0.1, sigma_max=1.0, rho=0)


# ------------------------------------------------------------------------------------------------------------
# flow plans, errors
# ------------------------------------------------------------------------------------------------------------
NEW = ["heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
       "dpmpp_3m_sde", "unipc"]


@pytest.mark.parametrize("name", NEW)
def test_new_loops_take_the_pure_noise_step_of_a_flow_plan(name):
    """From s = inf (alpha = 0): finite states, and the first x0 estimate is the prior mean."""
    mix = mixture()
    net = FlowMatchingGMM([mix])
    den = GuidedDenoiser(diffusers_model_fn(net), None, {"class_labels": torch.zeros(8, dtype=torch.long)},
                         prediction_type="flow")
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 6)
    seen = []
    x = torch.randn(8, 1, 2, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = SAMPLERS[name](den, x, plan, callback=seen.append, disable=True)
    torch.testing.assert_close(seen[0]["x0_hat"], mix.mean().view(1, 1, 2, 1).expand(8, 1, 2, 1), rtol=0, atol=1e-12)
    assert torch.isfinite(out).all() and len(seen) == 6


@pytest.mark.parametrize("name", ["heun", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde", "euler"])
def test_a_guide_is_reset_once_per_run_also_by_two_stage_samplers(name):
    """Step 0's second evaluation keeps the guide's state; each new run starts from a reset guide."""
    from diffguide.guidance import CFG

    class Counted(CFG):
        resets = 0

        def reset(self):
            Counted.resets += 1
            super().reset()

    mix = mixture()
    gmm = ClassConditionalGMM([mix, mix], DDPM.alphas_cumprod)
    den = GuidedDenoiser(gmm.eps, Counted(2.0), torch.zeros(4, dtype=torch.long), torch.full((4,), 2))
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for run in (1, 2, 3):
        SAMPLERS[name](den, x, karras_plan(1 if run == 2 else 4, sigma_min=0.1, sigma_max=5.0), disable=True)
        assert Counted.resets == run


@pytest.mark.parametrize("name", ["heun", "dpm_2", "dpm_2_ancestral", "lms", "unipc"])
def test_cfgpp_is_refused_where_undefined(name):
    mix = mixture()
    gmm = ClassConditionalGMM([mix, mix], DDPM.alphas_cumprod)
    den = GuidedDenoiser(gmm.eps, CFGPlusPlus(0.5), torch.zeros(4, dtype=torch.long), torch.full((4,), 2))
    with pytest.raises(ValueError, match=f"{name}.*no CFG\\+\\+ form"):
        SAMPLERS[name](den, torch.randn(4, 2, dtype=F64), karras_plan(4, sigma_min=0.1, sigma_max=5.0), disable=True)


def test_bad_sampler_arguments_raise():
    mix = mixture()
    den, x = our_model(mix), torch.zeros(3, 2, dtype=F64)
    plan = karras_plan(4, sigma_min=0.1, sigma_max=5.0)
    cases = [("heun", {"s_churn": -1.0}, "s_churn"), ("dpm_2", {"s_tmax": -1.0}, "s_tmax"),
             ("dpm_2_ancestral", {"eta": 1.5}, "eta"), ("dpmpp_2s_ancestral", {"eta": -0.1}, "eta"),
             ("dpmpp_sde", {"r": 0.0}, "r must"), ("dpmpp_2m_sde", {"solver_type": "rk4"}, "solver_type"),
             ("dpmpp_3m_sde", {"s_noise": -1.0}, "s_noise"), ("lms", {"order": 0}, "order"),
             ("unipc", {"order": 4}, "order"), ("unipc", {"variant": "bh3"}, "variant"),
             ("dpmpp_sde", {"noise_sampler": 3}, "noise_sampler")]
    for name, kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            SAMPLERS[name](den, x, plan, disable=True, **kwargs)
    for name in NEW:
        with pytest.raises(TypeError, match="Plan"):
            SAMPLERS[name](den, x, plan.sigmas, disable=True)
    with pytest.raises(ValueError, match="seeds"):
        BrownianTreeNoise(x, 0.1, 1.0, seed=[1, 2])
    with pytest.raises(ValueError, match="generators"):
        GaussianNoise(x, [torch.Generator()])


def test_default_sde_noise_is_one_brownian_tree_per_image_for_a_list_of_generators():
    """Image 1 sampled alone or in a batch of 3 (one generator per image): the same result."""
    mix = mixture()
    plan = karras_plan(6, sigma_min=0.05, sigma_max=10.0)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = SAMPLERS["dpmpp_sde"](our_model(mix), x, plan, generator=gens([5, 6, 7]), disable=True)
    alone = SAMPLERS["dpmpp_sde"](our_model(mix), x[1:2], plan, generator=gens([6]), disable=True)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    assert float((batch[0] - batch[1]).abs().max()) > 0


def test_flow_kind_plans_and_starting_at_keep_the_timestep_map():
    plan = karras_plan(5, sigma_min=0.02, sigma_max=1.0, kind="flow")  # Karras spacing of flow levels, from u = 1
    assert math.isinf(plan.sigmas[0]) and float(plan.timesteps[0]) == 1000.0
    later = plan.starting_at(2)
    assert later.timestep_fn is plan.timestep_fn and torch.equal(later.timesteps, plan.timesteps[2:])
    u = float(plan.sigmas[2] / (1 + plan.sigmas[2]))
    assert abs(float(later.timesteps[0]) - 1000 * u) < 1e-3
