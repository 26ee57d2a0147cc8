"""Exact Gaussian mixtures: noised marginals, scores, denoisers, linear-Gaussian posteriors, FKC targets.

Prior ``p(x0) = sum_k w_k N(x0; mu_k, Sigma_k)`` and noising ``x_t = alpha x0 + sigma eps``. Equation
labels (G1)-(G7) follow the reference notes on exact ground truth (inverse-problem notes, Sec. 9):

* (G1) ``p_t(x) = sum_k w_k N(x; alpha mu_k, S_k)``, ``S_k = alpha^2 Sigma_k + sigma^2 I``
* (G2) responsibilities ``r_k(x)`` (logsumexp) and score ``-sum_k r_k S_k^{-1} (x - alpha mu_k)``
* (G3) ``p(x0 | x_t)``: components ``N(m_k(x), V_k)`` with weights ``r_k(x)``
* (G4) exact denoiser ``D = E[x0 | x_t] = sum_k r_k m_k`` (Tweedie: ``D = (x + sigma^2 score) / alpha``)
* (G5) posterior under ``y = A x0 + n``, ``n ~ N(0, Sigma_y)``; evidence ``p(y)``
* (G6) exact likelihood score ``grad log p_t(y | x_t) = grad log p_t(x_t | y) - grad log p_t(x_t)``
* (G7) exact noisy likelihood ``p(y | x_t) = sum_k r_k N(y; A m_k, A V_k A^T + Sigma_y)``

Everything is plain torch (batched over leading dims of ``x``, differentiable, float64-capable); ``alpha``
and ``sigma`` are floats, 0-dim tensors or tensors broadcasting against ``x.shape[:-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

Level = float | Tensor

__all__ = [
    "ClassConditionalGMM",
    "FlowMatchingGMM",
    "ComponentPosterior",
    "GaussianMixture",
    "GridDensity",
    "SlicedWasserstein",
    "annealed_grid",
    "gaussian_geometric_mean",
    "geometric_grid",
    "grid_density",
    "sliced_wasserstein",
]


# --------------------------------------------------------------------------------------------------------
# small linear-algebra helpers
# --------------------------------------------------------------------------------------------------------
def _chol(cov: Tensor, what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{what} must be symmetric positive definite")
    return chol


def _solve(chol: Tensor, rhs: Tensor) -> Tensor:
    """``S^{-1} rhs`` for ``S = L L^T``; ``rhs`` (..., d, n), batch dims broadcast."""
    z = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, z, upper=True)


def _tri_vec(chol: Tensor, vec: Tensor, transpose: bool = False) -> Tensor:
    """``L^{-1} v`` (or ``L^{-T} v``) for vectors ``vec`` (..., K, d) and factors (K, d, d) or (..., K, d, d).

    With one factor per component the batch goes into the right-hand-side columns (no expanded copies of L).
    """
    factor = chol.mT if transpose else chol
    if chol.ndim == 3 and vec.ndim >= 2 and vec.shape[-2] == chol.shape[0]:
        lead, tail = vec.shape[:-2], vec.shape[-2:]
        cols = vec.reshape(-1, *tail).permute(1, 2, 0)  # (K, d, B)
        out = torch.linalg.solve_triangular(factor, cols, upper=transpose)
        return out.permute(2, 0, 1).reshape(*lead, *tail)
    return torch.linalg.solve_triangular(factor, vec.unsqueeze(-1), upper=transpose).squeeze(-1)


def _solve_vec(chol: Tensor, vec: Tensor) -> Tensor:
    """``S^{-1} v`` for ``S = L L^T`` and vectors ``vec`` (..., K, d)."""
    return _tri_vec(chol, _tri_vec(chol, vec), transpose=True)


def _gauss_logpdf(diff: Tensor, chol: Tensor) -> Tensor:
    """``log N(diff; 0, L L^T)`` over the last dim of ``diff`` (..., d)."""
    z = _tri_vec(chol, diff)
    logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * z.pow(2).sum(-1) - logdet - 0.5 * diff.shape[-1] * math.log(2 * math.pi)


def _level(value: Level, like: Tensor, name: str) -> Tensor:
    level = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if not torch.isfinite(level).all() or bool((level < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return level


def _noise_cov(noise_cov: float | Tensor, m: int, like: Tensor) -> Tensor:
    """Observation-noise covariance from a variance (scalar), a diagonal (m,) or a full (m, m) matrix."""
    cov = torch.as_tensor(noise_cov, dtype=like.dtype, device=like.device)
    if cov.ndim == 0:
        return cov * torch.eye(m, dtype=like.dtype, device=like.device)
    if cov.shape == (m,):
        return torch.diag(cov)
    if cov.shape == (m, m):
        return cov
    raise ValueError(f"noise_cov must be a variance, a diagonal of shape ({m},) or a matrix ({m}, {m}); "
                     f"got shape {tuple(cov.shape)}")


class ComponentPosterior(NamedTuple):
    """``p(x0 | x_t) = sum_k weights_k N(means_k, covs_k)`` (G3).

    weights (..., K), means (..., K, d); covs do not depend on x: (K, d, d), or (..., K, d, d) for per-row levels.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor


# --------------------------------------------------------------------------------------------------------
# the mixture
# --------------------------------------------------------------------------------------------------------
class GaussianMixture:
    """``sum_k w_k N(mu_k, Sigma_k)`` with full covariances. Weights are normalised on construction.

    Args:
        weights: (K,) non-negative (zeros allowed, e.g. underflowed product weights).
        means: (K, d).
        covs: (K, d, d) symmetric positive definite (see :meth:`isotropic` / :meth:`diagonal`).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        for name, value in (("weights", weights), ("means", means), ("covs", covs)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor")
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {tuple(covs.shape)}")
        if not torch.isfinite(weights).all() or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be finite, >= 0 and not all 0")
        if not torch.allclose(covs, covs.mT, rtol=1e-6, atol=1e-12 * float(covs.abs().max())):
            raise ValueError("covs must be symmetric")
        dtype = torch.promote_types(torch.promote_types(weights.dtype, means.dtype), covs.dtype)
        self.weights = (weights / weights.sum()).to(dtype)
        self.means = means.to(dtype)
        self.covs = covs.to(dtype)
        self.chol = _chol(self.covs, "covs")

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, weights: Tensor, means: Tensor, variances: float | Tensor) -> GaussianMixture:
        """Components ``N(mu_k, v_k I)``; ``variances`` a scalar or (K,)."""
        means = torch.as_tensor(means)
        var = torch.as_tensor(variances, dtype=means.dtype, device=means.device).expand(means.shape[0])
        eye = torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
        return cls(torch.as_tensor(weights, dtype=means.dtype, device=means.device), means, var[:, None, None] * eye)

    @classmethod
    def diagonal(cls, weights: Tensor, means: Tensor, variances: Tensor) -> GaussianMixture:
        """Components ``N(mu_k, diag(v_k))``; ``variances`` (K, d)."""
        means = torch.as_tensor(means)
        var = torch.as_tensor(variances, dtype=means.dtype, device=means.device).expand_as(means)
        return cls(torch.as_tensor(weights, dtype=means.dtype, device=means.device), means, torch.diag_embed(var))

    @classmethod
    def concat(cls, mixtures: Sequence[GaussianMixture], priors: Tensor | None = None) -> GaussianMixture:
        """The mixture ``sum_c prior_c p_c`` of mixtures (uniform priors by default)."""
        if not mixtures:
            raise ValueError("concat needs at least one mixture")
        first = mixtures[0]
        priors = torch.ones(len(mixtures)) if priors is None else torch.as_tensor(priors)
        priors = priors.to(first.dtype).to(first.device)
        if priors.shape != (len(mixtures),) or bool((priors <= 0).any()):
            raise ValueError(f"priors must be {len(mixtures)} positive numbers")
        priors = priors / priors.sum()
        return cls(torch.cat([p * m.weights for p, m in zip(priors, mixtures)]),
                   torch.cat([m.means for m in mixtures]), torch.cat([m.covs for m in mixtures]))

    # -- basic properties ---------------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, *args, **kwargs) -> GaussianMixture:
        return GaussianMixture(self.weights.to(*args, **kwargs), self.means.to(*args, **kwargs),
                               self.covs.to(*args, **kwargs))

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def cov(self) -> Tensor:
        centred = self.means - self.mean()
        return torch.einsum("k,kij->ij", self.weights, self.covs + centred[:, :, None] * centred[:, None, :])

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, dtype={self.dtype})"

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        return x.to(self.dtype)

    # -- clean density --------------------------------------------------------------------------------
    def log_prob(self, x0: Tensor) -> Tensor:
        """``log p(x0)``, shape ``x0.shape[:-1]``."""
        return self.log_prob_t(x0, 1.0, 0.0)

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               return_components: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``num_samples`` exact draws (n, d); with ``return_components`` also the component indices (n,)."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        device = generator.device if generator is not None else self.device
        comps = torch.multinomial(self.weights.to(device), num_samples, replacement=True, generator=generator)
        z = torch.randn(num_samples, self.dim, generator=generator, device=device, dtype=self.dtype)
        comps, z = comps.to(self.device), z.to(self.device)
        x = self.means[comps] + (self.chol[comps] @ z.unsqueeze(-1)).squeeze(-1)
        return (x, comps) if return_components else x

    def cdf(self, x: Tensor) -> Tensor:
        """CDF of a 1-D mixture at ``x`` (any shape)."""
        if self.dim != 1:
            raise ValueError("cdf is defined for 1-D mixtures; project first with affine()")
        x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        std = self.covs[:, 0, 0].sqrt()
        z = (x.unsqueeze(-1) - self.means[:, 0]) / std
        return (self.weights * 0.5 * torch.erfc(-z / math.sqrt(2))).sum(-1)

    def icdf(self, q: Tensor, iters: int = 200) -> Tensor:
        """Quantiles of a 1-D mixture (bisection, to float resolution)."""
        q = torch.as_tensor(q, dtype=self.dtype, device=self.device)
        if bool(((q <= 0) | (q >= 1)).any()):
            raise ValueError("quantile levels must lie in (0, 1)")
        std = self.covs[:, 0, 0].sqrt()
        lo = torch.full_like(q, float((self.means[:, 0] - 40 * std).min()))
        hi = torch.full_like(q, float((self.means[:, 0] + 40 * std).max()))
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = self.cdf(mid) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            if bool(((hi - lo) <= 4 * torch.finfo(self.dtype).eps * (1 + mid.abs())).all()):
                break
        return (lo + hi) / 2

    def affine(self, matrix: Tensor, shift: Tensor | None = None) -> GaussianMixture:
        """Law of ``matrix @ x0 + shift`` (e.g. a 1-D projection with ``matrix`` of shape (1, d))."""
        matrix = torch.as_tensor(matrix, dtype=self.dtype, device=self.device)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"matrix must have shape (m, {self.dim}), got {tuple(matrix.shape)}")
        means = self.means @ matrix.T
        if shift is not None:
            means = means + torch.as_tensor(shift, dtype=self.dtype, device=self.device)
        return GaussianMixture(self.weights, means, matrix @ self.covs @ matrix.T)

    # -- noised marginals (G1)-(G4) -----------------------------------------------------------------------
    def _noised_parts(self, x: Tensor, alpha: Level, sigma: Level):
        x = self._check_x(x)
        a, b = _level(alpha, x, "alpha"), _level(sigma, x, "sigma")
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        a3, b3 = a[..., None, None, None], b[..., None, None, None]
        cov_t = a3**2 * self.covs + b3**2 * eye  # (G1) S_k, shape (K, d, d) or (..., K, d, d)
        chol_t = _chol(cov_t, "the noised covariance a^2 Sigma_k + b^2 I")
        diff = x.unsqueeze(-2) - a[..., None, None] * self.means  # (..., K, d)
        log_joint = torch.log(self.weights) + _gauss_logpdf(diff, chol_t)  # (..., K)
        return x, a, b, chol_t, diff, log_joint

    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """The marginal ``p_t`` of ``alpha x0 + sigma eps`` as a mixture (G1); scalar levels only."""
        a, b = float(alpha), float(sigma)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return GaussianMixture(self.weights, a * self.means, a**2 * self.covs + b**2 * eye)

    def log_prob_t(self, x: Tensor, alpha: Level, sigma: Level) -> Tensor:
        """``log p_t(x)`` (G1)."""
        return torch.logsumexp(self._noised_parts(x, alpha, sigma)[-1], dim=-1)

    def responsibilities(self, x: Tensor, alpha: Level = 1.0, sigma: Level = 0.0) -> Tensor:
        """``r_k(x) = p(component k | x_t = x)`` (G2), shape (..., K); at the defaults, of clean points."""
        log_joint = self._noised_parts(x, alpha, sigma)[-1]
        return torch.softmax(log_joint, dim=-1)

    def score_t(self, x: Tensor, alpha: Level, sigma: Level) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k S_k^{-1} (x - alpha mu_k)`` (G2)."""
        _, _, _, chol_t, diff, log_joint = self._noised_parts(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=-1)
        comp_scores = -_solve_vec(chol_t, diff)
        return (resp.unsqueeze(-1) * comp_scores).sum(-2)

    def posterior(self, x: Tensor, alpha: Level, sigma: Level) -> ComponentPosterior:
        """``p(x0 | x_t = x)`` (G3): ``m_k = mu_k + a Sigma_k S_k^{-1}(x - a mu_k)``,
        ``V_k = Sigma_k - a^2 Sigma_k S_k^{-1} Sigma_k``, weights ``r_k(x)``."""
        _, a, _, chol_t, diff, log_joint = self._noised_parts(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=-1)
        a2 = a[..., None, None]
        means = self.means + a2 * torch.einsum("kij,...kj->...ki", self.covs, _solve_vec(chol_t, diff))
        covs = self.covs - a[..., None, None, None] ** 2 * self.covs @ _solve(chol_t, self.covs)
        covs = 0.5 * (covs + covs.mT)
        return ComponentPosterior(resp, means, covs)

    def denoise(self, x: Tensor, alpha: Level, sigma: Level) -> Tensor:
        """Exact MMSE denoiser ``E[x0 | x_t = x] = sum_k r_k m_k`` (G4)."""
        post = self.posterior(x, alpha, sigma)
        return (post.weights.unsqueeze(-1) * post.means).sum(-2)

    def posterior_cov(self, x: Tensor, alpha: Level, sigma: Level) -> Tensor:
        """``Cov[x0 | x_t = x] = sum_k r_k (V_k + m_k m_k^T) - D D^T`` (G4, second-order Tweedie)."""
        post = self.posterior(x, alpha, sigma)
        mean = (post.weights.unsqueeze(-1) * post.means).sum(-2)
        second = post.covs + post.means.unsqueeze(-1) * post.means.unsqueeze(-2)
        return (post.weights[..., None, None] * second).sum(-3) - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def eps(self, x: Tensor, alpha: Level, sigma: Level) -> Tensor:
        """Exact noise prediction ``E[eps | x_t = x] = (x - alpha D) / sigma = -sigma score`` (sigma > 0)."""
        x = self._check_x(x)
        a, b = _level(alpha, x, "alpha"), _level(sigma, x, "sigma")
        if bool((b == 0).any()):
            raise ValueError("eps needs sigma > 0")
        return (x - a.unsqueeze(-1) * self.denoise(x, a, b)) / b.unsqueeze(-1)

    # -- linear-Gaussian observations (G5)-(G7) -----------------------------------------------------------
    def _observation(self, matrix: Tensor, y: Tensor, noise_cov: float | Tensor):
        matrix = torch.as_tensor(matrix, dtype=self.dtype, device=self.device)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"A must have shape (m, {self.dim}), got {tuple(matrix.shape)}")
        m = matrix.shape[0]
        y = torch.as_tensor(y, dtype=self.dtype, device=self.device)
        if y.ndim < 1 or y.shape[-1] != m:
            raise ValueError(f"y must have shape (..., {m}), got {tuple(y.shape)}")
        return matrix, y, _noise_cov(noise_cov, m, matrix)

    def _evidence_terms(self, matrix: Tensor, y: Tensor, noise_cov: float | Tensor):
        matrix, y, cov_y = self._observation(matrix, y, noise_cov)
        gram = matrix @ self.covs @ matrix.T + cov_y  # G_k
        chol_g = _chol(gram, "A Sigma_k A^T + noise_cov")
        resid = y.unsqueeze(-2) - self.means @ matrix.T  # (..., K, m)
        log_terms = torch.log(self.weights) + _gauss_logpdf(resid, chol_g)
        return matrix, y, chol_g, resid, log_terms

    def condition(self, A: Tensor, y: Tensor, noise_cov: float | Tensor) -> GaussianMixture:
        """Exact posterior ``p(x0 | y)`` for ``y = A x0 + n``, ``n ~ N(0, noise_cov)`` (G5).

        ``K_k = Sigma_k A^T G_k^{-1}``, ``G_k = A Sigma_k A^T + Sigma_y``; ``m_k = mu_k + K_k (y - A mu_k)``,
        ``C_k = Sigma_k - K_k A Sigma_k``, weights ``w_k N(y; A mu_k, G_k)``. ``y`` has shape (m,).
        """
        matrix, y, chol_g, resid, log_terms = self._evidence_terms(A, y, noise_cov)
        if y.ndim != 1:
            raise ValueError("condition takes one observation y of shape (m,)")
        cross = self.covs @ matrix.T  # Sigma_k A^T, (K, d, m)
        means = self.means + torch.einsum("kim,km->ki", cross, _solve_vec(chol_g, resid))
        covs = self.covs - cross @ _solve(chol_g, cross.mT)
        return GaussianMixture(torch.softmax(log_terms, dim=-1), means, 0.5 * (covs + covs.mT))

    def log_evidence(self, A: Tensor, y: Tensor, noise_cov: float | Tensor) -> Tensor:
        """``log p(y) = log sum_k w_k N(y; A mu_k, A Sigma_k A^T + Sigma_y)`` (G5), shape ``y.shape[:-1]``."""
        return torch.logsumexp(self._evidence_terms(A, y, noise_cov)[-1], dim=-1)

    def evidence(self, A: Tensor, y: Tensor, noise_cov: float | Tensor) -> Tensor:
        """``p(y)`` (G5); prefer :meth:`log_evidence` in high dimension."""
        return self.log_evidence(A, y, noise_cov).exp()

    def log_likelihood_t(self, x: Tensor, alpha: Level, sigma: Level, A: Tensor, y: Tensor,
                         noise_cov: float | Tensor) -> Tensor:
        """Exact noisy likelihood ``log p(y | x_t = x) = log sum_k r_k N(y; A m_k, A V_k A^T + Sigma_y)`` (G7)."""
        matrix, y, cov_y = self._observation(A, y, noise_cov)
        post = self.posterior(x, alpha, sigma)
        cov = matrix @ post.covs @ matrix.T + cov_y
        resid = y.unsqueeze(-2) - post.means @ matrix.T
        return torch.logsumexp(torch.log(post.weights) + _gauss_logpdf(resid, _chol(cov, "A V_k A^T + Sigma_y")),
                               dim=-1)

    def likelihood_score_t(self, x: Tensor, alpha: Level, sigma: Level, A: Tensor, y: Tensor,
                           noise_cov: float | Tensor) -> Tensor:
        """Exact ``grad_x log p_t(y | x_t = x) = score of p_t(. | y) - score of p_t`` (G6 minus G2)."""
        return self.condition(A, y, noise_cov).score_t(x, alpha, sigma) - self.score_t(x, alpha, sigma)

    # -- closed-form targets for Feynman-Kac correctors -------------------------------------------------
    def product(self, other: GaussianMixture) -> GaussianMixture:
        """Normalised ``p q`` with K1*K2 components: ``Sigma = Sigma_i (Sigma_i + L_j)^{-1} L_j``,
        ``mu = L_j (Sigma_i + L_j)^{-1} mu_i + Sigma_i (Sigma_i + L_j)^{-1} nu_j``,
        weight ``∝ w_i v_j N(mu_i; nu_j, Sigma_i + L_j)`` (exact in any dimension)."""
        if not isinstance(other, GaussianMixture) or other.dim != self.dim:
            raise ValueError("product needs a GaussianMixture of the same dimension")
        other = other.to(self.dtype)
        s1, s2 = self.covs[:, None], other.covs[None, :]  # (K1, 1, d, d), (1, K2, d, d)
        m1, m2 = self.means[:, None], other.means[None, :]
        chol_sum = _chol(s1 + s2, "Sigma_i + L_j")
        covs = s1 @ _solve(chol_sum, s2)
        means = (s2 @ _solve(chol_sum, m1.unsqueeze(-1)) + s1 @ _solve(chol_sum, m2.unsqueeze(-1))).squeeze(-1)
        log_w = (torch.log(self.weights)[:, None] + torch.log(other.weights)[None, :]
                 + _gauss_logpdf(m1 - m2, chol_sum))
        d = self.dim
        return GaussianMixture(torch.softmax(log_w.reshape(-1), dim=0), means.reshape(-1, d),
                               (0.5 * (covs + covs.mT)).reshape(-1, d, d))

    def power(self, beta: float) -> GaussianMixture:
        """``N(mu, Sigma)^beta ∝ N(mu, Sigma / beta)``; exact for a single Gaussian only.

        A mixture's power has no closed form: use :func:`annealed_grid` (d <= 2) as the reference.
        """
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if self.num_components != 1:
            raise ValueError("power() is exact only for a single Gaussian; use annealed_grid() for mixtures")
        return GaussianMixture(self.weights, self.means, self.covs / beta)


def gaussian_geometric_mean(gaussians: Sequence[GaussianMixture], exponents: Sequence[float]) -> GaussianMixture:
    """``prod_i N(mu_i, Sigma_i)^{beta_i} ∝ N(mu, Sigma)`` with ``Sigma^{-1} = sum_i beta_i Sigma_i^{-1}``,
    ``mu = Sigma sum_i beta_i Sigma_i^{-1} mu_i`` (exponents may be negative, e.g. CFG ``(1 - w, w)``)."""
    if len(gaussians) != len(exponents) or not gaussians:
        raise ValueError("need one exponent per Gaussian")
    if any(g.num_components != 1 for g in gaussians):
        raise ValueError("gaussian_geometric_mean takes single Gaussians; use geometric_grid() for mixtures")
    first = gaussians[0]
    precision = torch.zeros_like(first.covs[0])
    shift = torch.zeros_like(first.means[0])
    for g, beta in zip(gaussians, exponents):
        prec = torch.linalg.inv(g.covs[0].to(first.dtype))
        precision = precision + beta * prec
        shift = shift + beta * prec @ g.means[0].to(first.dtype)
    precision = 0.5 * (precision + precision.mT)
    chol = _chol(precision, "sum_i beta_i Sigma_i^{-1} (the target is not normalisable)")
    cov = torch.cholesky_inverse(chol)
    return GaussianMixture(first.weights.new_ones(1), (cov @ shift)[None], (0.5 * (cov + cov.mT))[None])


def _projected_quantiles(mixture: GaussianMixture, dirs: Tensor, levels: Tensor, iters: int = 200) -> Tensor:
    """Quantiles (L, n) of the 1-D mixtures ``u^T x0`` for unit directions ``dirs`` (L, d), by bisection."""
    means = mixture.means @ dirs.T  # (K, L)
    stds = torch.einsum("ld,kde,le->kl", dirs, mixture.covs, dirs).sqrt()
    lo = (means - 40 * stds).min(0).values[:, None].expand(-1, len(levels)).clone()
    hi = (means + 40 * stds).max(0).values[:, None].expand(-1, len(levels)).clone()
    root2 = math.sqrt(2)
    for _ in range(iters):
        mid = (lo + hi) / 2
        z = (mid[..., None] - means.T[:, None, :]) / stds.T[:, None, :]  # (L, n, K)
        below = (mixture.weights * 0.5 * torch.erfc(-z / root2)).sum(-1) < levels
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        if bool(((hi - lo) <= 4 * torch.finfo(mixture.dtype).eps * (1 + mid.abs())).all()):
            break
    return (lo + hi) / 2


class SlicedWasserstein:
    """Sliced 2-Wasserstein distance from samples to a fixed mixture, over fixed random directions.

    ``SW2 = sqrt(mean_u W2^2(u^T samples, u^T x0))`` over ``num_directions`` unit directions; each 1-D W2 pairs
    the sorted projections with the mixture's exact quantiles at ``(i + 1/2) / n`` (cached per sample size).
    Exact draws give ``O(n^{-1/2})``: compare against that floor.
    """

    def __init__(self, mixture: GaussianMixture, num_directions: int = 128,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(f"num_directions must be a positive int, got {num_directions!r}")
        self.mixture = mixture
        device = generator.device if generator is not None else mixture.device
        dirs = torch.randn(num_directions, mixture.dim, generator=generator, device=device, dtype=mixture.dtype)
        self.directions = (dirs / dirs.norm(dim=1, keepdim=True)).to(mixture.device)
        self._quantiles: dict[int, Tensor] = {}

    def __call__(self, samples: Tensor) -> Tensor:
        if samples.ndim != 2 or samples.shape[1] != self.mixture.dim:
            raise ValueError(f"samples must have shape (n, {self.mixture.dim}), got {tuple(samples.shape)}")
        n = samples.shape[0]
        if n not in self._quantiles:
            levels = (torch.arange(n, dtype=self.mixture.dtype, device=self.mixture.device) + 0.5) / n
            self._quantiles[n] = _projected_quantiles(self.mixture, self.directions, levels)
        proj = torch.sort(samples.to(self.mixture.dtype) @ self.directions.T, dim=0).values.T  # (L, n)
        return ((proj - self._quantiles[n]) ** 2).mean().sqrt()


def sliced_wasserstein(samples: Tensor, mixture: GaussianMixture, num_directions: int = 128,
                       generator: torch.Generator | None = None) -> Tensor:
    """One-off :class:`SlicedWasserstein` distance between ``samples`` (n, d) and ``mixture``."""
    return SlicedWasserstein(mixture, num_directions, generator)(samples)


# --------------------------------------------------------------------------------------------------------
# grid quadrature references for targets without a closed form (d <= 2)
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridDensity:
    """A density discretised on a uniform grid: cell centres ``points`` (P, d) and cell masses ``probs`` (P,)."""

    points: Tensor
    probs: Tensor
    spacing: Tensor  # (d,)

    def expect(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``E[fn(x)]`` by the midpoint rule; ``fn`` maps (P, d) to (P, ...)."""
        values = fn(self.points)
        return torch.tensordot(self.probs, values, dims=1)

    def mean(self) -> Tensor:
        return self.probs @ self.points

    def cov(self) -> Tensor:
        centred = self.points - self.mean()
        return (self.probs[:, None] * centred).T @ centred

    def mode_masses(self, mixture: GaussianMixture) -> Tensor:
        """``E[r_k(x)]`` under this density, with ``r_k`` the clean responsibilities of ``mixture`` (K,).

        The matching sample estimate is ``mixture.responsibilities(samples).mean(0)``.
        """
        return self.probs @ mixture.responsibilities(self.points)

    def cdf(self, x: Tensor) -> Tensor:
        """CDF of a 1-D grid density (piecewise linear within cells)."""
        if self.points.shape[1] != 1:
            raise ValueError("cdf is defined for 1-D grids")
        x = torch.as_tensor(x, dtype=self.points.dtype, device=self.points.device)
        h = self.spacing[0]
        edges = torch.cat([self.points[:, 0] - h / 2, self.points[-1:, 0] + h / 2])
        cum = torch.cat([self.probs.new_zeros(1), self.probs.cumsum(0)])
        pos = ((x - edges[0]) / h).clamp(0, len(self.probs))
        lo = pos.floor().long().clamp(max=len(self.probs) - 1)
        frac = pos - lo
        return cum[lo] + frac * (cum[lo + 1] - cum[lo])


def grid_density(log_density: Callable[[Tensor], Tensor], lows: Sequence[float], highs: Sequence[float],
                 num_points: int | Sequence[int] = 2001, edge_tol: float = 1e-12,
                 dtype: torch.dtype = torch.float64) -> GridDensity:
    """Normalise an unnormalised ``log_density`` ((P, d) -> (P,)) on a uniform grid over a box (d <= 2).

    Raises ValueError when the boundary cells carry more than ``edge_tol`` of the peak density: the box is too
    small or the target is not normalisable.
    """
    d = len(lows)
    if d not in (1, 2) or len(highs) != d:
        raise ValueError("grid_density supports 1-D and 2-D boxes: lows and highs of length 1 or 2")
    counts = [num_points] * d if isinstance(num_points, int) else list(num_points)
    if len(counts) != d or any(n < 3 for n in counts):
        raise ValueError("num_points must be >= 3 per dimension")
    if any(hi <= lo for lo, hi in zip(lows, highs)):
        raise ValueError("highs must exceed lows")
    spacing = torch.tensor([(hi - lo) / n for lo, hi, n in zip(lows, highs, counts)], dtype=dtype)
    axes = [lo + (torch.arange(n, dtype=dtype) + 0.5) * h for lo, n, h in zip(lows, counts, spacing)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    points = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
    log_p = log_density(points).reshape(*counts)
    if not torch.isfinite(log_p).any():
        raise ValueError("log_density is not finite anywhere on the grid")
    log_p = log_p - log_p.max()
    edge = torch.cat([log_p.select(i, j).reshape(-1) for i in range(d) for j in (0, -1)])
    if float(edge.max().exp()) > edge_tol:
        raise ValueError("the density does not vanish at the box boundary: widen lows/highs, or the target "
                         "is not normalisable")
    probs = torch.softmax(log_p.reshape(-1), dim=0)
    return GridDensity(points, probs, spacing)


def _box(mixtures: Sequence[GaussianMixture], widen: float) -> tuple[list[float], list[float]]:
    lows, highs = [], []
    for i in range(mixtures[0].dim):
        lo = min(float((m.means[:, i] - widen * m.covs[:, i, i].sqrt()).min()) for m in mixtures)
        hi = max(float((m.means[:, i] + widen * m.covs[:, i, i].sqrt()).max()) for m in mixtures)
        lows.append(lo)
        highs.append(hi)
    return lows, highs


def annealed_grid(mixture: GaussianMixture, beta: float, num_points: int | Sequence[int] | None = None,
                  widen: float = 10.0) -> GridDensity:
    """Grid reference for ``p^beta`` of a 1-D/2-D mixture (use ``mixture.noised(a, s)`` for ``p_t^beta``)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lows, highs = _box([mixture], widen / math.sqrt(min(beta, 1.0)))
    n = num_points or (4001 if mixture.dim == 1 else 401)
    return grid_density(lambda x: beta * mixture.log_prob(x), lows, highs, n)


def geometric_grid(cond: GaussianMixture, uncond: GaussianMixture, weight: float,
                   num_points: int | Sequence[int] | None = None, widen: float = 10.0) -> GridDensity:
    """Grid reference for the CFG target ``p_c^w p_u^(1-w)`` of 1-D/2-D mixtures."""
    if cond.dim != uncond.dim:
        raise ValueError("cond and uncond must have the same dimension")
    lows, highs = _box([cond, uncond], widen)
    n = num_points or (4001 if cond.dim == 1 else 401)
    return grid_density(lambda x: weight * cond.log_prob(x) + (1 - weight) * uncond.log_prob(x), lows, highs, n)


# --------------------------------------------------------------------------------------------------------
# a class-conditional "network" for samplers and diffusers pipelines
# --------------------------------------------------------------------------------------------------------
class _Config(dict):
    """A read-only dict with attribute access (what pipelines read from ``unet.config``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def _blocked(self, *args, **kwargs):
        raise TypeError("config is read-only")

    __setitem__ = __delitem__ = update = pop = setdefault = _blocked


class ClassConditionalGMM(torch.nn.Module):
    """One Gaussian mixture per class plus the unconditional mixture ``sum_c prior_c p_c``; exact eps/x0.

    The mixture lives on the flattened ``sample_shape = (C, H, W)`` image. Two uses:

    * model callable ``gmm.eps(x_t, t, cond) -> eps`` (``x_t`` of shape (B, d) or (B, C, H, W); ``cond``
      class labels (B,), with ``null_class_label == num_classes`` (or ``None``) for the unconditional mixture);
    * drop-in UNet: ``forward(sample, timestep, class_labels=None, ...)`` returns an object with ``.sample``
      (a tuple with ``return_dict=False``) and ``config`` carries ``in_channels``, ``sample_size``,
      ``num_class_embeds = num_classes + 1`` etc., so ``ClassConditionalPipeline(unet=gmm, scheduler=...)`` runs.

    Timesteps map to ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` through ``alphas_cumprod`` (the scheduler's):
    integer ``t`` reads ``abar[t]``; non-integer ``t`` interpolates the VE sigma ``sqrt((1 - abar)/abar)``
    linearly between neighbouring integers, as diffusers' Euler schedulers do (``interpolation_type="linear"``).
    :meth:`denoiser` skips timesteps altogether and uses a sampler ``Level``'s exact ``alpha, sigma``.
    """

    def __init__(self, class_mixtures: Sequence[GaussianMixture], alphas_cumprod: Tensor,
                 class_priors: Tensor | None = None, sample_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if alphas_cumprod.ndim != 1 or bool(((alphas_cumprod <= 0) | (alphas_cumprod >= 1)).any()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1)")
        self._register_mixtures(class_mixtures, class_priors, sample_shape, len(alphas_cumprod))
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def _register_mixtures(self, class_mixtures: Sequence[GaussianMixture], class_priors: Tensor | None,
                           sample_shape: Sequence[int] | None, num_train_timesteps: int) -> None:
        if not class_mixtures or not all(isinstance(m, GaussianMixture) for m in class_mixtures):
            raise TypeError("class_mixtures must be a non-empty sequence of GaussianMixture")
        dim = class_mixtures[0].dim
        if any(m.dim != dim for m in class_mixtures):
            raise ValueError("all class mixtures must have the same dimension")
        sample_shape = (1, dim, 1) if sample_shape is None else tuple(int(s) for s in sample_shape)
        if len(sample_shape) != 3 or math.prod(sample_shape) != dim:
            raise ValueError(f"sample_shape must be (C, H, W) with C*H*W = {dim}, got {sample_shape}")
        dtype = class_mixtures[0].dtype
        priors = torch.ones(len(class_mixtures), dtype=dtype) if class_priors is None else torch.as_tensor(
            class_priors, dtype=dtype)
        if priors.shape != (len(class_mixtures),) or bool((priors <= 0).any()):
            raise ValueError(f"class_priors must be {len(class_mixtures)} positive numbers")
        self.sample_shape = sample_shape
        self.register_buffer("class_priors", priors / priors.sum())
        self.register_buffer("counts", torch.tensor([m.num_components for m in class_mixtures]))
        self.register_buffer("weights", torch.cat([m.weights.to(dtype) for m in class_mixtures]))
        self.register_buffer("means", torch.cat([m.means.to(dtype) for m in class_mixtures]))
        self.register_buffer("covs", torch.cat([m.covs.to(dtype) for m in class_mixtures]))
        self.config = _Config(
            in_channels=sample_shape[0], out_channels=sample_shape[0], sample_size=tuple(sample_shape[1:]),
            num_class_embeds=len(class_mixtures) + 1, time_cond_proj_dim=None,
            num_train_timesteps=num_train_timesteps, dim=dim)

    # -- mixtures -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def null_class_label(self) -> int:
        return self.num_classes

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def mixture(self, label: int | None = None) -> GaussianMixture:
        """The class-``label`` mixture; ``None`` or ``null_class_label`` gives the unconditional one."""
        if label is None or label == self.null_class_label:
            priors = torch.repeat_interleave(self.class_priors, self.counts)
            return GaussianMixture(priors * self.weights, self.means, self.covs)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise ValueError(f"class label must be an int in 0..{self.num_classes} ({self.num_classes} = "
                             f"unconditional), got {label!r}")
        stop = int(self.counts[: label + 1].sum())
        start = stop - int(self.counts[label])
        return GaussianMixture(self.weights[start:stop], self.means[start:stop], self.covs[start:stop])

    # -- timesteps ---------------------------------------------------------------------------------------
    def noise_level(self, timestep: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` (float64, shape of ``timestep``) of a network timestep; see the class docstring."""
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device).to(torch.float64)
        last = len(self.alphas_cumprod) - 1
        if not torch.isfinite(t).all() or bool(((t < 0) | (t > last)).any()):
            raise ValueError(f"timesteps must lie in [0, {last}], got {timestep}")
        abar = self.alphas_cumprod
        lo = t.floor().long().clamp(max=last)
        hi = (lo + 1).clamp(max=last)
        frac = t - lo
        ve = ((1 - abar) / abar).sqrt()
        ve_t = ve[lo] + frac * (ve[hi] - ve[lo])
        abar_t = torch.where(frac == 0, abar[lo], 1 / (1 + ve_t**2))
        return abar_t.sqrt(), (1 - abar_t).sqrt()

    def _labels(self, labels: Tensor | int | None, batch: int) -> Tensor:
        if labels is None:
            return torch.full((batch,), self.null_class_label, dtype=torch.long)
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError("class labels must be integers")
        labels = labels.reshape(-1).cpu()
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch}")
        if bool(((labels < 0) | (labels > self.null_class_label)).any()):
            raise ValueError(f"class labels must lie in 0..{self.null_class_label} "
                             f"({self.null_class_label} = unconditional), got {labels.tolist()}")
        return labels

    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x_t must be a floating-point tensor")
        if x.ndim == 2 and x.shape[1] == self.dim:
            return x
        if x.ndim == 4 and tuple(x.shape[1:]) == self.sample_shape:
            return x.reshape(x.shape[0], self.dim)
        raise ValueError(f"x_t must have shape (B, {self.dim}) or (B, {', '.join(map(str, self.sample_shape))}), "
                         f"got {tuple(x.shape)}")

    def _per_class(self, x: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor, what: str) -> Tensor:
        flat = self._flat(x).to(self.dtype)
        batch = flat.shape[0]
        # one level for the batch stays 0-dim: per-row levels cost one factorisation per row
        alpha, sigma = (v.to(self.dtype).reshape(batch) if v.numel() > 1 and bool((v != v.flatten()[0]).any())
                        else v.to(self.dtype).flatten()[0] for v in (alpha, sigma))
        labels = self._labels(labels, batch)
        out = torch.empty_like(flat)
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero().squeeze(1).to(flat.device)
            mixture = self.mixture(int(label))
            fn = mixture.eps if what == "eps" else mixture.denoise
            levels = [v[rows] if v.ndim else v for v in (alpha, sigma)]
            out[rows] = fn(flat[rows], *levels)
        return out.reshape(x.shape).to(x.dtype)

    # -- model callables ---------------------------------------------------------------------------------
    def eps(self, x_t: Tensor, t: float | Tensor, cond: Tensor | int | None = None) -> Tensor:
        """Exact ``E[eps | x_t]`` at network time ``t`` for class labels ``cond`` (``None`` = unconditional)."""
        alpha, sigma = self.noise_level(t)
        return self._per_class(x_t, alpha, sigma, cond, "eps")

    def denoiser(self, cond: Tensor | int | None = None) -> Callable:
        """A sampler ``DenoiseFn``: ``(x_t, level) -> E[x0 | x_t]`` at the level's exact ``alpha, sigma``."""

        def denoise(x_t: Tensor, level) -> Tensor:
            return self._per_class(x_t, torch.as_tensor(level.alpha), torch.as_tensor(level.sigma), cond, "x0")

        return denoise

    def forward(self, sample: Tensor, timestep: float | Tensor, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, return_dict: bool = True, **kwargs):
        """UNet-style call: ``sample`` (B, C, H, W) -> eps prediction in ``.sample``."""
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if sample.ndim != 4 or tuple(sample.shape[1:]) != self.sample_shape:
            raise ValueError(f"sample must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(sample.shape)}")
        eps = self.eps(sample, timestep, class_labels)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


class FlowMatchingGMM(ClassConditionalGMM):
    """The class-conditional mixtures as a rectified-flow network: exact velocities ``v = E[eps - x0 | x_s]``.

    A drop-in for SD3Transformer2DModel-style transformers: ``forward(hidden_states=x_s, timestep=t, ...)``
    reads the flow state ``x_s = (1 - s) x0 + s eps`` at ``s = t / num_train_timesteps`` (diffusers'
    FlowMatch* timesteps ``t = 1000 s``; ``s = 1`` is pure noise) and returns the velocity in ``.sample``.
    Class labels come as ``class_labels=`` (``None`` or ``null_class_label``: the unconditional mixture); the
    text-model arguments (``encoder_hidden_states``, ``pooled_projections``, ...) are accepted and ignored.
    ``v = (x_s - D) / s`` with the exact denoiser ``D = E[x0 | x_s]`` (G4) at ``alpha = 1 - s, sigma = s``.
    :meth:`denoiser` (inherited) answers x0 at a sampler ``Level``'s exact ``alpha, sigma`` (any scale).
    """

    def __init__(self, class_mixtures: Sequence[GaussianMixture], num_train_timesteps: int = 1000,
                 class_priors: Tensor | None = None, sample_shape: Sequence[int] | None = None) -> None:
        torch.nn.Module.__init__(self)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self._register_mixtures(class_mixtures, class_priors, sample_shape, num_train_timesteps)

    def noise_level(self, timestep: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma) = (1 - s, s)`` with ``s = timestep / num_train_timesteps`` in [0, 1] (float64)."""
        s = torch.as_tensor(timestep, device=self.means.device).to(torch.float64) / self.config.num_train_timesteps
        if not torch.isfinite(s).all() or bool(((s < 0) | (s > 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps}], got {timestep}")
        return 1 - s, s

    def velocity(self, x_s: Tensor, t: float | Tensor, cond: Tensor | int | None = None) -> Tensor:
        """Exact ``E[eps - x0 | x_s]`` at network time ``t`` (flow state ``x_s``, ``s > 0``)."""
        alpha, sigma = self.noise_level(t)
        if bool((sigma == 0).any()):
            raise ValueError("the velocity needs s > 0 (timestep > 0)")
        x0 = self._per_class(x_s, alpha, sigma, cond, "x0")
        return (x_s - x0) / sigma.to(x_s.dtype).reshape(-1, *[1] * (x_s.ndim - 1))

    def forward(self, hidden_states: Tensor, timestep: float | Tensor, encoder_hidden_states: Tensor | None = None,
                pooled_projections: Tensor | None = None, class_labels: Tensor | None = None,
                return_dict: bool = True, **kwargs):
        """Transformer-style call: ``hidden_states`` (B, C, H, W) flow state -> velocity in ``.sample``."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != self.sample_shape:
            raise ValueError(f"hidden_states must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(hidden_states.shape)}")
        v = self.velocity(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)
