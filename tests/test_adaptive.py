"""Adaptive Guidance and LinearAG: formulas vs references, per-sample truncation, rows really saved, OLS."""

import pytest
import torch

from diffguide import guidance
from diffguide.guidance import CFG, AdaptiveGuidance, GuidedDenoiser, LinearAG, Step
from diffguide.guidance.adaptive import guidance_cosine
from diffguide.guidance.linear_ag import fit_coefficients
from guide_models import F64, class_pipe, count_rows, gmm_problem
from diffguide.samplers import sample_ddim


def ag_cosine(eps_c, eps_u):  # reference notes, Appendix A
    return torch.nn.functional.cosine_similarity(eps_c.flatten(1), eps_u.flatten(1), dim=1)


def random_step(gen, batch=4, index=0, num_steps=10, uncond=None, mask=None):
    x, c = (torch.randn(batch, 2, 3, 3, generator=gen, dtype=F64) for _ in range(2))
    u = torch.randn(batch, 2, 3, 3, generator=gen, dtype=F64) if uncond is None else uncond
    return Step(x, torch.tensor(500), torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64), index, num_steps,
                c, u, uncond_mask=mask)


class Recorder(CFG):
    """CFG that records eps_c, eps_u and their cosine at every step (oracles for AG and LinearAG)."""

    def __init__(self, scale):
        super().__init__(scale)
        self.cos, self.eps_c, self.eps_u = [], [], []

    def combine(self, step):
        self.eps_c.append(step.eps(step.pred_cond))
        self.eps_u.append(step.eps(step.pred_uncond))
        self.cos.append(ag_cosine(self.eps_c[-1], self.eps_u[-1]))
        return super().combine(step)


# ---------------------------------------------------------------------------------------------------- AG
def test_cosine_matches_reference(gen):
    c, u = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    assert torch.allclose(guidance_cosine(c, u), ag_cosine(c, u).double(), atol=1e-6)
    assert torch.allclose(guidance_cosine(c, 2 * c), torch.ones(5, dtype=F64))


def test_ag_step_is_cfg_then_cond_per_sample(gen):
    """One step: CFG on every row; rows whose cosine passes the threshold skip the uncond branch afterwards."""
    c = torch.randn(4, 8, generator=gen, dtype=F64)
    noise = torch.randn(4, 8, generator=gen, dtype=F64)
    u = c + torch.tensor([0.01, 1.0, 0.02, 3.0], dtype=F64)[:, None] * noise  # rows 0, 2 nearly aligned
    x = torch.randn(4, 8, generator=gen, dtype=F64)
    step = Step(x, torch.tensor(1), torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64), 0, 5, c, u)
    ag = AdaptiveGuidance(scale=4.0, threshold=0.99, space="eps")
    out = ag.combine(step).denoise
    assert torch.equal(out, u + 4.0 * (c - u))
    expected_skip = ag_cosine(c, u) > 0.99
    assert expected_skip.tolist() == [True, False, True, False]
    level = type("L", (), {"alpha": torch.tensor(0.6), "index": 1, "num_steps": 5})()
    assert torch.equal(ag.needs_uncond(level, 4), ~expected_skip)
    # next step: truncated rows return pred_cond exactly, even if the caller passed a different uncond
    step2 = Step(x, torch.tensor(1), torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64), 1, 5, c, u,
                 uncond_mask=~expected_skip)
    out2 = ag.combine(step2).denoise
    assert torch.equal(out2[expected_skip], c[expected_skip])
    assert torch.equal(out2[~expected_skip], (u + 4.0 * (c - u))[~expected_skip])


def test_ag_default_compares_x0_estimates(gen):
    x, c = torch.randn(6, 8, generator=gen, dtype=F64), torch.randn(6, 8, generator=gen, dtype=F64)
    u = c + torch.linspace(0.05, 2.0, 6, dtype=F64)[:, None] * torch.randn(6, 8, generator=gen, dtype=F64)
    alpha, sigma = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    ag = AdaptiveGuidance(2.0, threshold=0.9)
    ag.combine(Step(x, torch.tensor(1), alpha, sigma, 0, 5, c, u))
    reference = ag_cosine((x - sigma * c) / alpha, (x - sigma * u) / alpha)
    assert torch.allclose(ag.cosines[0], reference.double(), atol=1e-12)
    assert torch.equal(ag.truncated, reference > 0.9) and 0 < int(ag.truncated.sum()) < 6


def test_ag_trigger_is_monotone(gen):
    """Cosines going up and down again: once a row is truncated it never asks for the uncond branch again."""
    ag = AdaptiveGuidance(scale=2.0, threshold=0.9)
    batch, steps = 6, 12
    masks = []
    for i in range(steps):
        level = type("L", (), {"alpha": torch.tensor(1.0), "index": i, "num_steps": steps})()
        mask = ag.needs_uncond(level, batch)
        masks.append(mask)
        c = torch.randn(batch, 16, generator=gen, dtype=F64)
        spread = torch.rand(batch, 1, generator=gen, dtype=F64) * 3  # cosine random in ~(0.3, 1)
        u = c + spread * torch.randn(batch, 16, generator=gen, dtype=F64)
        u = torch.where(mask[:, None], u, c)
        ag.combine(Step(c, torch.tensor(1), torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64), i, steps,
                        c, u, uncond_mask=mask))
    masks = torch.stack(masks)
    assert (masks[1:] <= masks[:-1]).all()                       # never switches back
    assert 0 < masks[-1].sum() < batch or masks[-1].sum() == 0    # per-sample decisions happened
    first_off = torch.where(masks.all(0), steps, (~masks).int().argmax(0))
    assert torch.equal(first_off, ag.truncated_at.clamp(max=steps))


def test_ag_rows_and_trajectory_vs_cfg_through_denoiser():
    """Exact GMM model: AG's trajectory equals CFG's until each sample's trigger, and its rows are
    sum_i 2 k_i + (N - k_i) with k_i from CFG's own cosines (independent oracle)."""
    gmm, plan, labels, null, x = gmm_problem(batch=6, steps=10)
    scale, threshold = 3.0, 0.999
    rec = Recorder(scale)
    cfg_den = GuidedDenoiser(gmm.eps, rec, labels, null)
    cfg_out = sample_ddim(cfg_den, x.clone(), plan, disable=True)
    cos = torch.stack(rec.cos)                                  # (N, B)
    ag = AdaptiveGuidance(scale, threshold, space="eps")
    ag_den = GuidedDenoiser(gmm.eps, ag, labels, null)
    ag_out = sample_ddim(ag_den, x.clone(), plan, disable=True)
    passed = cos > threshold
    k = torch.where(passed.any(0), passed.int().argmax(0) + 1, plan.num_steps)  # CFG steps per sample
    assert torch.equal(ag.truncated_at, k)
    assert cfg_den.rows == 2 * 6 * 10
    assert ag_den.rows == int((2 * k + (plan.num_steps - k)).sum()) < cfg_den.rows
    never = k == plan.num_steps
    assert torch.equal(ag_out[never], cfg_out[never])
    # threshold 1 never truncates: identical to CFG, same rows
    full = GuidedDenoiser(gmm.eps, AdaptiveGuidance(scale, 1.0, space="eps"), labels, null)
    assert torch.equal(sample_ddim(full, x.clone(), plan, disable=True), cfg_out) and full.rows == cfg_den.rows


def test_ag_saves_rows_through_apply():
    pipe = class_pipe()
    kw = dict(class_labels=[1, 2, 3, 4], num_inference_steps=6, output_type="pt")
    rows, handle = count_rows(pipe.unet)
    with guidance.apply(pipe, CFG(3.0)) as cfg_stats:
        cfg_img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    cfg_rows, rows[:] = sum(rows), []
    ag = AdaptiveGuidance(3.0, threshold=0.9995, space="x0")
    with guidance.apply(pipe, ag) as ag_stats:
        ag_img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    handle.remove()
    assert cfg_stats.rows == cfg_rows == 2 * 4 * 6
    assert ag_stats.rows == sum(rows) < cfg_rows                  # the network really saw fewer rows
    assert ag_stats.rows == int((2 * ag.truncated_at + (6 - ag.truncated_at)).sum())
    assert (ag.truncated_at < 6).any() and ag_img.shape == cfg_img.shape and torch.isfinite(ag_img).all()


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan"), float("inf")])
def test_ag_rejects_thresholds_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        AdaptiveGuidance(2.0, threshold=bad)


def test_ag_by_name():
    guide = guidance.build_guide("ag", 2.0, threshold=0.95, space="x0")
    assert isinstance(guide, AdaptiveGuidance) and (guide.scale, guide.threshold, guide.space) == (2.0, 0.95, "x0")
    with pytest.raises(ValueError, match="threshold"):
        guidance.build_guide("ag", 2.0, threshold=1.5)


def test_ag_bad_input():
    with pytest.raises(TypeError):
        AdaptiveGuidance(2.0, threshold="0.9")
    with pytest.raises(ValueError, match="space"):
        AdaptiveGuidance(2.0, space="v")
    ag = AdaptiveGuidance(2.0)
    step = random_step(torch.Generator().manual_seed(0))
    step.pred_uncond = torch.full_like(step.pred_cond, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        ag.combine(step)


# ---------------------------------------------------------------------------------------------- LinearAG
def linear_histories(beta, steps=6, n=5, gen=None, use_x=False, bias=False):
    """eps_u generated by a known recursion eps_u(i) = b0 c(i) + b1 c(i-1) + b2 u(i-1) [+ b3 x(i)] [+ b4]."""
    c = torch.randn(steps, n, 3, 4, generator=gen, dtype=F64)
    x = torch.randn(steps, n, 3, 4, generator=gen, dtype=F64)
    u = torch.randn(steps, n, 3, 4, generator=gen, dtype=F64)
    for i in range(1, steps):
        u[i] = beta[i, 0] * c[i] + beta[i, 1] * c[i - 1] + beta[i, 2] * u[i - 1]
        if use_x:
            u[i] += beta[i, 3] * x[i]
        if bias:
            u[i] += beta[i, -1]
    return c, u, x


@pytest.mark.parametrize("use_x,bias", [(False, False), (True, True)])
def test_ols_recovers_known_coefficients(gen, use_x, bias):
    size = 3 + use_x + bias
    beta = torch.randn(6, size, generator=gen, dtype=F64)
    c, u, x = linear_histories(beta, gen=gen, use_x=use_x, bias=bias)
    fitted = fit_coefficients(c, u, x if use_x else None, history=1, bias=bias)
    assert torch.isnan(fitted[0]).all()
    assert torch.allclose(fitted[1:], beta[1:], atol=1e-10)
    guide = LinearAG(2.0, use_x=use_x, bias=bias)
    assert torch.allclose(guide.fit(c, u, x)[1:], beta[1:], atol=1e-10)


def test_linear_ag_replaced_step_matches_reference(gen):
    """At a replaced step: eps_u_hat = sum_j beta_j h_j from the run's own history, then CFG with it."""
    beta = torch.randn(4, 3, generator=gen, dtype=F64)
    guide = LinearAG(5.0, replace="all", history=1)
    guide.coefficients = beta
    guide.reset()
    s0 = random_step(gen, index=0, num_steps=4)
    guide.combine(s0)
    s1 = random_step(gen, index=1, num_steps=4)
    out = guide.combine(s1).denoise
    u_hat = beta[1, 0] * s1.pred_cond + beta[1, 1] * s0.pred_cond + beta[1, 2] * s0.pred_uncond
    assert torch.allclose(out, u_hat + 5.0 * (s1.pred_cond - u_hat), atol=1e-12)


def test_linear_ag_calibrate_fit_sample_saves_rows():
    gmm, plan, labels, null, x = gmm_problem(batch=6, steps=10)
    guide = LinearAG(3.0, replace="alternate")
    den = GuidedDenoiser(gmm.eps, guide, labels, null)
    with guide.calibration():
        for seed in range(3):
            sample_ddim(den, torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=F64),
                        plan, disable=True)
    assert den.rows == 3 * 2 * 6 * 10                              # calibration runs are full CFG
    beta = guide.fit()
    assert beta.shape == (10, 3) and torch.isfinite(beta[1:]).all()
    replaced = [i for i in range(10) if guide.replaced(i, 10)]
    assert replaced == [2, 4]                                      # alternate steps of the first half
    # held-out CFG trajectory: the one-step estimate of eps_u is much closer to eps_u than eps_c is
    cfg = Recorder(3.0)
    sample_ddim(GuidedDenoiser(gmm.eps, cfg, labels, null), x.clone(), plan, disable=True)
    c, u = torch.stack(cfg.eps_c), torch.stack(cfg.eps_u)
    for i in replaced:
        est = beta[i, 0] * c[i] + beta[i, 1] * c[i - 1] + beta[i, 2] * u[i - 1]
        assert (est - u[i]).norm() < (c[i] - u[i]).norm()
    den.rows = 0
    out = sample_ddim(den, x.clone(), plan, disable=True)
    assert den.rows == 2 * 6 * 10 - 6 * len(replaced)
    assert torch.isfinite(out).all()
    # with AG's truncation afterwards: cheaper than AG alone with the same threshold
    ag = AdaptiveGuidance(3.0, 0.99, space="x0")
    ag_den = GuidedDenoiser(gmm.eps, ag, labels, null)
    sample_ddim(ag_den, x.clone(), plan, disable=True)
    both = LinearAG(3.0, threshold=0.99, space="x0")
    both.coefficients = beta
    both_den = GuidedDenoiser(gmm.eps, both, labels, null)
    sample_ddim(both_den, x.clone(), plan, disable=True)
    assert both_den.rows < ag_den.rows < 2 * 6 * 10
    # the inner AG's cosines keep one row per step (row i = step i): NaN at the replaced steps
    cosines = both.adaptive.cosines
    assert cosines.shape == (10, 6)
    assert torch.isnan(cosines[replaced]).all()
    assert torch.equal(cosines[:2], ag.cosines[:2])                  # same trajectory before the first replaced step
    measured = [i for i in range(10) if i not in replaced]
    truncated_at = both.adaptive.truncated_at
    for i in measured:                                               # measured exactly where not yet truncated
        assert torch.equal(torch.isfinite(cosines[i]), truncated_at > i)


def test_linear_ag_through_apply_saves_rows():
    pipe = class_pipe()
    kw = dict(class_labels=[1, 2], num_inference_steps=6, output_type="pt")
    guide = LinearAG(2.0)
    rows, handle = count_rows(pipe.unet)
    with guidance.apply(pipe, guide) as stats:
        with guide.calibration():
            pipe(generator=torch.Generator().manual_seed(1), **kw)
        guide.fit()
        calibration_rows = stats.rows
        img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    handle.remove()
    assert calibration_rows == 2 * 2 * 6
    assert stats.rows - calibration_rows == 2 * 2 * 6 - 2 == sum(rows) - calibration_rows  # step 2 replaced
    assert torch.isfinite(img).all()


def test_linear_ag_bad_input():
    gmm, plan, labels, null, x = gmm_problem(batch=2, steps=4)
    guide = LinearAG(2.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        sample_ddim(GuidedDenoiser(gmm.eps, guide, labels, null), x, plan, disable=True)
    with pytest.raises(ValueError, match="nothing recorded"):
        guide.fit()
    guide.coefficients = torch.zeros(7, 3, dtype=F64)
    with pytest.raises(ValueError, match="fitted for 7 steps"):
        sample_ddim(GuidedDenoiser(gmm.eps, guide, labels, null), x, plan, disable=True)
    with pytest.raises(ValueError, match="history"):
        LinearAG(2.0, history=0)
    with pytest.raises(ValueError, match=">= history"):
        LinearAG(2.0, replace=[0, 2])
    with pytest.raises(ValueError, match="replace"):
        LinearAG(2.0, replace="odd")
    with pytest.raises(ValueError, match="non-finite"):
        fit_coefficients(torch.full((3, 2, 4), float("nan")), torch.zeros(3, 2, 4))
