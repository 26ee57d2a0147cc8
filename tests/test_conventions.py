"""Prediction-type conventions: converters against the closed forms, and guides across parametrisations."""

import pytest
import torch

from diffguide import guidance
from diffguide.guidance.base import Step
from diffguide.samplers.schedule import PREDICTION_TYPES, from_x0, to_eps, to_x0

F64 = torch.float64


def vp_pair(batch, seed=0):
    """Per-sample VP coefficients (alpha^2 + sigma^2 = 1), shaped to broadcast over (B, C, H, W)."""
    alpha = torch.rand(batch, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.9 + 0.05
    return alpha, (1 - alpha**2).sqrt()


def noisy(alpha, sigma, seed=1):
    """x0, eps, x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = (torch.randn(alpha.shape[0], 3, 5, 5, generator=g, dtype=F64) for _ in range(2))
    return x0, eps, alpha * x0 + sigma * eps, alpha * eps - sigma * x0


def preds(x0, eps, v):
    return {"epsilon": eps, "v_prediction": v, "sample": x0, "flow_prediction": eps - x0}


def test_v_closed_forms_hold_on_vp_schedules():
    alpha, sigma = vp_pair(4)
    x0, eps, x, v = noisy(alpha, sigma)
    assert torch.allclose(alpha * x - sigma * v, x0, atol=1e-12)
    assert torch.allclose(sigma * x + alpha * v, eps, atol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_converters_recover_x0_eps_and_model_output_on_vp(prediction_type):
    alpha, sigma = vp_pair(4)
    x0, eps, x, v = noisy(alpha, sigma)
    pred = preds(x0, eps, v)[prediction_type]
    assert torch.allclose(to_x0(pred, x, alpha, sigma, prediction_type), x0, atol=1e-12)
    assert torch.allclose(to_eps(pred, x, alpha, sigma, prediction_type), eps, atol=1e-12)
    assert torch.allclose(from_x0(x0, x, alpha, sigma, prediction_type), pred, atol=1e-12)
    # scalar (alpha, sigma) as the samplers pass them
    a, s = float(alpha[1]), float(sigma[1])
    assert torch.allclose(to_x0(pred[1:2], x[1:2], a, s, prediction_type), x0[1:2], atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_eps_and_sample_converters_hold_for_any_alpha_sigma(prediction_type):
    """epsilon/sample conversions need no VP constraint (VE-like: alpha = 1, sigma = 3; and a generic pair)."""
    for alpha, sigma in ((1.0, 3.0), (0.7, 1.9)):
        alpha, sigma = torch.full((4, 1, 1, 1), alpha, dtype=F64), torch.full((4, 1, 1, 1), sigma, dtype=F64)
        x0, eps, x, v = noisy(alpha, sigma)
        pred = preds(x0, eps, v)[prediction_type]
        assert torch.allclose(to_x0(pred, x, alpha, sigma, prediction_type), x0, atol=1e-12)
        assert torch.allclose(to_eps(pred, x, alpha, sigma, prediction_type), eps, atol=1e-12)
        assert torch.allclose(from_x0(x0, x, alpha, sigma, prediction_type), pred, atol=1e-12)


def test_converters_reject_unknown_prediction_type():
    x = torch.zeros(1, 1)
    for fn in (to_x0, to_eps, from_x0):
        with pytest.raises(ValueError, match="prediction_type"):
            fn(x, x, 0.6, 0.8, "flow_v2")


def v_and_eps_steps(seed=2):
    """The same denoising state as an epsilon-model Step, a v-model Step and an x0-model Step."""
    alpha, sigma = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x0_c, x0_u, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=F64) for _ in range(3))
    x = alpha * x0_c + sigma * eps
    eps_c, eps_u = (x - alpha * x0_c) / sigma, (x - alpha * x0_u) / sigma
    v_c, v_u = alpha * eps_c - sigma * x0_c, alpha * eps_u - sigma * x0_u
    outs = {"epsilon": (eps_c, eps_u), "v_prediction": (v_c, v_u), "sample": (x0_c, x0_u),
            "flow_prediction": (eps_c - x0_c, eps_u - x0_u)}
    steps = {k: Step(x, torch.tensor(500), alpha, sigma, 3, 10, c, u, k) for k, (c, u) in outs.items()}
    return steps, (eps_c, eps_u), (x0_c, x0_u), x, alpha, sigma


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "flow_prediction"])
def test_cfg_and_cfgpp_are_the_same_guide_in_every_parametrisation(prediction_type):
    steps, (eps_c, eps_u), _, x, alpha, sigma = v_and_eps_steps()
    step = steps[prediction_type]
    w, lam = 5.0, 0.6
    out = guidance.CFG(w).combine(step)
    assert torch.allclose(step.eps(out.denoise), eps_u + w * (eps_c - eps_u), atol=1e-12)
    pp = guidance.CFGPlusPlus(lam).combine(step)
    eps_lam = eps_u + lam * (eps_c - eps_u)
    assert torch.allclose(step.x0(pp.denoise), (x - sigma * eps_lam) / alpha, atol=1e-12)
    assert torch.allclose(step.eps(pp.renoise), eps_u, atol=1e-12)


def ref_apg_x0(d_c, d_u, w, eta, r, beta, state):
    """APG (Sadat et al. 2025, Alg. 1) on denoised estimates."""
    delta = d_c - d_u + (beta * state if state is not None else 0.0)
    state = delta
    n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * torch.clamp(r / n, max=1.0)
    unit = d_c / d_c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = (delta * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    return d_c + (w - 1) * ((delta - par) + eta * par), state


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_apg_acts_on_x0_whatever_the_model_predicts(prediction_type):
    """APG on a v-model (or x0-, eps-model) == the paper's update on x0 = alpha x - sigma v, mapped back to v."""
    w, eta, r, beta = 4.0, 0.3, 1.5, -0.5
    apg = guidance.APG(w, eta=eta, norm_threshold=r, momentum=beta)
    state = None
    for seed in (2, 3):  # two steps: the momentum buffer must also live in x0 space
        steps, _, (x0_c, x0_u), x, alpha, sigma = v_and_eps_steps(seed)
        step = steps[prediction_type]
        pred = apg.combine(step).denoise
        x0_ref, state = ref_apg_x0(x0_c, x0_u, w, eta, r, beta, state)
        if prediction_type == "v_prediction":  # closed forms, not the module's converters
            assert torch.allclose(alpha * x - sigma * pred, x0_ref, atol=1e-12)
            assert torch.allclose(pred, (alpha * x - x0_ref) / sigma, atol=1e-12)
        assert torch.allclose(step.x0(pred), x0_ref, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.37])  # flow scale (alpha + sigma = 1), and any other scale of the state
def test_flow_velocity_converters_hold_in_any_state_scale(scale):
    """v = eps - x0 (rectified flow); the converters do not depend on how the state is scaled."""
    s = torch.tensor([1.0, 0.9, 0.5, 0.02], dtype=F64).view(4, 1, 1, 1)
    alpha, sigma = (1 - s) * scale, s * scale
    x0, eps, x, _ = noisy(alpha, sigma)
    v = eps - x0
    assert torch.allclose(to_x0(v, x, alpha, sigma, "flow_prediction"), x0, atol=1e-12)
    assert torch.allclose(to_eps(v, x, alpha, sigma, "flow"), eps, atol=1e-12)
    assert torch.allclose(from_x0(x0, x, alpha, sigma, "flow_prediction"), v, atol=1e-12)
    # pure noise (s = 1, alpha = 0): x is eps, and x0 = x - v exactly
    assert torch.equal(to_x0(v[:1], x[:1], 0.0, scale, "flow_prediction"), (x[:1] - scale * v[:1]) / scale)


def test_unknown_prediction_type_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match="flow_prediction"):
        to_x0(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "velocity_v2")
