"""CFG++ (Chung et al., ICLR 2025): interpolate for the data term, renoise with the unconditional branch."""

from __future__ import annotations

from torch import Tensor

from .base import Guidance, Guided, Step, check_scale, require_uncond


class CFGPlusPlus(Guidance):
    """CFG++ with interpolation weight ``lam`` (paper's lambda, usually in [0, 1]).

    ``eps_lam = eps_u + lam (eps_c - eps_u)`` gives the Tweedie estimate; the sampler renoises with
    ``eps_u`` (Alg. 2 of the paper). On a DDIM step this equals CFG with the time-varying scale
    ``omega_t = lam * s_t / (s_t - s_prev)`` (VE sigmas, see :func:`equivalent_cfg_scale`), so ``lam`` is
    not comparable across step counts: at 50 DDIM steps of SD1.5, lam in [0, 1] is like omega in [1, 12.5].
    Needs both branches at every step, also at ``lam == 1``.
    """

    changes_renoise = True

    def __init__(self, lam: float = 0.6) -> None:
        self.lam = check_scale("lam", lam)

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "CFGPlusPlus")
        pred = uncond + self.lam * (step.pred_cond - uncond)
        return Guided(pred, uncond)

    def __repr__(self) -> str:
        return f"CFGPlusPlus(lam={self.lam})"


def equivalent_cfg_scale(lam: float, alpha_bar: float | Tensor, alpha_bar_prev: float | Tensor):
    """CFG scale whose DDIM step equals the CFG++ step: ``lam * s_t / (s_t - s_prev)`` with ``s = sqrt((1-ab)/ab)``."""
    s_t = ((1 - alpha_bar) / alpha_bar) ** 0.5
    s_p = ((1 - alpha_bar_prev) / alpha_bar_prev) ** 0.5
    return lam * s_t / (s_t - s_p)
