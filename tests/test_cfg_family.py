"""Formulas of the CFG family against independent few-line references and diffusers' own code."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeZeroStarGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from diffguide import guidance
from diffguide.guidance.base import Step
from diffguide.guidance.scheduler_step import renoise_step
from diffguide.samplers.base import Level


def make_step(c, u, x=None, index=0, num_steps=10, alpha=0.8, prediction_type="epsilon"):
    x = torch.randn_like(c) if x is None else x
    alpha = torch.tensor(alpha, dtype=c.dtype)
    return Step(x, torch.tensor(500), alpha, (1 - alpha**2).sqrt(), index, num_steps, c, u, prediction_type)


# ---- independent references (guidance.md Appendix A) -------------------------------------------------
def ref_apg(d_c, d_u, w, eta, r, beta, state):
    delta = d_c - d_u
    if beta != 0.0:
        delta = delta + beta * (state if state is not None else torch.zeros_like(delta))
    state = delta
    if r > 0:
        n = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
        delta = delta * torch.clamp(r / n, max=1.0)
    v = d_c.double().flatten(1)
    v = v / v.norm(dim=1, keepdim=True)
    par = ((delta.double().flatten(1) * v).sum(1, keepdim=True) * v).view_as(delta).to(delta.dtype)
    return d_c + (w - 1) * ((delta - par) + eta * par), state


def ref_zero_star(v_c, v_u, w):
    s = (v_c.flatten(1) * v_u.flatten(1)).sum(1) / (v_u.flatten(1).pow(2).sum(1) + 1e-8)
    s = s.view(-1, *[1] * (v_c.ndim - 1))
    return s * v_u + w * (v_c - s * v_u)


def test_cfg_matches_diffusers_order():
    c, u = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    out = guidance.CFG(7.5).combine(make_step(c, u))
    assert torch.equal(out.denoise, u + 7.5 * (c - u)) and torch.equal(out.renoise, out.denoise)


@pytest.mark.parametrize("eta,r,beta", [(0.0, 3.0, -0.5), (1.0, 0.0, 0.0), (0.3, 2.0, 0.4)])
def test_apg_equals_paper_and_diffusers_original_formulation(eta, r, beta):
    torch.manual_seed(0)
    w = 4.0
    apg = guidance.APG(w, eta=eta, norm_threshold=r, momentum=beta)
    buf = MomentumBuffer(beta) if beta != 0 else None
    state = None
    for _ in range(3):
        d_c, d_u = torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.randn(2, 1, 6, 6, dtype=torch.float64)
        ours = apg.update(d_c, d_u)
        paper, state = ref_apg(d_c, d_u, w, eta, r, beta, state)
        theirs = normalized_guidance(d_c, d_u, w - 1, buf, eta, r, use_original_formulation=True)
        assert torch.allclose(ours, paper, atol=1e-12)
        assert torch.allclose(ours, theirs, atol=1e-12)


def test_apg_reduces_to_cfg_and_resets():
    d_c, d_u = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    plain = guidance.APG(3.0, eta=1.0, norm_threshold=0.0, momentum=0.0).update(d_c, d_u)
    assert torch.allclose(plain, d_u + 3.0 * (d_c - d_u), atol=1e-12)
    apg = guidance.APG(3.0, momentum=-0.5)
    first = apg.update(d_c, d_u)
    apg.update(d_c, d_u)
    apg.reset()
    assert torch.equal(apg.update(d_c, d_u), first)


def test_apg_works_in_x0_space_for_eps_models():
    c, u = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    step = make_step(c, u)
    pred = guidance.APG(5.0, eta=0.0, norm_threshold=2.0, momentum=0.0).combine(step).denoise
    x0_ref, _ = ref_apg(step.x0(c), step.x0(u), 5.0, 0.0, 2.0, 0.0, None)
    assert torch.allclose(step.x0(pred), x0_ref, atol=1e-12)


def test_cfgpp_ddim_step_equals_diffusers_step_plus_correction():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    x, c, u = (torch.randn(2, 4, 6, 6) for _ in range(3))
    lam = 0.6
    eps_l = u + lam * (c - u)
    t = sched.timesteps[3]
    got = renoise_step(sched, sched.step, eps_l, u, t, x, "epsilon", {}).prev_sample
    abar_prev = sched.alphas_cumprod[t - 100]
    want = sched.step(eps_l, t, x).prev_sample + (1 - abar_prev).sqrt() * (u - eps_l)
    assert torch.allclose(got, want, atol=1e-6)
    # and the closed form of CFG++ (paper Alg. 2)
    abar = sched.alphas_cumprod[t].double()
    x0 = (x.double() - (1 - abar).sqrt() * eps_l.double()) / abar.sqrt()
    ref = abar_prev.double().sqrt() * x0 + (1 - abar_prev.double()).sqrt() * u.double()
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_cfgpp_is_cfg_with_time_varying_scale():
    """CFG++ DDIM step == CFG DDIM step with omega_t = lam s_t / (s_t - s_prev) (float64)."""
    torch.manual_seed(1)
    x, c, u = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    abar, abar_prev, lam = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), 0.7

    def ddim(eps_data, eps_noise):
        x0 = (x - (1 - abar).sqrt() * eps_data) / abar.sqrt()
        return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_noise

    cfgpp = ddim(u + lam * (c - u), u)
    w = guidance.equivalent_cfg_scale(lam, abar, abar_prev)
    cfg = ddim(u + w * (c - u), u + w * (c - u))
    assert torch.allclose(cfgpp, cfg, atol=1e-12)


def test_cfgpp_euler_correction_equals_ve_formula():
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(8)
    x, c, u = (torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    sched.sigmas = sched.sigmas.double()
    lam = 0.5
    eps_l = u + lam * (c - u)
    s, s_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    got = renoise_step(sched, sched.step, eps_l, u, sched.timesteps[0], x, "epsilon", {}).prev_sample
    d_l, d_u = x - s * eps_l, x - s * u  # VE denoised estimates
    want = d_l + s_next * (x - d_u) / s
    assert torch.allclose(got.double(), want, atol=1e-5)


def ref_euler_ancestral_cfgpp(x, eps_c, eps_u, lam, s, s_next, z):
    """CFG++ Euler-ancestral (guidance.md 2.3, k-diffusion VE form, eta = 1): x <- D_lam + s_down d_u + s_up z."""
    den_lam, den_u = x - s * (eps_u + lam * (eps_c - eps_u)), x - s * eps_u  # VE denoised estimates D_lam, D_u
    d_u = (x - den_u) / s
    s_up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    s_down = (s_next**2 - s_up**2) ** 0.5
    return den_lam + s_down * d_u + s_up * z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("index", [0, 4, 5])  # 5: the last step, to sigma 0
def test_cfgpp_euler_ancestral_step_renoises_with_uncond(prediction_type, index):
    sched = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            prediction_type=prediction_type)
    sched.set_timesteps(6)
    sched.sigmas = sched.sigmas.double()
    sched._step_index = index
    g = torch.Generator().manual_seed(index)
    x, eps_c, eps_u = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    s, s_next = float(sched.sigmas[index]), float(sched.sigmas[index + 1])
    x = x * (1 + s**2) ** 0.5  # a VE state of the right scale
    lam = 0.7
    if prediction_type == "epsilon":
        pred_c, pred_u = eps_c, eps_u
    else:  # v from eps in the VP frame: x_vp = alpha x_ve, v = (eps - sigma x_vp) / alpha
        alpha, sigma = (1 + s**2) ** -0.5, s * (1 + s**2) ** -0.5
        pred_c, pred_u = ((e - sigma * alpha * x) / alpha for e in (eps_c, eps_u))
    pred_lam = pred_u + lam * (pred_c - pred_u)
    got = renoise_step(sched, sched.step, pred_lam, pred_u, sched.timesteps[index], x, prediction_type, {},
                       generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    want = ref_euler_ancestral_cfgpp(x.double(), eps_c.double(), eps_u.double(), lam, s, s_next, z.double())
    assert sched.step_index == index + 1
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5), (got.double() - want).abs().max()
    eps_lam = (eps_u + lam * (eps_c - eps_u)).double()
    plain = ref_euler_ancestral_cfgpp(x.double(), eps_lam, eps_lam, 1.0, s, s_next, z.double())
    if index < 5:  # renoising with eps_lam instead (plain Euler-a on the guided eps) is measurably different
        assert (got.double() - plain).abs().max() > 1e-3


def test_cfg_zero_star_matches_reference_and_diffusers():
    c, u = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    ours = guidance.CFGZeroStar(4.0).combine(make_step(c, u, index=2)).denoise
    assert torch.allclose(ours, ref_zero_star(c, u, 4.0), atol=1e-6)
    theirs = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    theirs.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
    assert torch.allclose(ours, theirs.forward(c, u).pred, atol=1e-5)
    zero = guidance.CFGZeroStar(4.0, zero_init_steps=1).combine(make_step(c, u, index=0)).denoise
    assert torch.equal(zero, torch.zeros_like(c))


def test_rescale_reference():
    c, u = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    out = guidance.CFGRescale(5.0, 0.7).combine(make_step(c, u)).denoise
    x = u + 5.0 * (c - u)
    r = c.std(dim=(1, 2, 3), keepdim=True) / x.std(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, 0.7 * x * r + 0.3 * x, atol=1e-6)


def test_interval_gates_on_ve_sigma_and_skips_rows():
    inner = guidance.APG(3.0, momentum=0.0)
    guide = guidance.GuidanceInterval(inner, sigma_lo=0.5, sigma_hi=2.0)
    c, u = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    inside = make_step(c, u, alpha=1 / math.sqrt(2))  # ve sigma 1
    outside = make_step(c, u, alpha=0.2)  # ve sigma ~4.9
    assert torch.equal(guide.combine(inside).denoise, inner.combine(inside).denoise)
    assert torch.equal(guide.combine(outside).denoise, c)
    lvl = lambda a: Level(torch.tensor(1), torch.tensor(a), torch.tensor((1 - a * a) ** 0.5), 0, 10)
    assert guide.needs_uncond(lvl(1 / math.sqrt(2)), 2).all() and not guide.needs_uncond(lvl(0.2), 2).any()


@pytest.mark.parametrize("make", [
    lambda: guidance.CFG(-1.0), lambda: guidance.CFG(float("nan")), lambda: guidance.CFGPlusPlus(float("inf")),
    lambda: guidance.APG(2.0, eta=1.5), lambda: guidance.APG(2.0, momentum=1.0), lambda: guidance.APG(2.0, norm_threshold=-1),
    lambda: guidance.CFGRescale(2.0, phi=2.0), lambda: guidance.GuidanceInterval(guidance.CFG(2.0), 2.0, 1.0),
    lambda: guidance.CFGZeroStar(2.0, zero_init_steps=-1),
])
def test_bad_hyper_parameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError):
        guidance.CFG("7")
    with pytest.raises(TypeError):
        guidance.GuidanceInterval("cfg", 0.1, 1.0)


def test_shape_mismatch_and_missing_uncond():
    c = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        guidance.CFG(2.0).combine(make_step(c, torch.randn(2, 1, 4, 5), x=c))
    with pytest.raises(ValueError, match="unconditional"):
        guidance.CFGPlusPlus(0.5).combine(make_step(c, None))
    with pytest.raises(ValueError, match="prediction_type"):
        make_step(c, c, prediction_type="rectified")


def test_registry_builds_and_validates():
    name, scales, params = guidance.parse_guide_spec("apg@1,2:eta=0.5,norm_threshold=2")
    assert (name, scales, params) == ("apg", [1.0, 2.0], {"eta": 0.5, "norm_threshold": 2})
    guide = guidance.build_guide("cfgpp", 0.4, sigma_hi=3.0)
    assert isinstance(guide, guidance.GuidanceInterval) and guide.guide.lam == 0.4
    with pytest.raises(ValueError, match="known"):
        guidance.build_guide("nope")
    with pytest.raises(TypeError):
        guidance.build_guide("cfg", 2.0, lam=1.0)
    with pytest.raises(ValueError, match="key=value"):
        guidance.parse_guide_spec("cfg:scale")


def test_non_finite_predictions_are_refused_with_the_step():
    from diffguide.guidance import GuidedDenoiser
    from diffguide.samplers.base import Level

    def model(x, t, cond):
        out = torch.zeros_like(x)
        out[cond == 1, 0] = float("nan")                               # the conditional rows diverge
        return out

    guided = GuidedDenoiser(model, guidance.CFG(2.0), torch.ones(2), torch.zeros(2))
    level = Level(t=torch.tensor(500), alpha=torch.tensor(0.6), sigma=torch.tensor(0.8), index=3, num_steps=10)
    with pytest.raises(FloatingPointError, match="step 3 of 10"):
        guided(torch.randn(2, 3), level)


# ---- CFG++ on DPMSolverMultistepScheduler: every accepted option followed (issue 18) -------------------------
DPM_OPTIONS = [dict(solver_type=st, lower_order_final=lof, final_sigmas_type=fs, euler_at_final=eaf, use_flow_sigmas=fl)
               for st in ("midpoint", "heun") for lof in (True, False) for fs in ("zero", "sigma_min")
               for eaf in (False, True) for fl in (False, True) if not (eaf and lof)] + [dict(solver_order=1)]


def _dpm(options, prediction_type):
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type=prediction_type, **options)
    sched.set_timesteps(6)
    return sched


@pytest.mark.parametrize("options", DPM_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_cfgpp_dpmpp_with_equal_estimates_is_the_scheduler_step(options):
    """cond == uncond: the CFG++ step must be DPMSolverMultistepScheduler.step, step for step, for each option."""
    prediction_type = "flow_prediction" if options.get("use_flow_sigmas") else "epsilon"
    plain, ours = _dpm(options, prediction_type), _dpm(options, prediction_type)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    x_plain, x_ours, state = x.clone(), x.clone(), {}
    for t in plain.timesteps:
        pred = torch.randn(x.shape, generator=g)
        x_plain = plain.step(pred, t, x_plain).prev_sample
        x_ours = renoise_step(ours, ours.step, pred, pred, t, x_ours, prediction_type, state).prev_sample
        assert torch.allclose(x_ours, x_plain, atol=2e-5, rtol=1e-5), (t, (x_ours - x_plain).abs().max())
        x_ours = x_plain.clone()  # compare each step from the same state


@pytest.mark.parametrize("options", [dict(algorithm_type="sde-dpmsolver"), dict(solver_order=3),
                                     dict(thresholding=True), dict(algorithm_type="dpmsolver")])
def test_cfgpp_dpmpp_refuses_options_it_does_not_follow(options):
    from diffusers import DPMSolverMultistepScheduler
    from diffguide.guidance.scheduler_step import check_scheduler
    kwargs = dict(options)
    if kwargs.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver"):
        kwargs["final_sigmas_type"] = "sigma_min"
    with pytest.raises(ValueError, match="does not follow"):
        check_scheduler(DPMSolverMultistepScheduler(**kwargs))


def test_cfgpp_dpmpp_first_and_second_order_steps_follow_the_formula():
    """Unequal estimates: step 0 is the DDIM CFG++ step, step 1 adds the midpoint term on D_l - D_u_prev."""
    sched = _dpm(dict(solver_type="midpoint"), "epsilon")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    state, prev_du = {}, None
    for i, t in enumerate(sched.timesteps[:2]):
        eps_c, eps_u = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
        eps_l = eps_u + 0.6 * (eps_c - eps_u)
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        a, b = 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)
        a2, b2 = 1 / math.sqrt(1 + s_next**2), s_next / math.sqrt(1 + s_next**2)
        d_l, d_u = (x - b * eps_l) / a, (x - b * eps_u) / a
        want = a2 * d_l + b2 * eps_u
        h = math.log(a2 / b2) - math.log(a / b)
        if i == 1:
            h_prev = math.log(a / b) - math.log(a_prev / b_prev)
            want = want - 0.5 * a2 * math.expm1(-h) * (d_l - prev_du) * h / h_prev
        x = renoise_step(sched, sched.step, eps_l, eps_u, t, x, "epsilon", state).prev_sample
        assert torch.allclose(x, want, atol=1e-10), (i, (x - want).abs().max())
        prev_du, a_prev, b_prev = d_u, a, b


def test_cfg_zero_star_computes_s_star_in_float32_for_fp16_latents():
    """An SDXL-size fp16 latent (std 1.5): ||u||^2 ~ 1.5e5 overflows fp16 (max 65504); s* must still be right (issue 18)."""
    g = torch.Generator().manual_seed(5)
    u = 1.5 * torch.randn(2, 4, 128, 128, generator=g, dtype=torch.float64)
    c = 0.8 * u + 0.3 * torch.randn(u.shape, generator=g, dtype=torch.float64)
    assert torch.isinf(u.half().flatten(1).pow(2).sum(1)).all()  # the overflow the fix is about
    ours = guidance.CFGZeroStar(4.0).combine(make_step(c.half(), u.half(), index=3)).denoise
    want = ref_zero_star(c.half().double(), u.half().double(), 4.0)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert torch.allclose(ours.double(), want, atol=4e-3, rtol=2e-3), (ours.double() - want).abs().max()
