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
and ``sigma`` are ``Coefficient``s: floats, 0-dim tensors or tensors broadcasting against ``x.shape[:-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Coefficient = float | Tensor


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


def _coefficient(value: Coefficient, like: Tensor, name: str) -> Tensor:
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


class MeansLayout:
    """``dim``, ``dtype`` and ``device`` of an object holding component ``means`` of shape ``(K, d)``."""

    means: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device


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
class GaussianMixture(MeansLayout):
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
    def _noised_parts(self, x: Tensor, alpha: Coefficient, sigma: Coefficient):
        x = self._check_x(x)
        a, b = _coefficient(alpha, x, "alpha"), _coefficient(sigma, x, "sigma")
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

    def log_prob_t(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> Tensor:
        """``log p_t(x)`` (G1)."""
        return torch.logsumexp(self._noised_parts(x, alpha, sigma)[-1], dim=-1)

    def responsibilities(self, x: Tensor, alpha: Coefficient = 1.0, sigma: Coefficient = 0.0) -> Tensor:
        """``r_k(x) = p(component k | x_t = x)`` (G2), shape (..., K); at the defaults, of clean points."""
        log_joint = self._noised_parts(x, alpha, sigma)[-1]
        return torch.softmax(log_joint, dim=-1)

    def score_t(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k S_k^{-1} (x - alpha mu_k)`` (G2)."""
        _, _, _, chol_t, diff, log_joint = self._noised_parts(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=-1)
        comp_scores = -_solve_vec(chol_t, diff)
        return (resp.unsqueeze(-1) * comp_scores).sum(-2)

    def posterior(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> ComponentPosterior:
        """``p(x0 | x_t = x)`` (G3): ``m_k = mu_k + a Sigma_k S_k^{-1}(x - a mu_k)``,
        ``V_k = Sigma_k - a^2 Sigma_k S_k^{-1} Sigma_k``, weights ``r_k(x)``."""
        _, a, _, chol_t, diff, log_joint = self._noised_parts(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=-1)
        a2 = a[..., None, None]
        means = self.means + a2 * torch.einsum("kij,...kj->...ki", self.covs, _solve_vec(chol_t, diff))
        covs = self.covs - a[..., None, None, None] ** 2 * self.covs @ _solve(chol_t, self.covs)
        covs = 0.5 * (covs + covs.mT)
        return ComponentPosterior(resp, means, covs)

    def denoise(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> Tensor:
        """Exact MMSE denoiser ``E[x0 | x_t = x] = sum_k r_k m_k`` (G4)."""
        post = self.posterior(x, alpha, sigma)
        return (post.weights.unsqueeze(-1) * post.means).sum(-2)

    def posterior_cov(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> Tensor:
        """``Cov[x0 | x_t = x] = sum_k r_k (V_k + m_k m_k^T) - D D^T`` (G4, second-order Tweedie)."""
        post = self.posterior(x, alpha, sigma)
        mean = (post.weights.unsqueeze(-1) * post.means).sum(-2)
        second = post.covs + post.means.unsqueeze(-1) * post.means.unsqueeze(-2)
        return (post.weights[..., None, None] * second).sum(-3) - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def eps(self, x: Tensor, alpha: Coefficient, sigma: Coefficient) -> Tensor:
        """Exact noise prediction ``E[eps | x_t = x] = (x - alpha D) / sigma = -sigma score`` (sigma > 0)."""
        x = self._check_x(x)
        a, b = _coefficient(alpha, x, "alpha"), _coefficient(sigma, x, "sigma")
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

    def log_likelihood_t(self, x: Tensor, alpha: Coefficient, sigma: Coefficient, A: Tensor, y: Tensor,
                         noise_cov: float | Tensor) -> Tensor:
        """Exact noisy likelihood ``log p(y | x_t = x) = log sum_k r_k N(y; A m_k, A V_k A^T + Sigma_y)`` (G7)."""
        matrix, y, cov_y = self._observation(A, y, noise_cov)
        post = self.posterior(x, alpha, sigma)
        cov = matrix @ post.covs @ matrix.T + cov_y
        resid = y.unsqueeze(-2) - post.means @ matrix.T
        return torch.logsumexp(torch.log(post.weights) + _gauss_logpdf(resid, _chol(cov, "A V_k A^T + Sigma_y")),
                               dim=-1)

    def likelihood_score_t(self, x: Tensor, alpha: Coefficient, sigma: Coefficient, A: Tensor, y: Tensor,
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
