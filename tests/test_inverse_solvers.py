"""DPS, MCG and EnKG against closed forms: Gaussian / Gaussian-mixture priors with linear measurements."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffguide.guidance import DPS, MCG, EnKG, GuidedDenoiser
from diffguide.guidance.enkg import ensemble_update_direction
from diffguide.samplers import plan_from_scheduler, sample_ddim, sample_inverse
from diffguide.samplers.base import Level
from diffguide.samplers.inverse import NoCorrection, Transition
from diffguide.tasks.gmm import FlowMatchingGMM, GaussianMixture
from diffguide.tasks.operators import HeatEquation, Inpainting, MatrixOperator, PhaseRetrieval, box_mask, random_matrix

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# "vp": DDPM linear betas with the exact denoiser at each level's (alpha, sigma); "flow": FlowMatchEuler sigmas
# (the first level pure noise) with the mixture's exact velocity network read through GuidedDenoiser, as a flow
# transformer is (flow-scaled input x / (alpha + sigma), velocity -> x0).
SCHEDULES = ["vp", "flow"]


def _plan(steps: int, schedule: str = "vp"):
    if schedule == "flow":
        return plan_from_scheduler(FlowMatchEulerDiscreteScheduler(), steps)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                              clip_sample=False)
    return plan_from_scheduler(scheduler, steps)


def _denoiser(gmm: GaussianMixture, schedule: str = "vp", sample_shape=None):
    if schedule == "flow":
        net = FlowMatchingGMM([gmm], sample_shape=sample_shape)
        return GuidedDenoiser(lambda x, t, cond: net.velocity(x, t), None, None, prediction_type="flow_prediction")

    def denoise(x, level):
        return gmm.denoise(x.reshape(x.shape[0], -1), level.alpha, level.sigma).reshape(x.shape)
    return denoise


@pytest.fixture
def gmm2() -> GaussianMixture:
    return GaussianMixture.isotropic(torch.tensor([0.3, 0.7], dtype=F64),
                                     torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64), 0.3)


def _level(alpha: float, sigma: float) -> Level:
    return Level(torch.tensor(500), torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64), 0, 1)


# ------------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_without_correction_is_ddim(gmm2, eta, schedule):
    plan = _plan(20, schedule)
    x = torch.randn(64, 2, generator=_gen(0), dtype=F64)
    ours = sample_inverse(_denoiser(gmm2, schedule), x, plan, NoCorrection(), eta=eta, generator=_gen(1), disable=True)
    ref = sample_ddim(_denoiser(gmm2, schedule), x, plan, eta=eta, generator=_gen(1), disable=True)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bayes_weighted_exact_likelihood_score_recovers_posterior(gmm2, schedule):
    """Harness check: adding the exact likelihood score (G6) with the Tweedie weight ``x0_weight sigma^2 / alpha``
    (the weight of ``DPS(normalize="likelihood")``) samples the exact posterior (G5). At pure noise (flow) the
    score is 0 and the weight infinite: no correction there, as DPS."""
    matrix = torch.tensor([[1.0, 0.5]], dtype=F64)
    sigma_y = 0.3
    y = torch.tensor([[0.9]], dtype=F64)
    posterior = gmm2.condition(matrix, y[0], sigma_y**2)

    class ExactScore(NoCorrection):
        def correct(self, t: Transition):
            if float(t.level.alpha) == 0.0:
                return t.x_next
            score = gmm2.likelihood_score_t(t.x, t.level.alpha, t.level.sigma, matrix, y[0], sigma_y**2)
            return t.x_next + t.x0_weight * float(t.level.sigma**2 / t.level.alpha) * score

    n = 4000
    out = sample_inverse(_denoiser(gmm2, schedule), torch.randn(n, 2, generator=_gen(2), dtype=F64),
                         _plan(200, schedule), ExactScore(), eta=1.0, generator=_gen(3), disable=True)
    se = posterior.cov().diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - posterior.mean()).abs() < 4 * se + 0.02).all()
    assert ((out.var(0) / posterior.cov().diagonal() - 1).abs() < 0.1).all()


# ------------------------------------------------------------------------------------------------- DPS
def test_dps_gradient_matches_analytic_for_linear_denoiser():
    """``grad_x ||y - A D(x)|| = J^T A^T r / ||r||`` with ``r = A D(x) - y`` and ``D(x) = M x + c`` (per sample)."""
    g = _gen(4)
    d, m = 5, 3
    M = torch.randn(d, d, generator=g, dtype=F64)
    c = torch.randn(d, generator=g, dtype=F64)
    A = random_matrix(m, d, g)
    y = torch.randn(4, m, generator=g, dtype=F64)
    x = torch.randn(4, d, generator=g, dtype=F64, requires_grad=True)
    dps = DPS(MatrixOperator(A), y)
    grad, loss = dps.gradient(x, x @ M.T + c)
    r = (x.detach() @ M.T + c) @ A.T - y
    expected = (r @ A @ M) / r.norm(dim=1, keepdim=True)
    assert torch.allclose(grad, expected, atol=1e-12) and torch.allclose(loss, r.norm(dim=1), atol=1e-12)

    squared = DPS(MatrixOperator(A), y, normalize="squared").gradient(x, x @ M.T + c)[0]
    assert torch.allclose(squared, 2 * r @ A @ M, atol=1e-12)


def test_dps_paper_and_code_step_conventions_agree():
    """Paper: ``zeta / ||r|| * grad ||r||^2``; code: ``scale * grad ||r||`` with ``scale = 2 zeta``."""
    g = _gen(5)
    A = random_matrix(2, 3, g)
    y = torch.randn(3, 2, generator=g, dtype=F64)
    x = torch.randn(3, 3, generator=g, dtype=F64, requires_grad=True)
    x0_hat = torch.tanh(x) * 1.5
    x_next = torch.randn(3, 3, generator=g, dtype=F64)
    tr = Transition(x, x0_hat, x, x_next, _level(0.8, 0.6), torch.tensor(0.9), torch.tensor(0.4), 0.7)
    zeta = 0.37
    sq = ((x0_hat @ A.T - y) ** 2).sum(1)
    (grad_sq,) = torch.autograd.grad(sq.sum(), x, retain_graph=True)
    paper = x_next - zeta / sq.detach().sqrt()[:, None] * grad_sq
    ours = DPS.from_paper(MatrixOperator(A), y, zeta).correct(tr)
    assert torch.allclose(ours, paper, atol=1e-12)


def test_dps_likelihood_score_identity_for_gaussian_prior():
    """Isotropic Gaussian prior, orthonormal-row A: ``p(y | x_t) = N(y; A D(x), (sigma_y^2 + v_t) I)`` with
    ``v_t = s^2 b^2 / (a^2 s^2 + b^2)``, so DPS's likelihood score with that variance is exact (G6)."""
    s2, sigma_y = 0.7, 0.2
    prior = GaussianMixture.isotropic(torch.ones(1, dtype=F64), torch.tensor([[0.5, -1.0, 0.2]], dtype=F64), s2)
    A = random_matrix(2, 3, _gen(6), singular_values=torch.ones(2))
    y = torch.tensor([[0.3, -0.4]], dtype=F64)
    x = torch.randn(5, 3, generator=_gen(7), dtype=F64, requires_grad=True)
    for a in (0.95, 0.6, 0.2):
        b = math.sqrt(1 - a * a)
        v = s2 * b * b / (a * a * s2 + b * b)
        dps = DPS(MatrixOperator(A, sigma_y), y, normalize="likelihood", sigma_y=math.sqrt(sigma_y**2 + v))
        grad, _ = dps.gradient(x, prior.denoise(x, a, b))
        exact = prior.likelihood_score_t(x.detach(), a, b, A, y[0], sigma_y**2)
        assert torch.allclose(-grad / (2 * dps.sigma_y**2), exact, atol=1e-10)


def test_dps_likelihood_error_vanishes_as_noise_vanishes(gmm2):
    """Guidance-term diagnostic on a mixture: DPS's score error against (G6) falls monotonically to 0 as t -> 0."""
    A = torch.tensor([[1.0, 0.5]], dtype=F64)
    sigma_y = 0.3
    y = torch.tensor([[0.9]], dtype=F64)
    x_clean = gmm2.sample(64, _gen(8))
    dps = DPS(MatrixOperator(A, sigma_y), y, normalize="likelihood")
    errors = []
    for a in (0.3, 0.6, 0.9, 0.99, 0.9999, 0.999999):
        b = math.sqrt(1 - a * a)
        x = (a * x_clean + b * torch.randn(64, 2, generator=_gen(9), dtype=F64)).requires_grad_(True)
        approx = -dps.gradient(x, gmm2.denoise(x, a, b))[0] / (2 * sigma_y**2)
        exact = gmm2.likelihood_score_t(x.detach(), a, b, A, y[0], sigma_y**2)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])) and errors[-1] < 1e-4


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dps_moves_samples_towards_posterior(gmm2, schedule):
    A = torch.tensor([[1.0, 0.5]], dtype=F64)
    sigma_y = 0.3
    y = torch.tensor([[-1.2]], dtype=F64)
    posterior = gmm2.condition(A, y[0], sigma_y**2)
    dps = DPS(MatrixOperator(A, sigma_y), y, normalize="likelihood")
    n = 800
    out = sample_inverse(_denoiser(gmm2, schedule), torch.randn(n, 2, generator=_gen(10), dtype=F64),
                         _plan(50, schedule), dps, generator=_gen(11), disable=True)
    prior_err = float((gmm2.mean() - posterior.mean()).norm())
    assert float((out.mean(0) - posterior.mean()).norm()) < 0.25 * prior_err
    assert dps.stats.gradient_calls == dps.stats.denoiser_calls == 50 * n


# ------------------------------------------------------------------------------------------------- MCG
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mcg_noiseless_inpainting_keeps_measured_pixels_exactly(schedule):
    shape = (1, 4, 4)
    g = _gen(12)
    gmm = GaussianMixture.isotropic(torch.ones(3, dtype=F64) / 3, torch.randn(3, 16, generator=g, dtype=F64), 0.2)
    op = Inpainting(box_mask(shape, 2, top_left=(1, 1)), shape)
    truth = gmm.sample(6, g).reshape(6, *shape)
    y = op.forward(truth)
    mcg = MCG(op, y, scale=0.5)
    out = sample_inverse(_denoiser(gmm, schedule, shape), torch.randn(6, *shape, generator=g, dtype=F64),
                         _plan(20, schedule), mcg, generator=g, disable=True)
    measured = op.mask.bool().expand_as(out)
    assert torch.equal(out[measured], y[measured])
    assert not torch.equal(out[~measured], truth[~measured])        # the hole is sampled, not copied


def test_mcg_counts_every_forward_evaluation():
    class CountingOperator(MatrixOperator):
        calls = 0

        def forward(self, x):
            CountingOperator.calls += x.shape[0]
            return super().forward(x)

    g = _gen(13)
    gmm = GaussianMixture.isotropic(torch.ones(2, dtype=F64) / 2, torch.randn(2, 3, generator=g, dtype=F64), 0.3)
    op = CountingOperator(torch.randn(2, 3, generator=g, dtype=F64), sigma_y=0.1)
    y = op.forward(gmm.sample(1, g))
    CountingOperator.calls = 0
    mcg = MCG(op, y, scale=0.1)
    sample_inverse(_denoiser(gmm), torch.randn(4, 3, generator=g, dtype=F64), _plan(10), mcg, generator=g,
                   disable=True)
    assert mcg.stats.forward_model_calls == CountingOperator.calls > 0


def test_mcg_gradient_lives_in_the_null_space():
    g = _gen(13)
    A = random_matrix(2, 4, g)
    op = MatrixOperator(A)
    x = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(3, 2, generator=g, dtype=F64)
    x_next = torch.randn(3, 4, generator=g, dtype=F64)

    def transition():
        return Transition(x, torch.sin(x), x, x_next, _level(0.8, 0.6), torch.tensor(1.0), torch.tensor(0.0), 1.0)

    out = MCG(op, y, scale=0.3, project=False).correct(transition())
    assert torch.allclose(op.forward(out - x_next), torch.zeros(3, 2, dtype=F64), atol=1e-12)
    assert (out - x_next).abs().max() > 1e-3
    out = MCG(op, y, scale=0.3).correct(transition())               # sigma_next = 0: A x = y exactly
    assert torch.allclose(op.forward(out), y, atol=1e-12)


# ------------------------------------------------------------------------------------------------- EnKG
def _gaussian_case(seed: int):
    g = _gen(seed)
    d, m, num = 4, 2, 7
    root = torch.randn(d, d, generator=g, dtype=F64)
    prior = GaussianMixture(torch.ones(1, dtype=F64), torch.randn(1, d, generator=g, dtype=F64),
                            (root @ root.T / d + 0.3 * torch.eye(d, dtype=F64))[None])
    A = random_matrix(m, d, g)
    y = torch.randn(1, m, generator=g, dtype=F64)
    x = 1.5 * torch.randn(num, d, generator=g, dtype=F64)
    return prior, A, y, x


def test_enkg_direction_is_the_exact_preconditioned_gradient_for_linear_models():
    """Gaussian prior, one ODE step: ``x0 = D(x) = M x + c`` is linear, so the ensemble direction equals
    ``C_xx (A M)^T (A D(x_j) - y)`` with the ensemble covariance ``C_xx`` (inverse notes, Sec. 9.7 item 6)."""
    prior, A, y, x = _gaussian_case(14)
    a, b = 0.7, math.sqrt(1 - 0.49)
    S = a * a * prior.covs[0] + b * b * torch.eye(4, dtype=F64)
    M = a * prior.covs[0] @ torch.linalg.inv(S)
    x0 = prior.denoise(x, a, b)
    assert torch.allclose(x0, prior.means[0] + (x - a * prior.means[0]) @ M.T, atol=1e-12)
    direction, coupling = ensemble_update_direction(x[None], (x0 @ A.T)[None], y[None])
    dx = x - x.mean(0)
    cov_xx = dx.T @ dx / x.shape[0]
    expected = (x0 @ A.T - y) @ A @ M @ cov_xx
    assert torch.allclose(direction[0], expected, atol=1e-10)
    assert coupling.shape == (1, 7, 7)


def test_enkg_small_steps_reduce_every_particles_misfit():
    prior, A, y, x = _gaussian_case(15)
    op = MatrixOperator(A)
    plan = _plan(10)
    enkg = EnKG(op, y, scale=0.05, max_ode_steps=1, window=(0.0, 0.0))
    model = _denoiser(prior)
    level = 5
    lv = plan.alpha(level), plan.sigma_vp(level)
    misfit = ((prior.denoise(x, *lv) @ A.T - y) ** 2).sum(1)
    for _ in range(10):
        x_new = enkg.prepare(model, x, plan, level)
        # one update is x - (w / ||C||_F) * direction
        x0 = prior.denoise(x, *lv)
        direction, coupling = ensemble_update_direction(x[None], (x0 @ A.T)[None], y[None])
        step = 0.05 / torch.linalg.matrix_norm(coupling[0])             # r = 0: the constant scale
        assert torch.allclose(x_new, x - step * direction[0], atol=1e-12)
        new_misfit = ((prior.denoise(x_new, *lv) @ A.T - y) ** 2).sum(1)
        assert (new_misfit < misfit).all()
        x, misfit = x_new, new_misfit


def test_enkg_step_schedule_follows_the_official_get_lr():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    y = torch.zeros(1, 3, dtype=torch.float64)
    n = 80
    constant = EnKG(op, y, scale=2.0)
    assert [constant.step_size(i, n) for i in (0, 40, 79)] == [2.0, 2.0, 2.0]
    decaying = EnKG(op, y, scale=3.5, lr_min_ratio=1e-3)
    for i in (0, 40, 79):       # guidance_scale * (1 - r) * (N - i) / N + r, r unscaled
        assert decaying.step_size(i, n) == pytest.approx(3.5 * (1 - 1e-3) * (n - i) / n + 1e-3, rel=1e-12)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        EnKG(op, y, lr_min_ratio=1.5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_enkg_on_a_black_box_uses_forward_calls_only(schedule):
    shape = (1, 4, 4)
    g = _gen(16)
    gmm = GaussianMixture.isotropic(torch.ones(2, dtype=F64) / 2, torch.randn(2, 16, generator=g, dtype=F64), 0.3)
    op = HeatEquation(shape, num_steps=2, stride=2, sigma_y=0.05)
    truth = gmm.sample(1, g).reshape(1, *shape)
    y = op.measure(truth, g)
    base = _denoiser(gmm, schedule, shape)

    def model(x, level):
        assert not torch.is_grad_enabled() and not x.requires_grad
        return base(x, level)

    num, steps = 32, 20
    enkg = EnKG(op, y, scale=1.0, max_ode_steps=1, num_updates=2, window=(0.1, 0.1))
    out = sample_inverse(model, torch.randn(num, *shape, generator=g, dtype=F64), _plan(steps, schedule), enkg,
                         generator=g, disable=True)
    active = sum(enkg.active(i, steps) for i in range(steps))
    assert enkg.stats.forward_model_calls == active * 2 * num and enkg.stats.gradient_calls == 0
    prior = sample_inverse(base, torch.randn(num, *shape, generator=g, dtype=F64), _plan(steps, schedule),
                           NoCorrection(), disable=True)
    misfit = lambda z: float(((op.forward(z) - y) ** 2).flatten(1).sum(1).mean())
    assert misfit(out) < 0.5 * misfit(prior)


# ------------------------------------------------------------------------------------------------- errors
def test_solvers_refuse_operators_they_cannot_use():
    heat = HeatEquation((1, 4, 4))
    y = torch.zeros(1, *heat.out_shape)
    with pytest.raises(ValueError, match="EnKG"):
        DPS(heat, y)
    with pytest.raises(ValueError, match="EnKG"):
        MCG(heat, y)
    phase = PhaseRetrieval((1, 4, 4))
    with pytest.raises(ValueError, match="linear"):
        MCG(phase, torch.zeros(1, *phase.out_shape))
    op = MatrixOperator(torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        DPS(op, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="sigma_y"):
        DPS(op, torch.zeros(1, 2), normalize="likelihood")
    with pytest.raises(ValueError):
        DPS(op, torch.zeros(1, 2), scale=-1.0)
    with pytest.raises(ValueError):
        DPS(op, torch.zeros(1, 2), normalize="l1")
    with pytest.raises(ValueError, match="multiple"):
        EnKG(op, torch.zeros(1, 2), ensemble_size=3).prepare(lambda x, lv: x, torch.zeros(4, 2), _plan(10), 5)
    with pytest.raises(TypeError, match="num_updates"):
        EnKG(op, torch.zeros(1, 2), num_updates=1.5)
    with pytest.raises(ValueError, match="ensemble_size"):
        EnKG(op, torch.zeros(1, 2), ensemble_size=1)
    with pytest.raises(TypeError):
        sample_inverse(lambda x, lv: x, torch.zeros(2, 2), _plan(3), object(), disable=True)


# ------------------------------------------------------------------------------------------------- x0 clipping
def _official_dps(denoise, x, plan, A, y, scale, low, high):
    """Independent few-line DPS loop with the official code's ``clip_denoised`` (eta = 0): x0_hat is clamped
    before both the reverse step and the residual; ``x <- x' - scale * grad ||y - A x0_hat||`` per sample."""
    for i in range(plan.num_steps):
        x = x.detach().requires_grad_(True)
        a, s = plan.alpha(i).to(F64), plan.sigma_vp(i).to(F64)
        a_next, s_next = plan.alpha(i + 1).to(F64), plan.sigma_vp(i + 1).to(F64)
        x0 = denoise(x, _level(float(a), float(s))).clamp(low, high)
        x_prime = a_next * x0 + s_next * (x - a * x0) / s
        (grad,) = torch.autograd.grad((y - x0 @ A.T).norm(dim=1).sum(), x)
        x = x_prime - scale * grad
    return x.detach()


def test_dps_clip_x0_follows_the_official_clip_denoised():
    g = _gen(30)
    M, c = 1.5 * torch.eye(3, dtype=F64), torch.tensor([0.9, -0.4, 0.2], dtype=F64)
    denoise = lambda x, level: x @ M.T + c                          # pushes x0_hat out of [-1, 1]
    A = random_matrix(2, 3, g)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    plan = _plan(12)
    clipped = DPS(MatrixOperator(A), y, scale=0.2, clip_x0=(-1.0, 1.0))
    ours = sample_inverse(denoise, x, plan, clipped, eta=0.0, disable=True)
    assert torch.allclose(ours, _official_dps(denoise, x, plan, A, y, 0.2, -1.0, 1.0), atol=1e-10)
    plain = sample_inverse(denoise, x, plan, DPS(MatrixOperator(A), y, scale=0.2), eta=0.0, disable=True)
    assert (ours - plain).abs().max() > 1e-3                        # the clamp is active on this problem
    assert torch.allclose(plain, _official_dps(denoise, x, plan, A, y, 0.2, -1e9, 1e9), atol=1e-10)
    mcg = MCG(MatrixOperator(A), y, scale=0.2, project=False, clip_x0=(-1.0, 1.0))
    assert mcg.clip_x0 == (-1.0, 1.0) and "clip_x0=(-1.0, 1.0)" in repr(clipped)


@pytest.mark.parametrize("bad,error", [((1.0, -1.0), ValueError), ((0.0,), TypeError), ("-1,1", TypeError),
                                       ((0.0, float("nan")), TypeError)])
def test_dps_clip_x0_is_validated(bad, error):
    op = MatrixOperator(random_matrix(2, 3, _gen(31)))
    with pytest.raises(error, match="clip_x0"):
        DPS(op, torch.zeros(1, 2), clip_x0=bad)
    with pytest.raises(ValueError, match="latent"):
        DPS(op, torch.zeros(1, 2), decode=lambda z: z, clip_x0=(-1, 1))
