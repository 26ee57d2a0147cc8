"""DDRM, DDNM, DiffPIR, PiGDM, DAPS and RED-diff: against DeepInverse's implementations on the same denoiser and
measurement, against exact Gaussian / Gaussian-mixture posteriors, and through ``tasks.inverse.solve_pixel``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffguide.guidance import DAPS, DDNM, DDRM, MCG, DiffPIR, PiGDM, REDDiff
from diffguide.samplers import plan_from_scheduler, sample_inverse
from diffguide.samplers.base import Level
from diffguide.samplers.inverse import Transition
from diffguide.samplers.schedule import Plan
from diffguide.tasks import inverse
from diffguide.tasks.gmm import GaussianMixture
from diffguide.tasks.operators import Blur, Inpainting, MatrixOperator, box_mask, gaussian_kernel, random_matrix
from diffguide.tasks.pipelines import ClassConditionalPipeline

F64 = torch.float64
SHAPE = (1, 4, 4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddpm_plan(steps: int) -> Plan:
    return plan_from_scheduler(DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                                             clip_sample=False), steps)


def _mixture() -> GaussianMixture:
    g = _gen(0)
    return GaussianMixture.isotropic(torch.ones(3, dtype=F64) / 3, 0.5 * torch.randn(3, 16, generator=g, dtype=F64),
                                     0.2)


def _vp_denoiser(gmm: GaussianMixture):
    return lambda x, level: gmm.denoise(x.reshape(x.shape[0], -1), level.alpha, level.sigma).reshape(x.shape)


def _inpainting_problem(sigma_y: float):
    gmm = _mixture()
    op = Inpainting(box_mask(SHAPE, 2, top_left=(1, 1)).to(F64), SHAPE, sigma_y)
    g = _gen(1)
    y = op.measure(gmm.sample(2, g).reshape(2, *SHAPE), g)
    return gmm, op, y


def _unit_gaussian_problem():
    """Prior ``N(mu, I)`` (PiGDM's ``r_t^2`` is then the exact posterior variance), ``A`` 2x3, ``sigma_y = 0.3``."""
    prior = GaussianMixture.isotropic(torch.ones(1, dtype=F64), torch.tensor([[0.5, -1.0, 0.2]], dtype=F64), 1.0)
    op = MatrixOperator(random_matrix(2, 3, _gen(2)), sigma_y=0.3)
    y = torch.tensor([[0.4, -0.7]], dtype=F64)
    return prior, op, y, prior.condition(op.matrix, y[0], 0.3**2)


class _PatchedNoise:
    """Make DeepInverse's ``torch.randn_like`` draw from a seeded generator (times ``factor``)."""

    def __init__(self, monkeypatch, seed: int, factor: float = 1.0) -> None:
        self.generator, self.draws = _gen(seed), []
        monkeypatch.setattr(torch, "randn_like", self)
        self.factor = factor

    def __call__(self, t, **kwargs):
        z = torch.randn(t.shape, generator=self.generator, dtype=t.dtype)
        self.draws.append(z)
        return self.factor * z


# ------------------------------------------------------------------------------------------------- DDRM / DDNM
def test_ddrm_equals_deepinv_ddrm(monkeypatch):
    """Same denoiser (the mixture's exact one), measurement, levels (DeepInverse's ``linspace(1, 0, 11)``) and noise:
    DeepInverse draws ``z / sqrt(2)``, so its noise is fed ``sqrt(2) z``; ``eps=0`` removes its ``s + 1e-6``; its
    ``s > sigma_y`` test equals ours (``s > 0``) on a 0/1 mask. Then the two runs agree to float rounding."""
    dinv = pytest.importorskip("deepinv")
    gmm, op, y = _inpainting_problem(0.13)
    sigmas = np.linspace(1, 0, 11)

    def ve_denoiser(x, sigma):
        s = float(sigma)
        return gmm.denoise(x.reshape(x.shape[0], -1), 1.0, s).reshape(x.shape) if s > 0 else x

    physics = dinv.physics.Inpainting(img_size=SHAPE, mask=op.mask, noise_model=dinv.physics.GaussianNoise(0.13))
    with monkeypatch.context() as m:
        _PatchedNoise(m, 5, math.sqrt(2))
        ref = dinv.sampling.DDRM(ve_denoiser, sigmas=sigmas, eta=0.85, etab=1.0, eps=0.0)(y, physics)
    plan = Plan(torch.arange(10, 0, -1), torch.tensor(sigmas, dtype=F64))
    g = _gen(5)
    start = plan.sigma_vp(0) * torch.randn(y.shape, generator=g, dtype=F64)     # DDRM reshapes the start noise
    ours = sample_inverse(_vp_denoiser(gmm), start, plan, DDRM(op, y), generator=g, disable=True)
    assert (ours - ref).abs().max() < 1e-8


def test_ddrm_noiseless_keeps_measured_coordinates_and_needs_an_svd():
    gmm, op, _ = _inpainting_problem(0.0)
    y = op.forward(gmm.sample(3, _gen(3)).reshape(3, *SHAPE))
    out = sample_inverse(_vp_denoiser(gmm), torch.randn(3, *SHAPE, generator=_gen(4), dtype=F64), _ddpm_plan(20),
                         DDRM(op, y), generator=_gen(5), disable=True)
    measured = op.mask.bool().expand_as(out)
    assert torch.allclose(out[measured], y[measured], atol=1e-12)
    with pytest.raises(ValueError, match="SVD"):
        DDRM(Blur(SHAPE, gaussian_kernel(3, 1.0), boundary="reflect"), torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="eta"):
        DDRM(op, y, eta=1.5)


def test_ddrm_starts_noise_dominated_coordinates_from_noise():
    """Noisy circular blur has singular values far below ``sigma_y / sigma_T``: those coordinates start from noise
    (official ``large_singulars_index``), so the run stays on the data's scale instead of ``U^T y / s``."""
    shape = (1, 16, 16)                                                         # the digits' deblurring task
    gmm = GaussianMixture.isotropic(torch.ones(2, dtype=F64) / 2, 0.5 * torch.randn(2, 256, generator=_gen(26),
                                                                                    dtype=F64), 0.2)
    op = Blur(shape, gaussian_kernel(9, 2.0), sigma_y=0.05)
    plan = _ddpm_plan(20)
    assert float(op.singular_values.min()) < 0.05 / float(plan.sigmas[0])     # below sigma_y / sigma_T
    y = op.measure(gmm.sample(2, _gen(27)).reshape(2, *shape), _gen(28))
    noise = torch.randn(2, *shape, generator=_gen(29), dtype=F64)
    start = DDRM(op, y).prepare(_vp_denoiser(gmm), noise, plan, 0)
    assert start.abs().max() < 6                                    # VP noise scale, not sigma_y / s ~ 1e3
    out = sample_inverse(_vp_denoiser(gmm), noise, plan, DDRM(op, y), generator=_gen(30), disable=True)
    assert torch.isfinite(out).all()


def test_ddrm_posterior_mean_on_a_unit_gaussian_prior():
    """DDRM is not an exact posterior sampler: with the exact denoiser of ``N(mu, I)`` its mean lands on the exact
    posterior mean (G5) within ``4 se + 0.02`` (Monte-Carlo plus 100-step discretisation), while its variance is
    under-dispersed (0.3-0.7 of the exact variance here)."""
    prior, op, y, post = _unit_gaussian_problem()
    n = 2000
    out = sample_inverse(_flat(prior), torch.randn(n, 3, generator=_gen(6), dtype=F64), _ddpm_plan(100),
                         DDRM(op, y), generator=_gen(7), disable=True)
    se = post.cov().diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - post.mean()).abs() < 4 * se + 0.02).all()
    ratio = out.var(0) / post.cov().diagonal()
    assert ((ratio > 0.2) & (ratio < 1.0)).all()


def _flat(prior: GaussianMixture):
    return lambda x, level: prior.denoise(x, level.alpha, level.sigma)


def test_ddnm_noiseless_inpainting_is_exact_and_noisy_data_warns():
    gmm, op, _ = _inpainting_problem(0.0)
    y = op.forward(gmm.sample(2, _gen(8)).reshape(2, *SHAPE))
    out = sample_inverse(_vp_denoiser(gmm), torch.randn(2, *SHAPE, generator=_gen(9), dtype=F64), _ddpm_plan(20),
                         DDNM(op, y), generator=_gen(10), disable=True)
    measured = op.mask.bool().expand_as(out)
    assert torch.allclose(out[measured], y[measured], atol=1e-10)
    noisy = Inpainting(op.mask, SHAPE, 0.1)
    with pytest.warns(UserWarning, match="noise"):
        DDNM(noisy, y)


# ------------------------------------------------------------------------------------------------- DiffPIR
def test_diffpir_equals_deepinv_diffpir(monkeypatch):
    """DeepInverse's DiffPIR on the same mixture (wrapped to its [0, 1] denoiser convention), measurement, levels and
    noise. Its ``lambda_`` equals twice ours (its noise level is on [0, 1], its data term halved) and it clamps
    ``x0`` to [-1, 1] (our ``clip_x0``). It stores its schedule in float32: agreement to 1e-6."""
    dinv = pytest.importorskip("deepinv")
    gmm, op, y = _inpainting_problem(0.1)

    def denoiser01(x01, sigma01):
        x0 = gmm.denoise((2 * x01 - 1).reshape(x01.shape[0], -1), 1.0, 2 * float(sigma01))
        return (x0.reshape(x01.shape) + 1) / 2

    physics = dinv.physics.Inpainting(img_size=SHAPE, mask=op.mask, noise_model=dinv.physics.GaussianNoise(0.05))
    solver = dinv.sampling.DiffPIR(denoiser01, dinv.optim.data_fidelity.L2(), sigma=0.05, max_iter=8, zeta=0.3,
                                   lambda_=7.0)
    x_init = torch.rand(y.shape, generator=_gen(11), dtype=F64)
    with monkeypatch.context() as m:
        noise = _PatchedNoise(m, 12)
        ref = solver((y + op.mask) / 2, physics, x_init=x_init) * 2 - 1
    levels = [int(999 - s) for s in solver.seq]
    sigmas = torch.tensor([float(solver.reduced_alpha_cumprod[t]) for t in levels], dtype=F64)
    plan = Plan(torch.tensor(levels[:-1]), sigmas)      # DeepInverse returns the state at its last level
    start = ((2 * x_init - 1) + (sigmas[0] ** 2 - 4 * 0.05**2).sqrt() * noise.draws[0]) / \
        float(solver.get_alpha_prod()[0][-1])
    g = _gen(12)
    torch.randn(y.shape, generator=g, dtype=F64)         # DeepInverse's first draw made the start
    ours = sample_inverse(_vp_denoiser(gmm), start, plan, DiffPIR(op, y, lam=3.5, zeta=0.3, clip_x0=(-1, 1)),
                          generator=g, disable=True)
    assert (ours - ref).abs().max() < 1e-6


def test_diffpir_data_step_is_the_exact_gaussian_posterior_mean():
    """For a unit-variance Gaussian prior, ``p(x0 | x_t) = N(D(x_t), r^2 I)`` with ``r^2 = b^2 / (a^2 + b^2)``, so with
    ``lam = sigma_bar^2 / r^2`` (``rho_t = sigma_y^2 / r^2``) the data step is exactly ``E[x0 | x_t, y]`` (G5)."""
    prior, op, y, _ = _unit_gaussian_problem()
    for a in (0.9, 0.5, 0.2):
        b = math.sqrt(1 - a * a)
        x = torch.randn(1, 3, generator=_gen(13), dtype=F64)
        r2 = b * b / (a * a + b * b)
        solver = DiffPIR(op, y, lam=(b / a) ** 2 / r2)
        step = solver.data_step(prior.denoise(x, a, b), torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
        given_xt = GaussianMixture(torch.ones(1, dtype=F64), prior.denoise(x, a, b), (r2 * torch.eye(3, dtype=F64))[None])
        exact = given_xt.condition(op.matrix, y[0], 0.3**2).mean()
        assert torch.allclose(step[0], exact, atol=1e-8)


# ------------------------------------------------------------------------------------------------- PiGDM
def test_pigdm_score_equals_deepinv_and_is_exact_for_a_unit_gaussian(monkeypatch):
    """PiGDM's likelihood score equals DeepInverse's ``PiGDMDataFidelity.grad`` (its negative, float32 inside) and,
    for a unit-variance Gaussian prior, the exact ``grad log p_t(y | x_t)`` (G6) to 1e-10."""
    dinv = pytest.importorskip("deepinv")
    prior, op, y, _ = _unit_gaussian_problem()
    x = torch.randn(4, 3, generator=_gen(14), dtype=F64)
    pigdm = PiGDM(op, y)
    for a, b in ((0.95, math.sqrt(1 - 0.95**2)), (0.5, math.sqrt(0.75)), (1.0, 0.8)):
        xr = x.clone().requires_grad_(True)
        score = pigdm.likelihood_score(xr, prior.denoise(xr, a, b), torch.tensor(a, dtype=F64),
                                       torch.tensor(b, dtype=F64))
        exact = prior.likelihood_score_t(x, a, b, op.matrix, y[0], 0.3**2)
        assert torch.allclose(score, exact, atol=1e-10)
    matrix = op.matrix.float()
    physics = dinv.physics.LinearPhysics(A=lambda v: v @ matrix.T, A_adjoint=lambda v: v @ matrix,
                                         noise_model=dinv.physics.GaussianNoise(0.3))
    denoiser = lambda z, sigma: prior.denoise(z.double(), 1.0, float(sigma.flatten()[0])).float()
    fidelity = dinv.sampling.PiGDMDataFidelity(denoiser, cg_max_iter=50, cg_tol=1e-10)
    theirs = fidelity.grad(x.float(), y.float(), physics, 0.8)
    xr = x.clone().requires_grad_(True)
    ours = pigdm.likelihood_score(xr, prior.denoise(xr, 1.0, 0.8), torch.tensor(1.0, dtype=F64),
                                  torch.tensor(0.8, dtype=F64))
    assert torch.allclose(-ours.float(), theirs, atol=1e-5, rtol=1e-4)


def test_pigdm_samples_the_exact_posterior_of_a_unit_gaussian():
    """Exact likelihood score with its Bayes weight (``weighting="bayes"``), 200 DDPM-ancestral steps: mean within ``4 se + 0.02`` of (G5);
    the variance of the best-measured direction carries a first-order discretisation bias (measured -22 % at 100
    steps, -11 % at 200: halving with the step count), so variances are held to 15 %."""
    prior, op, y, post = _unit_gaussian_problem()
    n = 2000
    pigdm = PiGDM(op, y, weighting="bayes")
    out = sample_inverse(_flat(prior), torch.randn(n, 3, generator=_gen(15), dtype=F64), _ddpm_plan(200), pigdm,
                         eta=1.0, generator=_gen(16), disable=True)
    se = post.cov().diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - post.mean()).abs() < 4 * se + 0.02).all()
    assert ((out.var(0) / post.cov().diagonal() - 1).abs() < 0.15).all()
    assert pigdm.stats.gradient_calls == pigdm.stats.denoiser_calls == 200 * n


def test_pigdm_code_weighting_is_the_official_coefficient():
    """``weighting="code"``: ``x_{t-1} = x'_{t-1} + alpha_{t-1} alpha_t J^T A^+ (y - A x0_hat)`` for ``sigma_y = 0``
    (NVlabs/RED-diff ``algos/pgdm.py``, ``awd=True``)."""
    prior, op, y, _ = _unit_gaussian_problem()
    op = MatrixOperator(op.matrix)
    x = torch.randn(3, 3, generator=_gen(25), dtype=F64, requires_grad=True)
    a, s = 0.6, 0.8
    x0_hat = prior.denoise(x, a, s)
    x_next = torch.randn(3, 3, generator=_gen(26), dtype=F64)
    t = Transition(x, x0_hat, x, x_next, Level(torch.tensor(500), torch.tensor(a, dtype=F64),
                   torch.tensor(s, dtype=F64), 0, 1), torch.tensor(0.7, dtype=F64), torch.tensor(0.71, dtype=F64), 0.4)
    ours = PiGDM(op, y, scale=0.5).correct(t)
    x0_again = prior.denoise(x, a, s)
    mat = (op.pinv(y) - op.pinv(op.forward(x0_again))).detach()
    (grad,) = torch.autograd.grad((mat * x0_again).sum(), x)
    assert torch.allclose(ours, x_next + 0.5 * 0.7 * a * grad, atol=1e-10)
    with pytest.raises(ValueError, match="weighting"):
        PiGDM(op, y, weighting="paper")


# ------------------------------------------------------------------------------------------------- DAPS
def test_daps_langevin_has_the_exact_ula_stationary_law():
    """Inner Langevin at a fixed ``x0_hat``: the target is Gaussian with precision ``P = 2 A^T A / tau^2 + I / s^2``;
    unadjusted Langevin with step ``h`` keeps its mean and has covariance ``(P (I - h P / 2))^{-1}`` exactly."""
    _, op, y, _ = _unit_gaussian_problem()
    tau, s2, h, n = 0.5, 0.4, 0.02, 4000
    daps = DAPS(op, y, langevin_steps=300, lr=h, tau=tau)
    x0_hat = torch.tensor([[0.3, 0.1, -0.2]], dtype=F64).expand(n, 3)
    out = daps.langevin(x0_hat, s2, h, _gen(17))
    A = op.matrix
    P = 2 * A.T @ A / tau**2 + torch.eye(3, dtype=F64) / s2
    mean = torch.linalg.solve(P, 2 * A.T @ y[0] / tau**2 + x0_hat[0] / s2)
    cov = torch.linalg.inv(P @ (torch.eye(3, dtype=F64) - h * P / 2))
    se = cov.diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - mean).abs() < 4.5 * se).all()
    assert ((out.var(0) / cov.diagonal() - 1).abs() < 4.5 * math.sqrt(2 / n)).all()


def test_daps_moves_samples_towards_the_mixture_posterior():
    gmm = GaussianMixture.isotropic(torch.tensor([0.3, 0.7], dtype=F64),
                                    torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64), 0.3)
    op = MatrixOperator(torch.tensor([[1.0, 0.5]], dtype=F64), sigma_y=0.3)
    y = torch.tensor([[-1.2]], dtype=F64)
    post = gmm.condition(op.matrix, y[0], 0.3**2)
    daps = DAPS(op, y, ode_steps=2, langevin_steps=20, lr=1e-2, tau=0.3)
    out = sample_inverse(_flat(gmm), torch.randn(400, 2, generator=_gen(18), dtype=F64), _ddpm_plan(20), daps,
                         generator=_gen(19), disable=True)
    assert float((out.mean(0) - post.mean()).norm()) < 0.25 * float((gmm.mean() - post.mean()).norm())
    assert daps.stats.denoiser_calls == 400 * (20 + sum(len(set(torch.linspace(i, 19, 2).round().long().tolist())) - 1
                                                     for i in range(20)))


# ------------------------------------------------------------------------------------------------- RED-diff
def test_reddiff_step_is_adam_on_the_official_loss():
    """One step from ``mu = argmin ||A x - y||^2 + sigma_y^2 ||x||^2`` equals ``torch.optim.Adam`` on the official loss
    ``lam (sigma / alpha) mean(sg[eps_hat - z] * mu) + mean((y - A mu)^2) / 2`` (one image, so the means agree)."""
    gmm, op, y = _inpainting_problem(0.05)
    y = y[:1]
    plan = _ddpm_plan(10)
    start = torch.randn(1, *SHAPE, generator=_gen(20), dtype=F64)
    solver = REDDiff(op, y, lam=0.25, lr=0.1)
    ours = sample_inverse(_vp_denoiser(gmm), start, Plan(plan.timesteps[3:4], plan.sigmas[3:5]), solver,
                          generator=_gen(21), disable=True)
    a, s = plan.alpha(3), plan.sigma_vp(3)
    mu = (y / (op.mask + 0.05**2)).clone().requires_grad_(True)         # the Tikhonov start, closed form
    x_t = a * mu.detach() + s * start
    eps_hat = (x_t - a * _vp_denoiser(gmm)(x_t, Level(plan.timesteps[3], a, s, 0, 1))) / s
    adam = torch.optim.Adam([mu], lr=0.1, betas=(0.9, 0.99))
    loss = 0.25 * float(s / a) * ((eps_hat - start).detach() * mu).mean() + ((y - op.forward(mu)) ** 2).mean() / 2
    loss.backward()
    adam.step()
    assert torch.allclose(ours, mu.detach(), atol=1e-12)


def test_reddiff_fits_the_measurement_of_a_mixture():
    gmm, op, y = _inpainting_problem(0.05)
    solver = REDDiff(op, y)
    out = sample_inverse(_vp_denoiser(gmm), torch.randn(2, *SHAPE, generator=_gen(22), dtype=F64), _ddpm_plan(50),
                         solver, generator=_gen(23), disable=True)
    misfit = lambda z: float((op.forward(z) - y).square().sum())
    prior = gmm.sample(2, _gen(24)).reshape(2, *SHAPE)
    assert misfit(out) < 0.25 * misfit(prior) and solver.stats.gradient_calls == 0


# ------------------------------------------------------------------------------------------------- solve_pixel
@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    return ClassConditionalPipeline(unet, DDIMScheduler(clip_sample=False))


@pytest.mark.parametrize("solver", ["ddrm", "ddnm", "diffpir", "pigdm", "daps", "reddiff"])
def test_solve_pixel_runs_every_new_solver_and_restores_the_network(tiny_pipe, solver):
    tiny_pipe.unet.requires_grad_(True)
    frozen = next(tiny_pipe.unet.parameters())
    frozen.requires_grad_(False)                                       # a mixed state the caller chose
    op = inverse.make_task("inpaint_box", sigma_y=0.0 if solver == "ddnm" else 0.05, seed=0)
    truth = inverse.held_out_digits([0])
    options = {"langevin_steps": 2} if solver == "daps" else {}
    recon, stats = inverse.solve_pixel(tiny_pipe, op, op.measure(truth, _gen(0)), solver, steps=3, **options)
    assert recon.shape == (1, 1, 16, 16) and torch.isfinite(recon).all() and stats.denoiser_calls >= 3
    flags = [p.requires_grad for p in tiny_pipe.unet.parameters()]
    assert not flags[0] and all(flags[1:])


def test_solve_pixel_restores_flags_when_the_solver_fails(tiny_pipe):
    tiny_pipe.unet.requires_grad_(True)
    op = inverse.make_task("inpaint_box", sigma_y=0.05, seed=0)
    y = op.measure(inverse.held_out_digits([0]), _gen(0))
    with pytest.raises(FloatingPointError):
        inverse.solve_pixel(tiny_pipe, op, y, "dps", steps=3, scale=1e30)
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_mcg_warns_where_its_projection_copies_noise():
    blur = inverse.make_task("deblur_gauss", sigma_y=0.05)
    y = torch.zeros(1, *blur.out_shape)
    with pytest.warns(UserWarning, match="copies the measurement noise"):
        MCG(blur, y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCG(inverse.make_task("inpaint_box", sigma_y=0.05), y)                  # inpainting: no amplification
        MCG(inverse.make_task("deblur_gauss", sigma_y=0.0), y)                  # noiseless
        MCG(blur, y, project=False)


def test_enkg_defaults_are_the_tuned_ones():
    from diffguide.guidance import EnKG

    op = MatrixOperator(torch.eye(2, dtype=F64))
    enkg = EnKG(op, torch.zeros(1, 2, dtype=F64))
    assert (enkg.scale, enkg.max_ode_steps) == (0.5, 5)
    assert inverse.pixel_solver("enkg", op, torch.zeros(1, 2, dtype=F64)).scale == 0.5
