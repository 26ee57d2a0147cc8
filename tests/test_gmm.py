"""Exact Gaussian-mixture formulas (G1)-(G7) against autograd, scipy and brute-force grid Bayes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from diffguide.tasks.gmm import (
    ClassConditionalGMM,
    FlowMatchingGMM,
    GaussianMixture,
    SlicedWasserstein,
    annealed_grid,
    gaussian_geometric_mean,
    geometric_grid,
    grid_density,
)

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


@pytest.fixture
def gmm2() -> GaussianMixture:
    covs = torch.stack([0.25 * torch.eye(2, dtype=F64), t64([[0.5, 0.2], [0.2, 0.3]]),
                        t64([[0.2, -0.05], [-0.05, 0.4]])])
    return GaussianMixture(t64([0.3, 0.5, 0.2]), t64([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]]), covs)


@pytest.fixture
def gmm1() -> GaussianMixture:
    return GaussianMixture.isotropic(t64([0.3, 0.7]), t64([[-2.0], [2.0]]), t64([0.25, 0.5]))


def random_gmm(dim: int, k: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(k, dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
    covs = root @ root.mT + 0.1 * torch.eye(dim, dtype=F64)
    return GaussianMixture(torch.rand(k, generator=g, dtype=F64) + 0.1, 2 * torch.randn(k, dim, generator=g, dtype=F64),
                           covs)


def scipy_log_prob(gmm: GaussianMixture, x: np.ndarray) -> np.ndarray:
    dens = sum(w * multivariate_normal(m, c).pdf(x) for w, m, c in
               zip(gmm.weights.numpy(), gmm.means.numpy(), gmm.covs.numpy()))
    return np.log(dens)


LEVELS = [(0.999, math.sqrt(1 - 0.999**2)), (0.8, 0.6), (0.1, math.sqrt(0.99)), (1.0, 2.5)]


# ------------------------------------------------------------------------------------------------- (G1)-(G4)
def test_log_prob_matches_scipy(gmm2):
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    np.testing.assert_allclose(gmm2.log_prob(x).numpy(), scipy_log_prob(gmm2, x.numpy()), rtol=1e-12, atol=1e-12)
    # (G1): the noised marginal is the mixture with means a mu_k and covariances a^2 Sigma_k + b^2 I
    a, b = 0.6, 0.8
    np.testing.assert_allclose(gmm2.log_prob_t(x, a, b).numpy(), scipy_log_prob(gmm2.noised(a, b), x.numpy()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_tweedie_identity(alpha, sigma):
    gmm = random_gmm(3, 4, seed=1)
    x = 3 * torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    score = gmm.score_t(x, alpha, sigma)
    denoised = gmm.denoise(x, alpha, sigma)
    assert torch.allclose(denoised, (x + sigma**2 * score) / alpha, atol=1e-10, rtol=0)
    assert torch.allclose(gmm.eps(x, alpha, sigma), -sigma * score, atol=1e-10, rtol=0)


def test_score_matches_autograd_and_batched_levels(gmm2):
    x = 2 * torch.randn(9, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for alpha, sigma in LEVELS:
        xr = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(gmm2.log_prob_t(xr, alpha, sigma).sum(), xr)
        assert torch.allclose(gmm2.score_t(x, alpha, sigma), grad, atol=1e-10, rtol=0)
    # per-row noise levels give the same rows as scalar levels
    alphas = torch.linspace(0.1, 0.99, 9, dtype=F64)
    sigmas = (1 - alphas**2).sqrt()
    batched = gmm2.denoise(x, alphas, sigmas)
    rows = torch.stack([gmm2.denoise(x[i], float(alphas[i]), float(sigmas[i])) for i in range(9)])
    assert torch.allclose(batched, rows, atol=1e-13, rtol=0)


def test_posterior_moments_match_grid_bayes_1d(gmm1):
    xs = torch.linspace(-20, 20, 200001, dtype=F64)[:, None]
    for alpha, sigma in LEVELS:
        for x_t in (-1.3, 0.4, 2.2):
            log_w = gmm1.log_prob(xs) + torch.distributions.Normal(alpha * xs[:, 0], sigma).log_prob(t64(x_t))
            w = torch.softmax(log_w, 0)
            mean = (w * xs[:, 0]).sum()
            var = (w * (xs[:, 0] - mean) ** 2).sum()
            x = t64([[x_t]])
            assert abs(float(gmm1.denoise(x, alpha, sigma)) - float(mean)) < 1e-8
            assert abs(float(gmm1.posterior_cov(x, alpha, sigma)) - float(var)) < 1e-8
            post = gmm1.posterior(x, alpha, sigma)  # (G3) density vs grid density at three points
            dens = (post.weights[0, :, None] * torch.exp(
                torch.distributions.Normal(post.means[0, :, 0, None], post.covs[..., 0, 0].reshape(-1, 1).sqrt())
                .log_prob(xs[:, 0]))).sum(0)
            grid = w / (xs[1, 0] - xs[0, 0])
            assert torch.allclose(dens, grid, atol=1e-6 * float(grid.max()), rtol=0)


def test_posterior_moments_match_grid_bayes_2d(gmm2):
    grid = grid_density(lambda z: gmm2.log_prob(z), [-9, -9], [9, 9], 481)  # just a mesh and its prior
    pts = grid.points
    alpha, sigma = 0.7, math.sqrt(1 - 0.49)
    x = t64([[0.3, -0.4], [1.5, 1.0]])
    for row in range(2):
        log_w = torch.log(grid.probs) - 0.5 * ((x[row] - alpha * pts) ** 2).sum(1) / sigma**2
        w = torch.softmax(log_w, 0)
        mean = w @ pts
        cov = (w[:, None] * (pts - mean)).T @ (pts - mean)
        assert torch.allclose(gmm2.denoise(x[row], alpha, sigma), mean, atol=1e-8)
        assert torch.allclose(gmm2.posterior_cov(x[row], alpha, sigma), cov, atol=1e-8)


# ------------------------------------------------------------------------------------------------- (G5)-(G7)
@pytest.mark.parametrize("dim", [1, 2])
def test_condition_matches_grid_bayes(gmm1, gmm2, dim):
    gmm = gmm1 if dim == 1 else gmm2
    A = t64([[0.8]]) if dim == 1 else t64([[1.0, 0.5]])
    y, noise_var = t64([0.7]), 0.3
    lows, highs, n = ([-12.0] * dim, [12.0] * dim, 20001 if dim == 1 else 481)

    def log_joint(z):
        resid = y - z @ A.T
        return gmm.log_prob(z) - 0.5 * (resid**2).sum(1) / noise_var - 0.5 * math.log(2 * math.pi * noise_var)

    grid = grid_density(log_joint, lows, highs, n)
    post = gmm.condition(A, y, noise_var)
    assert torch.allclose(post.mean(), grid.mean(), atol=1e-8)
    assert torch.allclose(post.cov(), grid.cov(), atol=1e-8)
    # evidence p(y) = integral of the joint, by the same quadrature
    cell = float(torch.prod(grid.spacing))
    evidence = float(torch.logsumexp(log_joint(grid.points), 0).exp()) * cell
    assert abs(float(gmm.evidence(A, y, noise_var)) - evidence) < 1e-9
    # pointwise: log p(x0 | y) = log p(x0) + log N(y; A x0, s^2) - log p(y)
    z = grid.points[:: max(1, len(grid.points) // 50)]
    assert torch.allclose(post.log_prob(z), log_joint(z) - math.log(evidence), atol=1e-8)


def test_noise_cov_forms_agree(gmm2):
    A, y = t64([[1.0, 0.5], [0.0, 2.0]]), t64([0.2, -0.4])
    a = gmm2.condition(A, y, 0.3)
    b = gmm2.condition(A, y, t64([0.3, 0.3]))
    c = gmm2.condition(A, y, 0.3 * torch.eye(2, dtype=F64))
    for other in (b, c):
        assert torch.allclose(a.means, other.means) and torch.allclose(a.covs, other.covs)
    with pytest.raises(ValueError, match="noise_cov"):
        gmm2.condition(A, y, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="A must have shape"):
        gmm2.condition(torch.ones(1, 3, dtype=F64), t64([0.0]), 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        gmm2.condition(A, t64([0.0]), 0.1)


def test_exact_likelihood_score_matches_autograd_and_grid(gmm2):
    A, y, noise_var = t64([[1.0, 0.5]]), t64([0.7]), 0.2
    x = 2 * torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for alpha, sigma in LEVELS[:3]:
        xr = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(gmm2.log_likelihood_t(xr, alpha, sigma, A, y, noise_var).sum(), xr)
        # (G6) - (G2) against autograd of (G7): two independent routes
        assert torch.allclose(gmm2.likelihood_score_t(x, alpha, sigma, A, y, noise_var), grad, atol=1e-9, rtol=0)
    # (G7) against quadrature: p(y | x_t) = integral N(y; A x0, s^2) p(x0 | x_t) dx0
    grid = grid_density(lambda z: gmm2.log_prob(z), [-9, -9], [9, 9], 481)
    alpha, sigma = 0.8, 0.6
    for row in x[:3]:
        log_post = torch.log(grid.probs) - 0.5 * ((row - alpha * grid.points) ** 2).sum(1) / sigma**2
        lik = torch.exp(-0.5 * ((y - grid.points @ A.T) ** 2).sum(1) / noise_var) / math.sqrt(2 * math.pi * noise_var)
        ref = torch.log((torch.softmax(log_post, 0) * lik).sum())
        assert abs(float(gmm2.log_likelihood_t(row, alpha, sigma, A, y, noise_var)) - float(ref)) < 1e-8


# ------------------------------------------------------------------------------------------------- FKC targets
def test_product_matches_grid(gmm2):
    other = GaussianMixture(t64([0.6, 0.4]), t64([[1.0, 1.0], [-1.0, 0.0]]),
                            torch.stack([t64([[1.0, 0.3], [0.3, 0.8]]), 0.6 * torch.eye(2, dtype=F64)]))
    prod = gmm2.product(other)
    assert prod.num_components == 6
    grid = grid_density(lambda z: gmm2.log_prob(z) + other.log_prob(z), [-7, -7], [7, 7], 401)
    assert torch.allclose(prod.mean(), grid.mean(), atol=1e-9)
    assert torch.allclose(prod.cov(), grid.cov(), atol=1e-9)
    z = grid.points[::997]
    log_z = torch.logsumexp(gmm2.log_prob(grid.points) + other.log_prob(grid.points), 0) + torch.log(
        torch.prod(grid.spacing))
    assert torch.allclose(prod.log_prob(z), gmm2.log_prob(z) + other.log_prob(z) - log_z, atol=1e-8)


def test_power_and_geometric_mean_closed_forms_match_grid():
    gauss = GaussianMixture(t64([1.0]), t64([[0.5, -1.0]]), t64([[[1.0, 0.4], [0.4, 0.7]]]))
    for beta in (0.5, 3.0):
        grid = annealed_grid(gauss, beta)
        exact = gauss.power(beta)
        assert torch.allclose(grid.mean(), exact.mean(), atol=1e-9)
        assert torch.allclose(grid.cov(), exact.cov(), atol=1e-9)
    cond = GaussianMixture(t64([1.0]), t64([[1.0, 0.5]]), t64([[[0.3, 0.05], [0.05, 0.4]]]))
    uncond = GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), t64([[[1.0, 0.0], [0.0, 1.2]]]))
    w = 2.0  # p_c^w p_u^(1-w): normalisable because cond is narrower than uncond
    exact = gaussian_geometric_mean([uncond, cond], [1 - w, w])
    grid = geometric_grid(cond, uncond, w)
    assert torch.allclose(grid.mean(), exact.mean(), atol=1e-9)
    assert torch.allclose(grid.cov(), exact.cov(), atol=1e-9)
    # swapped roles: p_u^2 / p_c is not normalisable, and both routes say so
    with pytest.raises(ValueError, match="not normalisable"):
        gaussian_geometric_mean([cond, uncond], [1 - w, w])
    with pytest.raises(ValueError, match="not normalisable"):
        geometric_grid(uncond, cond, w)


def test_power_rejects_mixtures_and_bad_beta(gmm2):
    with pytest.raises(ValueError, match="annealed_grid"):
        gmm2.power(2.0)
    single = GaussianMixture(t64([1.0]), t64([[0.0]]), t64([[[1.0]]]))
    for beta in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="beta"):
            single.power(beta)


def test_grid_reference_of_the_mixture_itself(gmm1, gmm2):
    grid = annealed_grid(gmm1, 1.0)
    assert torch.allclose(grid.mean(), gmm1.mean(), atol=1e-10)
    assert torch.allclose(grid.cov(), gmm1.cov(), atol=1e-10)
    assert torch.allclose(grid.mode_masses(gmm1), gmm1.weights, atol=1e-10)
    x = t64([-3.0, -2.0, 0.0, 0.5, 2.7])
    assert torch.allclose(grid.cdf(x), gmm1.cdf(x), atol=1e-6)
    ref = 0.3 * norm.cdf(x.numpy(), -2, 0.5) + 0.7 * norm.cdf(x.numpy(), 2, math.sqrt(0.5))
    np.testing.assert_allclose(gmm1.cdf(x).numpy(), ref, atol=1e-14)
    q = t64([1e-4, 0.3, 0.5, 0.99])
    assert torch.allclose(gmm1.cdf(gmm1.icdf(q)), q, atol=1e-13)
    grid2 = annealed_grid(gmm2, 1.0)
    assert torch.allclose(grid2.mode_masses(gmm2), gmm2.weights, atol=1e-9)
    # separated modes: p^beta has mode masses close to w_k^beta det(Sigma_k)^((1 - beta)/2), normalised
    beta = 3.0
    approx = gmm1.weights**beta * gmm1.covs[:, 0, 0] ** ((1 - beta) / 2)
    assert torch.allclose(annealed_grid(gmm1, beta).mode_masses(gmm1), approx / approx.sum(), atol=1e-4)


def test_sampling_moments_within_monte_carlo_error(gmm2):
    n = 40_000
    x, comps = gmm2.sample(n, torch.Generator().manual_seed(5), return_components=True)
    assert x.shape == (n, 2) and x.dtype == F64
    se_mean = (torch.diagonal(gmm2.cov()) / n).sqrt()
    assert bool(((x.mean(0) - gmm2.mean()).abs() < 4 * se_mean).all())
    freq = torch.bincount(comps, minlength=3).to(F64) / n
    se_freq = (gmm2.weights * (1 - gmm2.weights) / n).sqrt()
    assert bool(((freq - gmm2.weights).abs() < 4 * se_freq).all())
    same = gmm2.sample(n, torch.Generator().manual_seed(5))
    assert torch.equal(same, x)


def test_sliced_wasserstein_matches_gaussian_closed_form():
    """Between Gaussians, W2^2 along u is (u^T dmu)^2 + (sqrt(u^T S1 u) - sqrt(u^T S2 u))^2."""
    target = GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), t64([[[1.0, 0.3], [0.3, 0.5]]]))
    other = GaussianMixture(t64([1.0]), t64([[0.8, -0.4]]), t64([[[0.6, 0.0], [0.0, 0.9]]]))
    sliced = SlicedWasserstein(target, 32, torch.Generator().manual_seed(0))
    u = sliced.directions
    spread = lambda cov: torch.einsum("ld,de,le->l", u, cov, u).sqrt()
    exact = (((u @ (other.means[0] - target.means[0])) ** 2 + (spread(other.covs[0]) - spread(target.covs[0])) ** 2)
             .mean().sqrt())
    n = 10_000  # empirical quantiles at this n are off by O(n^-1/2 log n); the floor below measures it
    floor = float(sliced(target.sample(n, torch.Generator().manual_seed(1))))
    assert floor < 0.03
    assert abs(float(sliced(other.sample(n, torch.Generator().manual_seed(2)))) - float(exact)) < 2 * floor
    assert float(exact) > 10 * floor


def test_validation_errors():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(t64([1.0, -1.0]), t64([[0.0], [1.0]]), torch.ones(2, 1, 1, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), t64([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), torch.ones(1, 3, 3, dtype=F64))
    with pytest.raises(TypeError):
        GaussianMixture(torch.tensor([1]), t64([[0.0]]), t64([[[1.0]]]))
    gmm = GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), torch.eye(2, dtype=F64)[None])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        gmm.log_prob(torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="sigma > 0"):
        gmm.eps(torch.zeros(1, 2, dtype=F64), 1.0, 0.0)


# ------------------------------------------------------------------------------------------------- module
def two_class_gmm(sample_shape=(1, 2, 1)):
    from diffusers import DDIMScheduler

    dim = math.prod(sample_shape)
    g = torch.Generator().manual_seed(6)
    c0 = GaussianMixture.isotropic(t64([0.5, 0.5]), torch.randn(2, dim, generator=g, dtype=F64), 0.05)
    c1 = GaussianMixture.isotropic(t64([1.0]), torch.randn(1, dim, generator=g, dtype=F64), t64([0.1]))
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    return ClassConditionalGMM([c0, c1], scheduler.alphas_cumprod, class_priors=t64([0.25, 0.75]),
                               sample_shape=sample_shape), scheduler, (c0, c1)


def test_module_eps_and_timesteps():
    from diffusers import EulerDiscreteScheduler

    gmm, scheduler, (c0, c1) = two_class_gmm()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    abar = scheduler.alphas_cumprod[500].double()
    labels = torch.tensor([0, 1, 2, 1])
    out = gmm.eps(x, 500, labels)
    uncond = GaussianMixture.concat([c0, c1], t64([0.25, 0.75]))
    for row, mix in zip(range(4), (c0, c1, uncond, c1)):
        ref = mix.eps(x[row], abar.sqrt(), (1 - abar).sqrt())
        assert torch.allclose(out[row], ref, atol=1e-13)
    assert torch.allclose(gmm.mixture(None).weights, t64([0.125, 0.125, 0.75]))
    # images in, images out; per-row timesteps
    img = x.reshape(4, 1, 2, 1)
    assert torch.allclose(gmm(img, torch.tensor([500] * 4), class_labels=labels).sample.reshape(4, 2), out)
    assert torch.allclose(gmm(img, 500, class_labels=labels, return_dict=False)[0].reshape(4, 2), out)
    # non-integer timesteps reproduce Euler's linearly interpolated sigmas
    euler = EulerDiscreteScheduler.from_config(scheduler.config)
    euler.set_timesteps(7)
    alpha, sigma = gmm.noise_level(euler.timesteps)
    assert torch.allclose(sigma / alpha, euler.sigmas[:-1].double(), rtol=1e-6)


def test_module_errors():
    gmm, _, _ = two_class_gmm()
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="class labels must lie in 0..2"):
        gmm.eps(x, 10, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        gmm.eps(x, 10, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="x_t must have shape"):
        gmm.eps(torch.zeros(2, 3, dtype=F64), 10, None)
    with pytest.raises(ValueError, match="sample must have shape"):
        gmm(torch.zeros(2, 1, 1, 2, dtype=F64), 10)
    with pytest.raises(ValueError, match="timesteps must lie"):
        gmm.eps(x, 1000, None)
    with pytest.raises(ValueError, match="class label"):
        gmm.mixture(5)
    with pytest.raises(ValueError, match="sample_shape"):
        ClassConditionalGMM([GaussianMixture(t64([1.0]), t64([[0.0, 0.0]]), torch.eye(2, dtype=F64)[None])],
                            torch.full((10,), 0.5), sample_shape=(1, 3, 1))


@pytest.mark.parametrize("sample_shape", [(1, 2, 1), (1, 2, 2)])
def test_module_runs_inside_class_conditional_pipeline(sample_shape):
    from diffguide.tasks.pipelines import ClassConditionalPipeline

    gmm, scheduler, _ = two_class_gmm(sample_shape)
    pipe = ClassConditionalPipeline(unet=gmm, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    out = pipe([0, 1, pipe.null_class_label], guidance_scale=3.0, num_inference_steps=8, output_type="pt",
               generator=torch.Generator().manual_seed(8),
               callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].clone()) or {})
    assert out.images.shape == (3, *sample_shape) and out.images.dtype == F64
    # every step is DDIM on eps_u + 3 (eps_c - eps_u), with eps from the exact mixtures
    ref = type(scheduler).from_config(scheduler.config)
    ref.set_timesteps(8)
    x = torch.randn((3, *sample_shape), generator=torch.Generator().manual_seed(8), dtype=F64)
    labels = torch.tensor([0, 1, 2])
    for t, latents in zip(ref.timesteps, seen):
        eps_u, eps_c = gmm.eps(x, t, torch.full((3,), 2)), gmm.eps(x, t, labels)
        x = ref.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
        assert torch.allclose(latents, x, atol=1e-12, rtol=0)


def test_flow_module_velocity_is_exact():
    """``v = E[eps - x0 | x_s]`` on the flow state ``x_s = (1 - s) x0 + s eps`` against autograd of log p_s (G1):
    ``eps = -s grad log p_s``, ``x0 = (x - s eps) / (1 - s)``; at s = 1 (pure noise) ``v = x - E[x0]``."""
    _, _, (c0, c1) = two_class_gmm()
    flow = FlowMatchingGMM([c0, c1], class_priors=t64([0.25, 0.75]), sample_shape=(1, 2, 1))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    labels = torch.tensor([0, 1, 2, 1])
    uncond = GaussianMixture.concat([c0, c1], t64([0.25, 0.75]))
    for t in (250.0, 700.0, 999.5):
        s = t / 1000
        v = flow.velocity(x, torch.tensor(t), labels)
        for row, mix in zip(range(4), (c0, c1, uncond, c1)):
            xr = x[row].clone().requires_grad_(True)
            (score,) = torch.autograd.grad(mix.log_prob_t(xr, 1 - s, s), xr)
            eps = -s * score
            assert torch.allclose(v[row], eps - (x[row] - s * eps) / (1 - s), atol=1e-10)
    v1 = flow.velocity(x, 1000, labels)
    means = torch.stack([c0.mean(), c1.mean(), uncond.mean(), c1.mean()])
    assert torch.allclose(v1, x - means, atol=1e-12)
    out = flow(hidden_states=x.reshape(4, 1, 2, 1), timestep=torch.full((4,), 700.0), encoder_hidden_states=None,
               class_labels=labels).sample
    assert torch.allclose(out.reshape(4, 2), flow.velocity(x, 700.0, labels), atol=0)
    with pytest.raises(ValueError, match="s > 0"):
        flow.velocity(x, 0, labels)
    with pytest.raises(ValueError, match="timesteps must lie"):
        flow.velocity(x, 1001, labels)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        flow(hidden_states=x, timestep=500)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowMatchingGMM([c0], num_train_timesteps=0)
