"""ZOODiP maths: RGE unbiasedness on a quadratic, exact subspace projection, PUTS range, ZO-Adam == torch Adam."""

import math

import numpy as np
import pytest
import torch

from diffguide.guidance.zo_personalize import PartialUniformTimesteps, SubspaceGradient, ZOAdam, random_gradient_estimate

Z = 5.0   # tolerance in standard errors of a Monte-Carlo mean (two-sided p ~ 6e-7 per coordinate)


def quadratic(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    hessian = root @ root.T / dim + torch.eye(dim, dtype=torch.float64)
    linear = torch.randn(dim, generator=gen, dtype=torch.float64)
    theta = torch.randn(dim, generator=gen, dtype=torch.float64)
    return (lambda x: 0.5 * x @ hessian @ x + linear @ x), hessian @ theta + linear, theta


def mc_estimates(loss, theta, samples, **kwargs):
    gen = torch.Generator().manual_seed(1)
    return torch.stack([random_gradient_estimate(loss, theta, generator=gen, **kwargs).grad for _ in range(samples)])


@pytest.mark.parametrize("num_directions", [1, 2])
def test_rge_unbiased_on_quadratic(num_directions):
    """E[g] = grad L exactly for a quadratic, whatever mu: the mean of M estimates is within Z standard errors."""
    loss, grad_true, theta = quadratic(6)
    samples = 6000
    est = mc_estimates(loss, theta, samples, num_directions=num_directions, mu=0.3, scaling="paper")
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(samples)
    assert torch.all((mean - grad_true).abs() < Z * stderr), (mean, grad_true, stderr)
    # the test has power: the official code's normalisation (a rescaled estimate) is rejected as unbiased
    shrink = math.sqrt((6 + num_directions - 1) / num_directions)
    assert not torch.all((mean / shrink - grad_true).abs() < Z * stderr / shrink)


def test_rge_repo_scaling_is_the_paper_estimate_rescaled():
    loss, grad_true, theta = quadratic(6)
    dim, n = 6, 2
    paper = random_gradient_estimate(loss, theta, n, 1e-3, torch.Generator().manual_seed(3), "paper").grad
    repo = random_gradient_estimate(loss, theta, n, 1e-3, torch.Generator().manual_seed(3), "repo").grad
    torch.testing.assert_close(repo * math.sqrt((dim + n - 1) / n), paper)
    sub = random_gradient_estimate(loss, theta, n, 1e-3, torch.Generator().manual_seed(3), "repo", effective_dim=3).grad
    torch.testing.assert_close(sub * math.sqrt((3 + n - 1) / n), paper)


def test_rge_uses_n_plus_one_evaluations_and_forward_differences():
    calls = []
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def loss(x):
        calls.append(x.clone())
        return (x ** 2).sum()

    est = random_gradient_estimate(loss, theta, 3, 1e-2, torch.Generator().manual_seed(0), "paper")
    assert len(calls) == 4 and torch.equal(calls[0], theta)
    expected = sum(((theta + 1e-2 * e) ** 2).sum() - (theta ** 2).sum() for e in est.directions)
    slopes = torch.stack([(l - est.base_loss) / 1e-2 for l in est.perturbed_losses])
    torch.testing.assert_close(est.grad, (slopes[:, None] * est.directions).sum(0) / 3)
    assert torch.isfinite(torch.as_tensor(expected))


def test_rge_clip_and_validation():
    theta = torch.zeros(3)
    est = random_gradient_estimate(lambda x: 1e6 * x.sum(), theta, 1, 1e-3, torch.Generator().manual_seed(0),
                                   "paper", clip=1.0)
    torch.testing.assert_close(est.grad.abs(), est.directions[0].abs())
    with pytest.raises(ValueError, match="scaling"):
        random_gradient_estimate(lambda x: x.sum(), theta, scaling="mean")
    with pytest.raises(ValueError, match="mu"):
        random_gradient_estimate(lambda x: x.sum(), theta, mu=0)
    with pytest.raises(TypeError, match="num_directions"):
        random_gradient_estimate(lambda x: x.sum(), theta, num_directions=1.5)
    with pytest.raises(TypeError, match="floating"):
        random_gradient_estimate(lambda x: x.sum(), torch.zeros(3, dtype=torch.int64))


def sklearn_basis(history: np.ndarray, nu: float) -> np.ndarray:
    """The official recipe: StandardScaler, PCA, first i with cumulative ratio > 1 - nu, components after it."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    pca = PCA(n_components=min(history.shape)).fit(StandardScaler().fit_transform(history))
    i = int(np.argmax(np.cumsum(pca.explained_variance_ratio_) > 1 - nu))
    return pca.components_[i + 1:]


def anisotropic_history(steps: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -3, dim, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    return (torch.randn(steps, dim, generator=gen, dtype=torch.float64) * scales) @ mix.T + 3.0


@pytest.mark.parametrize("nu", [1e-1, 1e-3])
def test_subspace_basis_equals_official_pca(nu):
    """tau > d: no null component, so the projector must equal the sklearn recipe's exactly."""
    history = anisotropic_history(40, 8)
    ours = SubspaceGradient.low_variance_directions(history, nu)
    ref = torch.from_numpy(sklearn_basis(history.numpy(), nu))
    assert 0 < ours.shape[0] == ref.shape[0] < 8
    torch.testing.assert_close(ours.T @ ours, ref.T @ ref, atol=1e-9, rtol=0)


def test_subspace_projection_removes_exactly_the_low_variance_directions():
    dim, tau = 12, 16
    sg = SubspaceGradient(dim, tau=tau, nu=1e-2)
    history = anisotropic_history(tau, dim, seed=4)
    refreshed = [sg.push(row) for row in history]
    assert refreshed == [False] * (tau - 1) + [True]
    basis = sg.basis
    k = basis.shape[0]
    assert 0 < k and sg.effective_dim == dim - k
    torch.testing.assert_close(basis @ basis.T, torch.eye(k, dtype=basis.dtype), atol=1e-10, rtol=0)
    # the removed directions are the principal directions of the standardised history with the smallest variances
    std = (history - history.mean(0)) / history.std(0, unbiased=False)
    evals, evecs = torch.linalg.eigh(std.T @ std)                      # ascending
    low = evecs[:, :k]
    torch.testing.assert_close(basis.T @ basis, low @ low.T, atol=1e-8, rtol=0)
    assert evals[k - 1] < evals[k]
    # g' = g (I - P^T P): no component left along P, the orthogonal complement untouched
    grad = torch.randn(3, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected = sg.project(grad)
    torch.testing.assert_close(projected @ basis.T, torch.zeros(3, k, dtype=torch.float64), atol=1e-12, rtol=0)
    keep = evecs[:, k:]
    torch.testing.assert_close(projected @ keep, grad @ keep, atol=1e-12, rtol=0)
    torch.testing.assert_close(sg.project(projected), projected, atol=1e-12, rtol=0)


def test_subspace_ring_buffer_null_component_and_state():
    dim, tau = 32, 8          # tau < d: rank of the centred history is tau - 1
    sg = SubspaceGradient(dim, tau=tau, nu=1e-3)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2 * tau, dim, generator=gen, dtype=torch.float64)
    assert torch.equal(sg.project(rows[0]), rows[0])            # identity before the first refresh
    for row in rows:
        sg.push(row)
    torch.testing.assert_close(sg.history, rows[tau:])          # the last tau values
    assert sg.basis.shape[0] <= tau - 2                          # null component excluded
    full = SubspaceGradient.low_variance_directions(rows[tau:], 1e-3, drop_null_component=False)
    assert full.shape[0] == sg.basis.shape[0] + 1
    clone = SubspaceGradient(dim, tau=tau, nu=1e-3)
    clone.load_state_dict(sg.state_dict())
    assert clone.num_pushed == 2 * tau and torch.equal(clone.basis, sg.basis)
    with pytest.raises(ValueError, match="tau"):
        SubspaceGradient(4, tau=1)
    with pytest.raises(ValueError, match="nu"):
        SubspaceGradient(4, nu=1.5)
    with pytest.raises(ValueError, match="dimension"):
        sg.project(torch.zeros(3))


def test_puts_range_and_uniformity():
    sampler = PartialUniformTimesteps(500, 900)
    ts = sampler.sample(40000, torch.Generator().manual_seed(0))
    assert ts.dtype == torch.int64 and int(ts.min()) == 500 and int(ts.max()) == 899
    counts = torch.bincount(ts - 500, minlength=400).double()
    chi2 = float(((counts - 100) ** 2 / 100).sum())
    assert chi2 < 399 + 6 * math.sqrt(2 * 399)                   # chi-square(399) mean + 6 sd
    with pytest.raises(ValueError, match="low < high"):
        PartialUniformTimesteps(900, 500)
    with pytest.raises(TypeError, match="int"):
        PartialUniformTimesteps(0.5, 900)


def test_zo_adam_equals_torch_adam():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(10, generator=gen)
    param = torch.nn.Parameter(theta.clone())
    ours, ref = ZOAdam(lr=1e-2), torch.optim.Adam([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-3)
    for _ in range(20):
        grad = torch.randn(10, generator=gen)
        ours.step(theta, grad)
        param.grad = grad.clone()
        ref.step()
    torch.testing.assert_close(theta, param.detach(), rtol=1e-6, atol=1e-7)
    # first step from zero state: lr * g / (|g| + eps)
    first, g = torch.zeros(3), torch.tensor([1e-2, -1.0, 0.0])
    ZOAdam(lr=0.1).step(first, g)
    torch.testing.assert_close(first, -0.1 * g / (g.abs() + 1e-3))
    restored = ZOAdam(lr=1e-2)
    restored.load_state_dict(ours.state_dict())
    assert restored.step_count == 20 and torch.equal(restored.exp_avg, ours.exp_avg)
    with pytest.raises(ValueError, match="betas"):
        ZOAdam(betas=(0.9, 1.0))
