"""ZOODiP maths: RGE unbiasedness on a quadratic, exact subspace projection, PUTS range, ZO-Adam == Adam's formula."""

import math

import numpy as np
import pytest
import torch

from diffguide.guidance.zo_personalize import PartialUniformTimesteps, SubspaceGradient, random_gradient_estimate, zo_adam

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


def adam_reference(theta, grads, lr, betas=(0.9, 0.999), eps=1e-3, bias_correction=True):
    """Kingma & Ba (2015) Algorithm 1 in float64, ``eps`` outside the square root: theta after every step."""
    b1, b2 = betas
    theta, m, v, path = theta.double(), 0.0, 0.0, []
    for k, g in enumerate(grads.double(), 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        c1, c2 = (1 - b1 ** k, 1 - b2 ** k) if bias_correction else (1.0, 1.0)
        theta = theta - lr * (m / c1) / ((v / c2).sqrt() + eps)
        path.append(theta)
    return torch.stack(path)


def test_zo_adam_follows_the_adam_formula():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=gen)
    grads = torch.randn(300, 64, generator=gen) * torch.logspace(-5, 0, 64)       # below and above eps
    theta, lr = start.clone(), 1e-2
    optimizer = zo_adam(theta, lr)
    path = []
    for grad in grads:
        theta.grad = grad.clone()
        optimizer.step()
        path.append(theta.clone())
    path = torch.stack(path).double()
    # float32 rounds theta (half an ulp of |theta|) and the update (a few ulps of lr) once per step
    tolerance = len(grads) * torch.finfo(torch.float32).eps * float(path.abs().max() + 10 * lr)
    assert (path - adam_reference(start, grads, lr)).abs().max() < tolerance
    assert (path - adam_reference(start, grads, lr, bias_correction=False)).abs().max() > 10 * tolerance
    assert (path - adam_reference(start, grads, lr, eps=1e-8)).abs().max() > 10 * tolerance
    # first step from zero state: lr * g / (|g| + eps)
    first, g = torch.zeros(3), torch.tensor([1e-2, -1.0, 0.0])
    optimizer = zo_adam(first, lr=0.1)
    first.grad = g
    optimizer.step()
    torch.testing.assert_close(first, -0.1 * g / (g.abs() + 1e-3))
    with pytest.raises(ValueError, match="betas"):
        zo_adam(torch.zeros(3), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        zo_adam(torch.zeros(3), lr=0.0)
    with pytest.raises(TypeError, match="leaf"):
        zo_adam(torch.zeros(3, requires_grad=True) * 2)
    with pytest.raises(AttributeError, match="torch.optim.Adam"):
        import diffguide.guidance.zo_personalize as zo

        zo.ZOAdam


def test_subspace_state_read_back_projects_bit_for_bit(tmp_path):
    """A basis written to safetensors and read back projects exactly as the one computed (the rounding of
    ``g @ P.T`` follows P's memory layout), after one and after several refreshes."""
    from safetensors.torch import load_file, save_file

    dim, tau = 64, 8
    sg = SubspaceGradient(dim, tau=tau, nu=0.1)
    rows = torch.randn(3 * tau, dim, generator=torch.Generator().manual_seed(2)).cumsum(0)    # a random walk
    grads = torch.randn(20, dim, generator=torch.Generator().manual_seed(0))
    for refresh in range(3):
        for row in rows[refresh * tau:(refresh + 1) * tau]:
            sg.push(row)
        assert sg.basis.shape[0] >= 1
        save_file({k: v.contiguous() for k, v in sg.state_dict().items()}, str(tmp_path / "sg.safetensors"))
        restored = SubspaceGradient(dim, tau=tau, nu=0.1)
        restored.load_state_dict(load_file(str(tmp_path / "sg.safetensors")))
        for grad in grads:
            assert torch.equal(restored.project(grad), sg.project(grad))


def test_subspace_state_that_does_not_fit_is_refused():
    sg = SubspaceGradient(16, tau=4)
    for row in anisotropic_history(5, 16):
        sg.push(row)
    state = sg.state_dict()
    for bad, match in (({"basis": None}, "basis None after 5 pushes"), ({"history": torch.zeros(3, 16)}, "history"),
                       ({"num_pushed": torch.tensor(2)}, "basis"), ({"basis": torch.zeros(2, 8)}, "basis")):
        broken = {k: v for k, v in {**state, **bad}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            SubspaceGradient(16, tau=4).load_state_dict(broken)
    with pytest.raises(ValueError, match="tau=8"):
        SubspaceGradient(16, tau=8).load_state_dict(state)
