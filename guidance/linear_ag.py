"""LinearAG (Castillo et al., AAAI 2025, arXiv 2312.12487): unconditional passes replaced by regression.

At a replaced step ``i`` the unconditional epsilon is estimated as an affine combination of past predictions,

    eps_u_hat(i) = sum_j beta_j(i) h_j(i),
    h(i) = [eps_c(i), eps_c(i-1), eps_u(i-1), ..., eps_c(i-k), eps_u(i-k)] (+ [x_i] with ``use_x``, + [1] with ``bias``)

with scalar coefficients ``beta(i)`` per step, shared by all pixels and samples and fitted once by ordinary
least squares on calibration trajectories of full CFG. The regressor set (``history`` = k past steps, the
optional ``x_i`` and constant terms) and the replaced steps are reconstructions: the paper's exact choice is
not public, so both are parameters.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import to_x0

from .adaptive import SPACES, AdaptiveGuidance
from .base import Guidance, Guided, Step, batch_view, check_flag, check_scale, require_uncond


def regressors(eps_cond: Sequence[Tensor], eps_uncond: Sequence[Tensor], x: Tensor | None, index: int,
               history: int, bias: bool) -> list[Tensor]:
    """The regressor tensors ``h(index)`` from per-step lists of predictions (each ``(B, ...)``)."""
    hs = [eps_cond[index]]
    for lag in range(1, history + 1):
        hs += [eps_cond[index - lag], eps_uncond[index - lag]]
    if x is not None:
        hs.append(x)
    if bias:
        hs.append(torch.ones_like(eps_cond[index]))
    return hs


def fit_coefficients(eps_cond: Tensor, eps_uncond: Tensor, x: Tensor | None = None, history: int = 1,
                     bias: bool = False) -> Tensor:
    """OLS coefficients ``beta`` of shape ``(num_steps, num_regressors)``, NaN rows for the first ``history`` steps.

    ``eps_cond``, ``eps_uncond`` (and ``x``, if the state is a regressor) are ``(num_steps, N, ...)``: the
    predictions of ``N`` calibration samples of full-CFG runs with the same schedule. Each step is one
    least-squares problem over all samples and pixels, solved in float64.
    """
    if eps_cond.shape != eps_uncond.shape or eps_cond.ndim < 2:
        raise ValueError(f"eps_cond and eps_uncond must both be (num_steps, N, ...), got {tuple(eps_cond.shape)} "
                         f"and {tuple(eps_uncond.shape)}")
    if x is not None and x.shape != eps_cond.shape:
        raise ValueError(f"x must have the shape of eps_cond {tuple(eps_cond.shape)}, got {tuple(x.shape)}")
    if not isinstance(history, int) or history < 0:
        raise ValueError(f"history must be an int >= 0, got {history!r}")
    if not all(torch.isfinite(t).all() for t in (eps_cond, eps_uncond) + (() if x is None else (x,))):
        raise ValueError("LinearAG fit: the calibration predictions contain non-finite values")
    num_steps = eps_cond.shape[0]
    size = 1 + 2 * history + (x is not None) + bias
    beta = torch.full((num_steps, size), float("nan"), dtype=torch.float64)
    for i in range(history, num_steps):
        hs = regressors(eps_cond, eps_uncond, None if x is None else x[i], i, history, bias)
        design = torch.stack([h.double().reshape(-1) for h in hs], dim=1)
        target = eps_uncond[i].double().reshape(-1, 1)
        beta[i] = torch.linalg.lstsq(design, target, driver="gelsd").solution[:, 0]
    if not torch.isfinite(beta[history:]).all():
        raise ValueError("LinearAG fit produced non-finite coefficients")
    return beta


class LinearAG(Guidance):
    """CFG in which the unconditional pass of some steps is replaced by an affine estimate (LinearAG).

    The paper uses the estimate in the first (high-noise) part of sampling, where AG cannot truncate yet, and
    AG's truncation afterwards; ``until`` and ``threshold`` give that combination.

    Args:
        scale: CFG weight ``w`` (``u + w (c - u)``) applied with the real or the estimated ``eps_u``.
        replace: which steps use the estimate: ``"alternate"`` (every other step once ``history`` steps have
            been evaluated: ``history + 1, history + 3, ...``, so every estimate leans on a measured ``eps_u``),
            ``"all"`` (every step from ``history`` on), both only before ``until * num_steps``; or an explicit
            sequence of step indices ``>= history``.
        until: fraction of the run after which ``"alternate"``/``"all"`` stop replacing (the estimate degrades
            at low noise, where ``eps_c - eps_u`` is tiny compared with its error).
        threshold: if given, AG's per-sample truncation (:class:`AdaptiveGuidance`, cosine in ``space``) on the
            steps that evaluate the unconditional branch; ``None`` keeps CFG there. ``guide.adaptive.cosines`` is
            then ``(num_steps, B)``, row ``i`` = step ``i``, NaN at the replaced steps (nothing measured there).
        space: AG's cosine space, ``"x0"`` or ``"eps"`` (see :class:`AdaptiveGuidance`).
        history: number of past steps whose ``eps_c`` and ``eps_u`` enter the regression.
        use_x: also regress on the current state ``x_t``.
        bias: also fit a constant term (an affine rather than linear estimate).

    Calibrate, then sample::

        guide = LinearAG(scale=2.0)
        with guide.calibration():          # full CFG; records (eps_c, eps_u) of every step
            run(guide)                     # one or more sampling calls with the production schedule
        guide.fit()                        # OLS per step; ``guide.coefficients`` is (num_steps, regressors)
        run(guide)                         # replaced steps skip the unconditional rows

    ``fit(eps_cond=..., eps_uncond=...)`` also accepts recorded trajectories directly.
    """

    def __init__(self, scale: float = 7.5, replace: str | Sequence[int] = "alternate", until: float = 0.5,
                 threshold: float | None = None, space: str = "x0", history: int = 1, use_x: bool = False,
                 bias: bool = False) -> None:
        self.scale = check_scale("scale", scale)
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        if isinstance(replace, str):
            if replace not in ("alternate", "all"):
                raise ValueError(f"replace must be 'alternate', 'all' or a sequence of step indices, got {replace!r}")
        else:
            try:
                indices = [operator.index(i) for i in replace if not isinstance(i, bool)]
            except TypeError:
                indices = None
            if indices is None or len(indices) != len(replace):
                raise TypeError(f"replace must be 'alternate', 'all' or a sequence of int step indices, "
                                f"got {replace!r}")
            replace = sorted(set(indices))
            if any(i < history for i in replace):
                raise ValueError(f"replaced step indices must be >= history={history}, got {replace}")
        self.until = check_scale("until", until)
        if self.until > 1:
            raise ValueError(f"until must lie in [0, 1], got {until}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.adaptive = None if threshold is None else AdaptiveGuidance(scale, threshold, space)
        self.replace, self.history = replace, history
        self.use_x, self.bias = check_flag("use_x", use_x), check_flag("bias", bias)
        self.coefficients: Tensor | None = None
        self._calibrating = False
        self._records: list[tuple[Tensor, Tensor, Tensor]] = []
        self._eps_cond: list[Tensor] = []
        self._eps_uncond: list[Tensor] = []
        self._x: list[Tensor] = []

    # -- calibration ------------------------------------------------------------------------------------
    @contextmanager
    def calibration(self) -> Iterator["LinearAG"]:
        """Inside the block the guide runs full CFG and records every step's predictions for :meth:`fit`."""
        self._calibrating, self._records = True, []
        try:
            yield self
        finally:
            self._calibrating = False

    def fit(self, eps_cond: Tensor | None = None, eps_uncond: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """Fit the per-step coefficients by OLS, on the recorded calibration runs or on given ``(steps, N, ...)``."""
        if eps_cond is None:
            if not self._records:
                raise ValueError("LinearAG.fit: nothing recorded; run sampling inside `with guide.calibration():` "
                                 "or pass eps_cond and eps_uncond")
            steps = {r[0].shape[0] for r in self._records}
            if len(steps) != 1:
                raise ValueError(f"calibration runs used different step counts {sorted(steps)}; use one schedule")
            eps_cond = torch.cat([r[0] for r in self._records], dim=1)
            eps_uncond = torch.cat([r[1] for r in self._records], dim=1)
            x = torch.cat([r[2] for r in self._records], dim=1)
        elif eps_uncond is None:
            raise ValueError("pass eps_uncond together with eps_cond")
        if self.use_x and x is None:
            raise ValueError("use_x=True needs the states x of the calibration runs")
        if eps_cond.shape[0] <= self.history:
            raise ValueError(f"need more than history={self.history} steps to fit, got {eps_cond.shape[0]}")
        self.coefficients = fit_coefficients(eps_cond, eps_uncond, x if self.use_x else None, self.history, self.bias)
        return self.coefficients

    # -- sampling ---------------------------------------------------------------------------------------
    def replaced(self, index: int, num_steps: int) -> bool:
        """Whether step ``index`` of a ``num_steps`` run uses the regression instead of the network."""
        if self._calibrating or index < self.history:
            return False
        if self.coefficients is None:
            raise RuntimeError("LinearAG is not fitted: calibrate with `with guide.calibration(): ...` then fit()")
        if num_steps != self.coefficients.shape[0]:
            raise ValueError(f"LinearAG was fitted for {self.coefficients.shape[0]} steps, the run has {num_steps}")
        if not isinstance(self.replace, str):
            return index in self.replace
        if index >= self.until * num_steps:
            return False
        return self.replace == "all" or (index - self.history) % 2 == 1

    def reset(self) -> None:
        self._eps_cond, self._eps_uncond, self._x = [], [], []
        if self.adaptive is not None:
            self.adaptive.reset()

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        skip = self.replaced(level.index, level.num_steps)
        mask = torch.full((batch_size,), not skip, dtype=torch.bool, device=level.alpha.device)
        if self.adaptive is not None and not self._calibrating:
            mask &= self.adaptive.needs_uncond(level, batch_size)
        return mask

    def estimate_uncond(self, eps_cond: Tensor, x: Tensor, index: int) -> Tensor:
        """``eps_u_hat = sum_j beta_j h_j`` from the current ``eps_c`` and the stored history of this run."""
        cond = self._eps_cond + [eps_cond]
        hs = regressors(cond, self._eps_uncond, x if self.use_x else None, len(cond) - 1, self.history, self.bias)
        beta = self.coefficients[index].to(eps_cond.device)
        return sum(b * h.double() for b, h in zip(beta, hs)).to(eps_cond.dtype)

    def combine(self, step: Step) -> Guided:
        if len(self._eps_cond) != step.index:
            raise RuntimeError(f"LinearAG saw step {step.index} after {len(self._eps_cond)} steps: "
                               "steps must run in order from 0 (reset() starts a run)")
        eps_cond = step.eps(step.pred_cond)
        adaptive = None if self._calibrating else self.adaptive
        if self.replaced(step.index, step.num_steps):
            eps_uncond = self.estimate_uncond(eps_cond, step.x, step.index)
            uncond = eps_uncond if step.prediction_type == "epsilon" else \
                step.from_x0(to_x0(eps_uncond, step.x, step.alpha, step.sigma, "epsilon"))
            pred = uncond + self.scale * (step.pred_cond - uncond)
            if adaptive is not None:
                adaptive.skip(step)
                pred = torch.where(batch_view(adaptive.truncated.to(pred.device), pred), step.pred_cond, pred)
        else:
            uncond = require_uncond(step, "LinearAG")
            eps_uncond = step.eps(uncond)
            pred = adaptive.combine(step).denoise if adaptive is not None else \
                uncond + self.scale * (step.pred_cond - uncond)
        self._eps_cond.append(eps_cond.detach())
        self._eps_uncond.append(eps_uncond.detach())
        self._x.append(step.x.detach())
        if self._calibrating and step.index == step.num_steps - 1:  # a complete run: keep it for fit()
            self._records.append((torch.stack(self._eps_cond), torch.stack(self._eps_uncond), torch.stack(self._x)))
        return Guided(pred, pred)

    def __repr__(self) -> str:
        threshold = None if self.adaptive is None else self.adaptive.threshold
        return (f"LinearAG(scale={self.scale}, replace={self.replace!r}, until={self.until}, threshold={threshold}, "
                f"history={self.history}, use_x={self.use_x}, bias={self.bias}, "
                f"fitted={self.coefficients is not None})")
