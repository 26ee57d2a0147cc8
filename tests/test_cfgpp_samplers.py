"""CFG++ forms of the samplers against few-line oracles in k-diffusion's VE form.

Where ComfyUI publishes a CFG++ sampler (``comfy/k_diffusion/sampling.py``: ``sample_euler_cfg_pp``,
``sample_euler_ancestral_cfg_pp``, ``sample_dpmpp_2m_cfg_pp``, ``sample_dpmpp_2s_ancestral_cfg_pp``), the oracle is its
update rule as written there (VE models, alpha = 1); for the SDE samplers the oracle is k-diffusion's step with the
state rebuilt as ``x + D - D_u`` (guided x0, unconditional noise) and the history holding ``D_u``.
The guide interpolates two exact mixtures: ``D = D_u + lam (D_c - D_u)``, renoise with ``D_u``.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffguide.guidance import CFGPlusPlus
from diffguide.samplers import SAMPLERS, karras_plan
from diffguide.samplers.base import Denoised
from diffguide.samplers.sampling import ancestral_sigmas
from diffguide.tasks.gmm import GaussianMixture

F64 = torch.float64
LAM = 0.7


def t64(x):
    return torch.tensor(x, dtype=F64)


COND = GaussianMixture.isotropic(t64([0.5, 0.5]), t64([[1.5, 1.5], [2.5, -2.0]]), t64([0.1, 0.2]))
UNCOND = GaussianMixture(t64([0.3, 0.5, 0.2]), t64([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]]),
                         t64([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]]))


class CFGppMixture:
    """A sampler denoiser with a CFG++ guide on the exact mixtures (VP state, the level's alpha and sigma)."""

    def __init__(self, lam: float) -> None:
        self.guide, self.lam = CFGPlusPlus(lam), lam

    def __call__(self, x, level):
        d_c, d_u = (m.denoise(x, level.alpha, level.sigma) for m in (COND, UNCOND))
        return Denoised(d_u + self.lam * (d_c - d_u), d_u)


def ve_denoise(x, s):
    """VE state at sigma s -> (guided D, unconditional D_u)."""
    d_c, d_u = (m.denoise(x, 1.0, s) for m in (COND, UNCOND))
    return d_u + LAM * (d_c - d_u), d_u


# ---- oracles (VE state, sigmas a float64 tensor ending at 0, noise(s, s') a stream) --------------------------
def euler_cfg_pp(x, sigmas, noise, eta=0.0):  # ComfyUI sample_euler(_ancestral)_cfg_pp, alpha = 1
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, D_u = ve_denoise(x, s)
        if s_next == 0:
            x = D
        else:
            down, up = ancestral_sigmas(s, s_next, eta)
            x = D + down * (x - D_u) / s + (up * noise(s, s_next) if eta > 0 else 0)
    return x


def dpmpp_2m_cfg_pp(x, sigmas, noise):  # ComfyUI sample_dpmpp_2m_cfg_pp
    old_u = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, D_u = ve_denoise(x, s)
        h = math.log(s / s_next) if s_next > 0 else math.inf
        mix = -math.exp(-h) * D_u
        if old_u is not None and s_next > 0:
            r = math.log(float(sigmas[i - 1]) / s) / h
            mix = mix - math.expm1(-h) * (1 / (2 * r)) * (D - old_u)
        x = D + mix + math.exp(-h) * x
        old_u = D_u
    return x


def dpmpp_2s_ancestral_cfg_pp(x, sigmas, noise, eta=1.0):  # ComfyUI sample_dpmpp_2s_ancestral_cfg_pp
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, D_u = ve_denoise(x, s)
        guidance = D - D_u
        down, up = ancestral_sigmas(s, s_next, eta)
        if down == 0:
            x = x + (x - D_u) / s * (down - s)
        else:
            h = math.log(s / down)
            s_mid = math.exp(math.log(s) - h / 2)
            x_2 = (s_mid / s) * x - math.expm1(-h / 2) * D_u
            _, D_u2 = ve_denoise(x_2, s_mid)
            x = (down / s) * x - math.expm1(-h) * D_u2
        if s_next > 0:
            x = x + noise(s, s_next) * up
        x = x + guidance
    return x


def dpmpp_sde_cfg_pp(x, sigmas, noise, eta=1.0, r=0.5):  # k-diffusion sample_dpmpp_sde on x + D - D_u
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, D_u = ve_denoise(x, s)
        x = x + D - D_u
        if s_next == 0:
            x = D
            continue
        s_mid = math.exp(math.log(s) + r * (math.log(s_next) - math.log(s)))
        sd, su = ancestral_sigmas(s, s_mid, eta)
        x_2 = (sd / s) * x - math.expm1(math.log(sd / s)) * D + noise(s, s_mid) * su
        D_2, _ = ve_denoise(x_2, s_mid)
        sd, su = ancestral_sigmas(s, s_next, eta)
        x_d = (1 - 1 / (2 * r)) * D + 1 / (2 * r) * D_2
        x = (sd / s) * x - math.expm1(math.log(sd / s)) * x_d + noise(s, s_next) * su
    return x


def dpmpp_3m_sde_cfg_pp(x, sigmas, noise, eta=1.0, order=3, solver_type="heun"):  # k-diffusion 2M / 3M SDE
    hist = []  # (D_u, h), newest first
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, D_u = ve_denoise(x, s)
        if s_next == 0:
            x = D
            continue
        x = x + D - D_u
        h = math.log(s / s_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * D
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if order == 3 and len(hist) == 2:
            r0, r1 = hist[0][1] / h, hist[1][1] / h
            d1_0, d1_1 = (D - hist[0][0]) / r0, (hist[0][0] - hist[1][0]) / r1
            d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif hist:
            d = (D - hist[0][0]) / (hist[0][1] / h)
            x = x + (phi_2 * d if solver_type == "heun" else -0.5 * math.expm1(-h_eta) * d)
        x = x + noise(s, s_next) * s_next * math.sqrt(-math.expm1(-2 * h * eta))
        hist = ([(D_u, h)] + hist)[: order - 1]
    return x


def stream(x, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda s, s_next: torch.randn(x.shape, generator=g, dtype=x.dtype)


CASES = {  # sampler name, kwargs, oracle
    "euler": ("euler", {}, lambda x, sg, n: euler_cfg_pp(x, sg, n)),
    "euler_ancestral": ("euler_ancestral", {}, lambda x, sg, n: euler_cfg_pp(x, sg, n, eta=1.0)),
    "dpmpp_2m": ("dpmpp_2m", {}, dpmpp_2m_cfg_pp),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, dpmpp_2s_ancestral_cfg_pp),
    "dpmpp_2s_ancestral_eta": ("dpmpp_2s_ancestral", {"eta": 0.6},
                               lambda x, sg, n: dpmpp_2s_ancestral_cfg_pp(x, sg, n, eta=0.6)),
    "dpmpp_sde": ("dpmpp_sde", {"eta": 0.8}, lambda x, sg, n: dpmpp_sde_cfg_pp(x, sg, n, eta=0.8)),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, lambda x, sg, n: dpmpp_3m_sde_cfg_pp(x, sg, n, order=2,
                                                                              solver_type="midpoint")),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5},
                          lambda x, sg, n: dpmpp_3m_sde_cfg_pp(x, sg, n, eta=0.5, order=2)),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, dpmpp_3m_sde_cfg_pp),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cfgpp_form_equals_oracle(case):
    name, kwargs, oracle = CASES[case]
    plan = karras_plan(10, sigma_min=0.05, sigma_max=12.0)
    z = torch.randn(48, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_ve = z * plan.sigmas[0]
    x_vp = x_ve / (1 + plan.sigmas[0] ** 2).sqrt()
    stochastic = name not in ("euler", "dpmpp_2m")

    def noise_kwargs():  # the same stream: euler_ancestral draws from a generator, the others from a noise sampler
        if not stochastic:
            return kwargs
        if name == "euler_ancestral":
            return dict(kwargs, generator=torch.Generator().manual_seed(1))
        return dict(kwargs, noise_sampler=stream(z, 1))

    ours = SAMPLERS[name](CFGppMixture(LAM), x_vp, plan, disable=True, **noise_kwargs())
    ref = oracle(x_ve, plan.sigmas, stream(z, 1))
    gap = float((ours - ref).abs().max())
    assert gap < 1e-11, f"{case}: {gap}"
    # the check has power: renoising with the guided estimate (CFG at the same weight) lands elsewhere
    cfg = lambda x, level: CFGppMixture(LAM)(x, level).x0
    plain = SAMPLERS[name](cfg, x_vp, plan, disable=True, **noise_kwargs())
    assert float((plain - ours).abs().max()) > 1e-3
