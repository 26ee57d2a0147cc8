"""Feynman-Kac correctors and the SMC sampler: weight formulas, resampling, and exact GMM targets.

Statistical tests run ``G`` independent particle systems in one batch (``num_groups``) and take the Monte-Carlo
standard error from the spread of the ``G`` group estimates (honest for SMC, whose genealogy makes the final
ESS optimistic). A check passes when ``|estimate - truth| <= 4 SE + bias``, ``bias`` being the stated
time-discretisation tolerance: 2% of the target's standard deviation for means, 5% of the variance scale for
(co)variances, 0.01 for mode masses (``benchmarks/bench_fkc.py`` measures the bias of these configurations with
10^5 particles: every statistic inside its tolerance). Each test also runs the unweighted sampler (same drift
and noise, no weights) and requires it to fail the same check.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffguide.guidance import CFG, FKCAnneal, FKCCFG, FKCDenoiser, FKCProduct, GuidedDenoiser
from diffguide.samplers import (Level, Plan, SMCResult, Weighted, effective_sample_size, multinomial_resample,
                      plan_from_scheduler, sample_smc, stratified_resample, systematic_resample)
from diffguide.tasks.gmm import ClassConditionalGMM, GaussianMixture, annealed_grid, geometric_grid

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def mixture_1d(weights, means, variances) -> GaussianMixture:
    return GaussianMixture.isotropic(t64(weights), t64(means)[:, None], t64(variances))


SCHEDULER = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)  # DDPM linear betas: VP with beta 0.1..20


def ddim_plan(num_steps: int) -> Plan:
    return plan_from_scheduler(SCHEDULER, num_steps)


def mixture_eps(mixture: GaussianMixture):
    """Exact ``E[eps | x_t]`` of an isotropic mixture at an integer timestep of ``SCHEDULER``: a few-line
    reference, ``eps = sigma sum_k r_k (x - alpha mu_k) / S_k`` with ``S_k = alpha^2 v_k + sigma^2``, laid out
    component-major so that 10^4 particles cost well under a millisecond."""
    log_w, mu, var = mixture.weights.log()[:, None], mixture.means[:, None, :], mixture.covs[:, 0, 0][:, None]
    alphas_cumprod, dim = SCHEDULER.alphas_cumprod.to(F64), mixture.dim

    def eps(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        alpha_bar = alphas_cumprod[int(t)]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        var_t = alpha**2 * var + sigma**2                                  # (K, 1)
        diff = x[None] - alpha * mu                                         # (K, N, d)
        logits = log_w - 0.5 * dim * var_t.log() - 0.5 * diff.pow(2).sum(-1) / var_t
        resp = torch.softmax(logits, dim=0)
        return sigma * (resp[..., None] * diff / var_t[..., None]).sum(0)

    return eps


def mixture_velocity(mixture: GaussianMixture):
    """Exact flow velocity ``E[eps - x0 | x_s]`` of an isotropic mixture at flow time ``t = 1000 s`` on the flow state
    ``x_s = (1 - s) x0 + s eps``: ``v = (x - D) / s`` with ``D = sum_k r_k m_k``,
    ``m_k = mu_k + a v_k (x - a mu_k) / S_k``
    (a = 1 - s, b = s, ``S_k = a^2 v_k + b^2``); a few-line reference, finite at pure noise (a = 0)."""
    log_w, mu, var = mixture.weights.log()[:, None], mixture.means[:, None, :], mixture.covs[:, 0, 0][:, None]
    dim = mixture.dim

    def velocity(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        s = float(t.flatten()[0]) / 1000
        a = 1 - s
        var_t = a**2 * var + s**2                                          # (K, 1)
        diff = x[None] - a * mu                                             # (K, N, d)
        resp = torch.softmax(log_w - 0.5 * dim * var_t.log() - 0.5 * diff.pow(2).sum(-1) / var_t, dim=0)
        x0 = (resp[..., None] * (mu + a * var[..., None] * diff / var_t[..., None])).sum(0)
        return (x - x0) / s

    return velocity


FLOW_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0)


def target_setup(schedule: str, mixtures, steps: int, exponent_sum: float):
    """(model functions, prediction type, plan) for a VP (DDPM betas) or flow (FlowMatchEuler, shift 3) run. A flow
    plan starts at pure noise, where only targets with exponents summing to 1 have a finite drift: the others start
    one level later (VE sigma ~ 1e3 there, closer to pure noise than the VP plan's first level, 157)."""
    if schedule == "vp":
        return [mixture_eps(m) for m in mixtures], "epsilon", ddim_plan(steps)
    plan = plan_from_scheduler(FLOW_SCHEDULER, steps)
    fns = [mixture_velocity(m) for m in mixtures]
    return fns, "flow_prediction", plan if exponent_sum == 1 else plan.starting_at(1)


def level_of(timestep: int) -> Level:
    alpha_bar = SCHEDULER.alphas_cumprod.to(F64)[timestep]
    return Level(t=torch.tensor(timestep), alpha=alpha_bar.sqrt(), sigma=(1 - alpha_bar).sqrt(), index=0, num_steps=1)


def unweighted(den: FKCDenoiser):
    """The same drift (and starting law) without weights: the sampler FKC corrects."""
    def model(x, level):
        return den(x, level).x0
    model.init_noise_sigma = den.init_noise_sigma
    return model


def group_estimates(result: SMCResult, stats) -> torch.Tensor:
    """Weighted estimates of ``stats(x, w) -> (S,)`` per particle system: (G, S)."""
    groups, n = result.log_weights.shape
    x = result.x.reshape(groups, n, -1)
    return torch.stack([stats(x[g], result.weights[g]) for g in range(groups)])


def moments_and_masses(mixture: GaussianMixture):
    """``(x, w) -> [mean, covariance entries, mode masses under mixture's responsibilities]``."""
    def stats(x, w):
        mean = w @ x
        centred = x - mean
        cov = (w[:, None] * centred).T @ centred
        return torch.cat([mean, cov.flatten(), w @ mixture.responsibilities(x)])
    return stats


def tolerance_scale(mean: torch.Tensor, cov: torch.Tensor, num_masses: int) -> torch.Tensor:
    """Stated discretisation-bias tolerance per statistic (module docstring)."""
    std = cov.diagonal().sqrt()
    return torch.cat([0.02 * std, 0.05 * (std[:, None] * std[None, :]).flatten(), torch.full((num_masses,), 0.01)])


def check(estimates: torch.Tensor, truth: torch.Tensor, bias: torch.Tensor, tol: torch.Tensor | None = None):
    """(passed, tolerance, report): ``|mean_g - truth| <= 4 SE + bias`` for every statistic."""
    value = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    tol = 4 * se + bias if tol is None else tol
    err = (value - truth).abs()
    report = "\n".join(f"  {float(v):+.4f} vs {float(t):+.4f}: |err| {float(e):.4f} (tol {float(b):.4f})"
                       for v, t, e, b in zip(value, truth, err, tol))
    return bool((err <= tol).all()), tol, report


def run_pair(den: FKCDenoiser, shape, plan: Plan, groups: int, noise: float, seed: int = 0):
    out = []
    for model in (den, unweighted(den)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*shape, generator=g, dtype=F64)
        out.append(sample_smc(model, x, plan, num_groups=groups, noise=noise, generator=g, disable=True))
    return out


def assert_fkc_exact_and_naive_fails(fkc: SMCResult, naive: SMCResult, stats, truth, bias):
    ok, tol, report = check(group_estimates(fkc, stats), truth, bias)
    assert ok, "FKC samples miss the exact target:\n" + report
    naive_ok, _, naive_report = check(group_estimates(naive, stats), truth, bias, tol)
    assert not naive_ok, "the unweighted sampler passes too (no power):\n" + naive_report
    assert naive.num_resampling_events == 0 and fkc.num_resampling_events > 0


# ------------------------------------------------------------------------------------------------------------
# the weight increments (FK-2) against independent few-line references
# ------------------------------------------------------------------------------------------------------------
def random_eps(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 4, 4, generator=g, dtype=F64) for _ in range(n)]


def sq(v):
    return v.flatten(1).pow(2).sum(1)


def test_weight_rates_match_special_cases():
    sigma = 0.37
    eps_c, eps_u = random_eps(2)
    eps_pi, rate = FKCCFG(2.5).combine([eps_c, eps_u], sigma)
    torch.testing.assert_close(eps_pi, eps_u + 2.5 * (eps_c - eps_u))
    torch.testing.assert_close(rate, 2.5 * 1.5 / 2 * sq(eps_c - eps_u) / sigma**2)

    (eps,) = random_eps(1, seed=1)
    eps_pi, rate = FKCAnneal(3.0).combine([eps], sigma)
    torch.testing.assert_close(eps_pi, 3.0 * eps)
    torch.testing.assert_close(rate, 3.0 * 2.0 / 2 * sq(eps) / sigma**2)

    eps_1, eps_2 = random_eps(2, seed=2)
    eps_pi, rate = FKCProduct().combine([eps_1, eps_2], sigma)
    torch.testing.assert_close(eps_pi, eps_1 + eps_2)
    torch.testing.assert_close(rate, (eps_1 * eps_2).flatten(1).sum(1) / sigma**2)  # <s_1, s_2>


def test_weight_rate_general_exponents_in_score_units():
    sigma = torch.tensor(0.8, dtype=F64)
    betas = (0.5, 2.0, 1.5)
    eps = random_eps(3, seed=3)
    scores = [-e / sigma for e in eps]
    s_pi = sum(b * s for b, s in zip(betas, scores))
    expected = 0.5 * (sq(s_pi) - sum(b * sq(s) for b, s in zip(betas, scores)))
    eps_pi, rate = FKCProduct(betas).combine(eps, sigma)
    torch.testing.assert_close(rate, expected)
    torch.testing.assert_close(-eps_pi / sigma, s_pi)


def test_cfg_rate_keeps_precision_in_float32():
    g = torch.Generator().manual_seed(4)
    eps_u = 30 * torch.randn(2, 4, 64, 64, generator=g)             # ||eps||^2 ~ 1.5e7
    eps_c = eps_u + 1e-3 * torch.randn(2, 4, 64, 64, generator=g)     # ||eps_c - eps_u||^2 ~ 0.016
    _, rate = FKCCFG(3.0).combine([eps_c, eps_u], 1.0)
    expected = 3.0 * sq((eps_c - eps_u).double())
    torch.testing.assert_close(rate, expected, rtol=1e-5, atol=0)


def test_cfg_drift_is_plain_cfg():
    mix_c = mixture_1d([0.2, 0.8], [-2.0, 2.0], [0.25, 0.25])
    mix_u = mixture_1d([0.5, 0.5], [-2.0, 2.0], [1.0, 1.0])

    def model(x, t, cond):  # cond 1 = conditional rows, 0 = unconditional rows
        c = cond.to(F64)[:, None]
        return c * mixture_eps(mix_c)(x, t) + (1 - c) * mixture_eps(mix_u)(x, t)

    x = torch.randn(7, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    level = level_of(400)
    ones, zeros = torch.ones(7, dtype=torch.long), torch.zeros(7, dtype=torch.long)
    fkc = FKCDenoiser(model, FKCCFG(2.0), [ones, zeros])(x, level)
    cfg = GuidedDenoiser(model, CFG(2.0), ones, zeros)(x, level)
    torch.testing.assert_close(fkc.x0, cfg.x0)


def test_denoiser_batches_conditions_of_one_model_and_converts_predictions():
    mix = mixture_1d([0.3, 0.7], [-2.0, 2.0], [0.25, 0.5])
    calls = []

    def eps_model(x, t, cond):
        calls.append(x.shape[0])
        return mixture_eps(mix)(x, t) * (1 + 0.1 * cond.to(F64)[:, None])

    def v_model(x, t, cond):  # the same network, v-parametrised: v = alpha eps - sigma x0
        alpha, sigma = level_of(int(t)).alpha, level_of(int(t)).sigma
        eps = eps_model(x, t, cond)
        return alpha * eps - sigma * (x - sigma * eps) / alpha

    x = torch.randn(6, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    level = level_of(700)
    t = level.t
    conds = [torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)]
    den = FKCDenoiser(eps_model, FKCProduct(), conds)
    out = den(x, level)
    assert calls == [12] and den.calls == 1 and den.rows == 12
    eps_1, eps_2 = eps_model(x, t, conds[0]), eps_model(x, t, conds[1])
    torch.testing.assert_close(out.log_weight_rate, (eps_1 * eps_2).sum(1) / level.sigma**2)
    torch.testing.assert_close(out.x0, (x - level.sigma * (eps_1 + eps_2)) / level.alpha)
    out_v = FKCDenoiser(v_model, FKCProduct(), conds, prediction_type="v_prediction")(x, level)
    torch.testing.assert_close(out_v.x0, out.x0)
    torch.testing.assert_close(out_v.log_weight_rate, out.log_weight_rate)
    assert den.init_noise_sigma == pytest.approx(1 / math.sqrt(2))
    assert FKCDenoiser(eps_model, FKCAnneal(4.0), conds[:1]).init_noise_sigma == pytest.approx(0.5)
    assert FKCDenoiser(eps_model, FKCCFG(7.0), conds).init_noise_sigma == 1.0


# ------------------------------------------------------------------------------------------------------------
# resampling and the effective sample size
# ------------------------------------------------------------------------------------------------------------
def random_log_weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g, dtype=F64) + 1000.0  # offset: must not overflow


def test_effective_sample_size_formula():
    log_w = random_log_weights((4, 50))
    w = torch.softmax(log_w, -1)
    torch.testing.assert_close(effective_sample_size(log_w), 1 / (w**2).sum(-1))
    assert float(effective_sample_size(torch.zeros(10))) == pytest.approx(10.0)
    degenerate = torch.full((10,), -math.inf)
    degenerate[3] = 0.0
    assert float(effective_sample_size(degenerate)) == pytest.approx(1.0)


def counts(indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=n) for row in indices.reshape(-1, n)]).to(F64)


def test_systematic_counts_within_one_of_expected():
    log_w = random_log_weights((200, 37), seed=1)
    expected = 37 * torch.softmax(log_w, -1)
    got = counts(systematic_resample(log_w, torch.Generator().manual_seed(0)), 37)
    assert float((got - expected).abs().max()) < 1 + 1e-9
    got = counts(stratified_resample(log_w, torch.Generator().manual_seed(0)), 37)
    assert float((got - expected).abs().max()) < 2 + 1e-9
    assert got.sum(-1).eq(37).all()


def test_multinomial_counts_are_unbiased():
    log_w = random_log_weights((1, 20), seed=2).expand(4000, 20)
    w = torch.softmax(log_w[0], -1)
    got = counts(multinomial_resample(log_w, torch.Generator().manual_seed(0)), 20)
    se = (20 * w * (1 - w) / 4000).sqrt()
    assert float(((got.mean(0) - 20 * w).abs() / se).max()) < 4.5  # max of 20 |z| scores
    assert float(got.var(0)[w.argmax()]) > 0.5 * float(20 * w.max() * (1 - w.max()))  # not systematic


# ------------------------------------------------------------------------------------------------------------
# the sampler's bookkeeping
# ------------------------------------------------------------------------------------------------------------
class RateModel:
    """x0 = x / alpha (no drift beyond the scale) and a log-weight rate given as a function of x."""

    def __init__(self, rate_fn):
        self.rate_fn = rate_fn

    def __call__(self, x, level):
        return Weighted(x / level.alpha, self.rate_fn(x, level))


def test_log_weights_accumulate_rate_times_beta_dt_and_clamp():
    plan = Plan(timesteps=t64([2.0]), sigmas=t64([2.0, 0.5]))
    beta_dt = math.log((1 + 2.0**2) / (1 + 0.5**2))
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    rate = torch.linspace(-1.0, 2.5, 8, dtype=F64)
    result = sample_smc(RateModel(lambda x_, lv: rate), x, plan, disable=True)
    torch.testing.assert_close(result.log_weights[0], torch.log_softmax(rate * beta_dt, 0))
    clamped = sample_smc(RateModel(lambda x_, lv: rate), x, plan, clamp=0.5, disable=True)
    inc = rate * beta_dt
    torch.testing.assert_close(clamped.log_weights[0], torch.log_softmax((inc - inc.mean()).clamp(-0.5, 0.5), 0))
    assert result.resampled.sum() == 0 and result.ess.shape == (1, 1)


def test_resampling_stays_within_groups_and_follows_threshold():
    n = 16
    plan = Plan(timesteps=t64([1e-3, 0.9e-3]), sigmas=t64([1e-3, 0.9e-3, 0.0]))
    x = torch.cat([torch.arange(n, dtype=F64), 1000 + torch.arange(n, dtype=F64)])[:, None]

    def favour_ends(x_, level):  # group 0 favours its smallest particle, group 1 its largest
        target = torch.cat([torch.zeros(n, dtype=F64), torch.full((n,), 1000.0 + n - 1)])
        return -1e9 * (x_[:, 0] / level.alpha - target).abs().clamp(max=0.5)

    result = sample_smc(RateModel(favour_ends), x, plan, num_groups=2, ess_threshold=1.0,
                        generator=torch.Generator().manual_seed(0), disable=True)
    assert result.resampled.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(result.x[:n, 0], torch.zeros(n, dtype=F64), atol=0.05, rtol=0)
    torch.testing.assert_close(result.x[n:, 0], torch.full((n,), 1000.0 + n - 1, dtype=F64), atol=0.05, rtol=0)
    never = sample_smc(RateModel(favour_ends), x, plan, num_groups=2, ess_threshold=1e-3, disable=True)
    assert not never.resampled.any() and float(never.ess[0].max()) < 1.5


def test_flow_predictions_and_the_pure_noise_level():
    """Flow velocities give the same drift and rate as the exact eps at the same VP level; at pure noise (alpha = 0)
    a CFG target has rate 0 and drift ``w x0_c + (1 - w) x0_u`` (the two means), a product (B = 2) is refused."""
    first = mixture_1d([0.3, 0.7], [-2.0, 2.0], [0.25, 0.25])
    second = mixture_1d([0.6, 0.4], [-1.0, 2.5], [0.8, 0.1])
    plan = plan_from_scheduler(FLOW_SCHEDULER, 10)
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    fns = [mixture_velocity(first), mixture_velocity(second)]
    level = Level(plan.timesteps[4], plan.alpha(4), plan.sigma_vp(4), 4, 10)
    out = FKCDenoiser(fns, FKCProduct(), [None, None], prediction_type="flow")(x, level)
    eps_1, eps_2 = first.eps(x, level.alpha, level.sigma), second.eps(x, level.alpha, level.sigma)
    # rtol 1e-6: the network reads s from its float32 timestep 1000 s (1e-7 relative off the plan's level)
    torch.testing.assert_close(out.x0, (x - level.sigma * (eps_1 + eps_2)) / level.alpha, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.log_weight_rate, (eps_1 * eps_2).sum(1) / level.sigma**2, rtol=1e-6, atol=1e-9)
    noise_level = Level(plan.timesteps[0], plan.alpha(0), plan.sigma_vp(0), 0, 10)
    assert float(noise_level.alpha) == 0.0
    cfg = FKCDenoiser(fns, FKCCFG(2.5), [None, None], prediction_type="flow")(x, noise_level)
    assert torch.equal(cfg.log_weight_rate, torch.zeros(5, dtype=F64))
    torch.testing.assert_close(cfg.x0, (2.5 * first.mean() - 1.5 * second.mean()).expand(5, 1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pure-noise.*starting_at"):
        FKCDenoiser(fns, FKCProduct(), [None, None], prediction_type="flow")(x, noise_level)
    with pytest.raises(ValueError, match="pure noise.*starting_at"):
        sample_smc(RateModel(lambda x_, lv: torch.ones(5, dtype=F64)), x, plan, disable=True)
    result = sample_smc(FKCDenoiser(fns, FKCCFG(2.5), [None, None], prediction_type="flow"), x, plan,
                        generator=torch.Generator().manual_seed(0), disable=True)
    assert torch.isfinite(result.x).all() and torch.isfinite(result.log_weights).all()


def test_select_draws_by_weight():
    log_w = torch.full((2, 5), -math.inf, dtype=F64)
    log_w[0, 3] = log_w[1, 1] = 0.0
    x = torch.arange(10, dtype=F64)[:, None, None]
    result = SMCResult(x, log_w, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert result.select(torch.Generator().manual_seed(0)).flatten().tolist() == [3.0, 6.0]


def test_nan_weights_raise_naming_the_step():
    plan = ddim_plan(6)

    def rate(x, level):
        return torch.full((x.shape[0],), math.nan if level.index == 2 else 0.1, dtype=F64)

    with pytest.raises(FloatingPointError, match="step 2"):
        sample_smc(RateModel(rate), torch.randn(4, 1, dtype=F64), plan, disable=True)


def test_bad_inputs():
    plan = ddim_plan(3)
    model = RateModel(lambda x, lv: torch.zeros(x.shape[0], dtype=F64))
    x = torch.randn(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="at least 2 particles"):
        sample_smc(model, x[:1], plan)
    with pytest.raises(ValueError, match="at least 2 particles"):
        sample_smc(model, x, plan, num_groups=4)
    with pytest.raises(ValueError, match="num_groups"):
        sample_smc(model, x, plan, num_groups=3)
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"ess_threshold must lie in \(0, 1\]"):
            sample_smc(model, x, plan, ess_threshold=bad)
    with pytest.raises(ValueError, match="resampling"):
        sample_smc(model, x, plan, resampling="residual")
    with pytest.raises(ValueError, match="noise"):
        sample_smc(model, x, plan, noise=0.0)
    with pytest.raises(ValueError, match="clamp"):
        sample_smc(model, x, plan, clamp=-1.0)
    for beta in (0.0, -2.0, math.inf):
        with pytest.raises(ValueError, match="beta"):
            FKCAnneal(beta)
    with pytest.raises(ValueError, match="at least two"):
        FKCProduct((1.0,))
    with pytest.raises(ValueError, match="exponents"):
        FKCProduct((1.0, 0.0))
    with pytest.raises(ValueError, match="scale"):
        FKCCFG(-1.0)
    with pytest.raises(ValueError, match="needs 2 conditions"):
        FKCDenoiser(lambda x, t, c: x, FKCCFG(2.0), [None])
    with pytest.raises(TypeError, match="FKC guide"):
        FKCDenoiser(lambda x, t, c: x, CFG(2.0), [None, None])


# ------------------------------------------------------------------------------------------------------------
# exact targets: FKC within Monte-Carlo error, the unweighted sampler outside
# ------------------------------------------------------------------------------------------------------------
GROUPS, PARTICLES, STEPS = 10, 2000, 500


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_annealed_mixture_matches_grid_reference(schedule):
    """``p^2`` of a mixture with unequal widths: the narrow mode gains mass (no closed form: grid)."""
    mix = mixture_1d([0.5, 0.5], [-2.0, 2.0], [0.1, 1.0])
    target = annealed_grid(mix, 2.0)
    (fn,), prediction_type, plan = target_setup(schedule, [mix], STEPS, 2.0)
    den = FKCDenoiser(fn, FKCAnneal(2.0), [None], prediction_type=prediction_type)
    fkc, naive = run_pair(den, (GROUPS * PARTICLES, 1), plan, GROUPS, noise=2.0)
    truth = torch.cat([target.mean(), target.cov().flatten(), target.mode_masses(mix)])
    assert_fkc_exact_and_naive_fails(fkc, naive, moments_and_masses(mix), truth,
                                     tolerance_scale(target.mean(), target.cov(), 2))


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_cfg_geometric_mean_matches_grid_reference(schedule):
    """``p_c^2 p_u^-1`` with the paper's SDE (noise 1): plain CFG's drift, corrected by the weights. On the flow
    plan the run starts at pure noise (rate 0 there)."""
    cond = mixture_1d([0.5, 0.5], [-2.0, 2.0], [0.1, 0.5])
    uncond = mixture_1d([0.5, 0.5], [-2.0, 2.0], [1.0, 1.0])
    target = geometric_grid(cond, uncond, 2.0)
    fns, prediction_type, plan = target_setup(schedule, [cond, uncond], STEPS, 1.0)
    den = FKCDenoiser(fns, FKCCFG(2.0), [None, None], prediction_type=prediction_type)
    fkc, naive = run_pair(den, (GROUPS * PARTICLES, 1), plan, GROUPS, noise=1.0)
    truth = torch.cat([target.mean(), target.cov().flatten(), target.mode_masses(cond)])
    assert_fkc_exact_and_naive_fails(fkc, naive, moments_and_masses(cond), truth,
                                     tolerance_scale(target.mean(), target.cov(), 2))


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_product_of_two_mixtures_matches_closed_form(schedule):
    first = mixture_1d([0.3, 0.7], [-2.0, 2.0], [0.25, 0.25])
    second = mixture_1d([0.6, 0.4], [-1.0, 2.5], [0.8, 0.1])
    target = first.product(second)
    fns, prediction_type, plan = target_setup(schedule, [first, second], STEPS, 2.0)
    den = FKCDenoiser(fns, FKCProduct(), [None, None], prediction_type=prediction_type)
    fkc, naive = run_pair(den, (GROUPS * PARTICLES, 1), plan, GROUPS, noise=2.0)
    truth = torch.cat([target.mean(), target.cov().flatten(), target.weights])
    assert_fkc_exact_and_naive_fails(fkc, naive, moments_and_masses(target), truth,
                                     tolerance_scale(target.mean(), target.cov(), target.num_components))


def test_product_of_two_classes_of_one_model_in_2d():
    """Two labels of one class-conditional GMM (one batched call per step), exact K1*K2-component truth."""
    class_0 = GaussianMixture.isotropic(t64([0.4, 0.6]), t64([[-1.5, 0.0], [1.5, 1.0]]), t64([0.3, 0.3]))
    class_1 = GaussianMixture.isotropic(t64([0.5, 0.5]), t64([[-1.0, 1.5], [1.0, -1.0]]), t64([0.5, 0.5]))
    gmm = ClassConditionalGMM([class_0, class_1], SCHEDULER.alphas_cumprod, sample_shape=(1, 2, 1))
    target = class_0.product(class_1)
    groups, particles = 10, 500
    labels = [torch.full((groups * particles,), label) for label in (0, 1)]
    den = FKCDenoiser(gmm.eps, FKCProduct(), labels)
    fkc, naive = run_pair(den, (groups * particles, 1, 2, 1), ddim_plan(250), groups, noise=2.0)
    truth = torch.cat([target.mean(), target.cov().flatten(), target.weights])
    assert_fkc_exact_and_naive_fails(fkc, naive, moments_and_masses(target), truth,
                                     tolerance_scale(target.mean(), target.cov(), target.num_components))
    assert den.calls == 2 * 250  # FKC and unweighted runs, one call per step each


# ------------------------------------------------------------------------------------------------------------
# diffusers networks through the samplers: N particles -> one image per prompt or class pair
# ------------------------------------------------------------------------------------------------------------
def test_text_to_image_pipeline_particles_to_one_image_per_prompt():
    from diffguide.samplers import diffusers_model_fn
    from tiny_pipes import tiny_sd

    pipe = tiny_sd()
    prompts, particles, steps = ["a digit seven", "the number one"], 3, 4
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", particles, True, [""] * len(prompts))
    den = FKCDenoiser(diffusers_model_fn(pipe.unet), FKCCFG(3.0), [cond, uncond])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts) * particles, 4, 8, 8, generator=g)
    result = sample_smc(den, x, plan_from_scheduler(pipe.scheduler, steps), num_groups=len(prompts),
                        ess_threshold=1.0, clamp=1.0, generator=g, disable=True)
    assert result.resampled[:-1].all() and not result.resampled[-1].any()
    assert den.calls == steps and den.rows == steps * 2 * len(prompts) * particles  # cond + uncond, one call
    latents = result.select(g)
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert images.shape == (len(prompts), 3, 16, 16) and torch.isfinite(images).all()


def test_product_of_two_classes_with_a_class_conditional_unet():
    from guide_models import class_pipe
    from diffguide.samplers import diffusers_model_fn

    pipe = class_pipe()
    particles = 4
    labels = [torch.full((particles,), 3), torch.full((particles,), 5)]
    den = FKCDenoiser(diffusers_model_fn(pipe.unet), FKCProduct(), labels)
    g = torch.Generator().manual_seed(0)
    result = sample_smc(den, torch.randn(particles, 1, 8, 8, generator=g), plan_from_scheduler(pipe.scheduler, 3),
                        generator=g, disable=True)
    assert result.x.shape == (particles, 1, 8, 8) and torch.isfinite(result.x).all()
    assert den.rows == 3 * 2 * particles and result.log_weights.dtype == F64
