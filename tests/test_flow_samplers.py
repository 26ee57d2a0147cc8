"""Flow-matching plans and the samplers on them, step by step against diffusers' flow schedulers.

The model is the exact velocity of a Gaussian mixture (``tasks.gmm.FlowMatchingGMM``), called by diffusers'
schedulers on their flow state and by our loops through ``GuidedDenoiser`` on the VP state (the adapter hands the
network ``x / (alpha + sigma)``). Our states are compared in flow scale, ``x_vp / (alpha + sigma)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffguide.guidance import CFG, GuidedDenoiser
from diffguide.samplers import (SAMPLERS, Plan, diffusers_model_fn, plan_from_scheduler, sample_ddim, sample_dpmpp_2m,
                                sample_euler, sample_euler_ancestral, sample_renoise, scheduler_prediction_type)
from diffguide.samplers.sampling import ancestral_sigmas
from diffguide.tasks.gmm import FlowMatchingGMM, GaussianMixture

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def t64(x):
    return torch.tensor(x, dtype=F64)


def flow_model() -> FlowMatchingGMM:
    c0 = GaussianMixture(t64([0.3, 0.5, 0.2]), t64([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]]),
                         t64([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]]))
    c1 = GaussianMixture.isotropic(t64([0.5, 0.5]), t64([[1.5, 1.5], [2.5, -2.0]]), t64([0.1, 0.2]))
    return FlowMatchingGMM([c0, c1], sample_shape=(1, 2, 1))


LABELS = torch.tensor([0, 1, 2, 0] * 4)


def flow_scale(x: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
    return x / (plan.alpha(i) + plan.sigma_vp(i))


def run_ours(sampler, plan: Plan, z: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Our loop from the pure-noise state z (VP = flow state at s = 1); states in flow scale, one per step."""
    model = flow_model()
    den = GuidedDenoiser(diffusers_model_fn(model), None, {"class_labels": LABELS}, prediction_type=plan.prediction_type)
    states: list[torch.Tensor] = []
    sampler(den, z, plan, callback=lambda d: states.append(flow_scale(d["x"], plan, d["i"] + 1)), disable=True,
            **kwargs)
    return states


def run_theirs(scheduler, z: torch.Tensor, num_steps: int | None, generator=None, **set_kwargs) -> list[torch.Tensor]:
    model = flow_model()
    scheduler.set_timesteps(num_steps, **set_kwargs)
    x, states = z, []
    for t in scheduler.timesteps:
        v = model(hidden_states=x, timestep=t.expand(len(x)), class_labels=LABELS).sample
        x = scheduler.step(v, t, x, **({"generator": generator} if generator else {})).prev_sample.to(z.dtype)
        states.append(x)
    return states


def assert_trajectories_close(ours, theirs, atol, what):
    assert len(ours) == len(theirs) > 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        gap = float((a - b).abs().max())
        assert torch.isfinite(a).all() and gap <= atol, f"{what}: step {i} differs by {gap} (atol {atol})"


def noise(seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(len(LABELS), 1, 2, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def float32_tolerance(states, num_steps) -> float:
    """diffusers' flow ``step`` computes in float32 (state and sigmas): ``num_steps * eps32 * max |state|``,
    doubled for the float32 rounding of the velocity it is handed."""
    return 2 * num_steps * EPS32 * max(max(float(s.abs().max()) for s in states), 1.0)


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, set_kwargs", [
    ({"shift": 1.0}, {}),
    ({"shift": 3.0}, {}),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, {"mu": 0.8}),  # Flux / SD3.5
])
def test_flow_match_plan_levels(config, set_kwargs):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    plan = plan_from_scheduler(scheduler, 12, **set_kwargs)
    s = scheduler.sigmas.to(F64)  # the levels diffusers itself steps through after the same set_timesteps
    assert plan.prediction_type == "flow_prediction" and torch.equal(plan.timesteps, scheduler.timesteps)
    assert float(s[0]) == 1.0 and math.isinf(plan.sigmas[0]) and float(plan.alpha(0)) == 0.0
    assert float(plan.sigma_vp(0)) == 1.0
    for i in range(len(s)):  # alpha / (alpha + sigma) = 1 - s: equal signal-to-noise ratio
        a, b = plan.alpha(i), plan.sigma_vp(i)
        assert abs(float(a / (a + b)) - (1 - float(s[i]))) < 1e-15 and abs(float(a**2 + b**2) - 1) < 1e-15


def test_flow_match_custom_sigmas_and_mu_reach_set_timesteps():
    sigmas = [1.0, 0.8, 0.5, 0.3, 0.1]
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(), None, sigmas=sigmas)
    torch.testing.assert_close(plan.sigmas[1:], t64([0.8 / 0.2, 1.0, 0.3 / 0.7, 0.1 / 0.9, 0.0]), rtol=1e-6, atol=0)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    low, high = (plan_from_scheduler(dynamic, 8, mu=mu).sigmas for mu in (0.3, 1.1))
    assert bool((high[1:-1] > low[1:-1]).all())  # a larger mu shifts every level towards noise
    with pytest.raises(ValueError, match="mu"):  # diffusers' own message, passed on
        plan_from_scheduler(dynamic, 8)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0])
def test_multistep_flow_sigmas_plan(cls, flow_shift):
    scheduler = cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=flow_shift)
    plan = plan_from_scheduler(scheduler, 10)
    s = scheduler.sigmas.to(F64)
    assert plan.prediction_type == "flow_prediction" and torch.isfinite(plan.sigmas).all()
    torch.testing.assert_close(plan.sigmas, s / (1 - s), rtol=1e-12, atol=0)


class FlowMatchNoSigmasScheduler:
    """A flow scheduler that keeps no sigmas."""

    config = {"num_train_timesteps": 1000}

    def set_timesteps(self, n, device=None):
        self.timesteps = torch.linspace(1000, 100, n)


def test_unreadable_parametrisations_are_refused_by_name():
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler.*flow_prediction.*supported"):
        plan_from_scheduler(DPMSolverMultistepScheduler(prediction_type="flow_prediction"), 5)  # VE sigmas + flow
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*epsilon"):
        plan_from_scheduler(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon"), 5)
    with pytest.raises(ValueError, match="invert_sigmas"):
        plan_from_scheduler(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 5)
    unknown = DDIMScheduler()
    unknown.register_to_config(prediction_type="trigflow")
    with pytest.raises(ValueError, match="DDIMScheduler.*trigflow"):
        scheduler_prediction_type(unknown)
    with pytest.raises(ValueError, match="FlowMatchNoSigmasScheduler.*no sigmas"):
        plan_from_scheduler(FlowMatchNoSigmasScheduler(), 5)
    with pytest.raises(ValueError, match="inf"):
        Plan(torch.arange(2), t64([2.0, math.inf, 0.0]))


# ------------------------------------------------------------------------------------------------------------
# loops against diffusers, step by step
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddim_eta0"])
@pytest.mark.parametrize("config, set_kwargs", [({"shift": 1.0}, {}), ({"shift": 3.0}, {}),
                                                ({"use_dynamic_shifting": True}, {"mu": 0.8})])
def test_euler_and_ddim_follow_flow_match_euler(sampler, config, set_kwargs):
    """FlowMatchEuler's ``x + (s' - s) v`` from pure noise; tolerance: its float32 arithmetic."""
    steps = 15
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(**config), steps, **set_kwargs)
    z = noise()
    theirs = run_theirs(FlowMatchEulerDiscreteScheduler(**config), z, steps, **set_kwargs)
    fn, kwargs = (sample_euler, {}) if sampler == "euler" else (sample_ddim, {"eta": 0.0})
    ours = run_ours(fn, plan, z, **kwargs)
    assert_trajectories_close(ours, theirs, float32_tolerance(theirs, steps), sampler)


def test_renoise_follows_flow_match_stochastic_sampling():
    """``stochastic_sampling=True`` steps ``(1 - s') x0 + s' z``: our ``sample_renoise`` (float32 throughout so that
    both draw the same normal numbers from the same generator)."""
    steps = 12
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    z = noise(dtype=torch.float32)
    theirs = run_theirs(scheduler, z, steps, generator=torch.Generator().manual_seed(7))
    ours = run_ours(sample_renoise, plan_from_scheduler(scheduler, steps), z, generator=torch.Generator().manual_seed(7))
    assert_trajectories_close(ours, theirs, 8 * float32_tolerance(theirs, steps), "renoise")
    # ... which is neither Euler-ancestral nor DDIM(eta = 1) after the first step (they keep part of eps_hat)
    ancestral = run_ours(sample_euler_ancestral, plan_from_scheduler(scheduler, steps), z,
                         generator=torch.Generator().manual_seed(7))
    assert float((ancestral[0] - theirs[0]).abs().max()) < 1e-5
    assert float((ancestral[-1] - theirs[-1]).abs().max()) > 1e-2


@pytest.mark.parametrize("flow_shift", [1.0, 3.0])
def test_dpmpp_2m_follows_dpm_solver_with_flow_sigmas(flow_shift):
    steps = 20
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=flow_shift,
                  algorithm_type="dpmsolver++", solver_order=2)
    z = noise(1)
    theirs = run_theirs(DPMSolverMultistepScheduler(**config), z, steps)
    plan = plan_from_scheduler(DPMSolverMultistepScheduler(**config), steps)
    start = z * (plan.alpha(0) + plan.sigma_vp(0))  # DPM's first flow level is s = 1 - 1/1000, not pure noise
    assert_trajectories_close(run_ours(sample_dpmpp_2m, plan, start), theirs, float32_tolerance(theirs, steps),
                              "dpmpp_2m")


def flow_ancestral_oracle(plan: Plan, z: torch.Tensor, eta: float, seed: int) -> list[torch.Tensor]:
    """k-diffusion's Euler-ancestral written in flow coordinates ``x_f = (1 - s) x0 + s eps``, ``s = S / (1 + S)``:
    ``x0 = x_f - s v``, ``eps = x_f + (1 - s) v``, ``x'_VE = x0 + down eps + up z``, ``x'_f = x'_VE / (1 + S')``."""
    model, gen = flow_model(), torch.Generator().manual_seed(seed)
    x, states = z, []
    for i in range(plan.num_steps):
        big, big_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        s = 1.0 if math.isinf(big) else big / (1 + big)
        v = model(hidden_states=x, timestep=plan.timesteps[i].expand(len(x)), class_labels=LABELS).sample
        x0, eps = x - s * v, x + (1 - s) * v
        up = 0.0 if big_next == 0 else min(big_next, eta * big_next * math.sqrt(1 - (big_next / big) ** 2))
        down = math.sqrt(big_next**2 - up**2)
        x_ve = x0 + down * eps + (up * torch.randn(x.shape, generator=gen, dtype=x.dtype) if up > 0 else 0)
        x = x_ve / (1 + big_next)
        states.append(x)
    return states


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_euler_ancestral_and_ddim_eta_on_a_flow_plan_match_the_ancestral_oracle(eta):
    """No diffusers flow scheduler takes ancestral steps; the oracle is k-diffusion's step in flow coordinates.
    DDIM(eta = 1) is the same step in VP form (float64, atol 1e-12)."""
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    z = noise(2)
    oracle = flow_ancestral_oracle(plan, z, eta, seed=3)
    ours = run_ours(sample_euler_ancestral, plan, z, eta=eta, generator=torch.Generator().manual_seed(3))
    assert_trajectories_close(ours, oracle, 1e-12, "euler_ancestral")
    if eta == 1.0:
        ddim = run_ours(sample_ddim, plan, z, eta=1.0, generator=torch.Generator().manual_seed(3))
        assert_trajectories_close(ddim, oracle, 1e-12, "ddim eta=1")
    assert ancestral_sigmas(math.inf, 2.0, eta) == (pytest.approx(2.0 * math.sqrt(1 - eta**2)), eta * 2.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_loop_takes_the_pure_noise_step_exactly(name):
    """The first step from s = 1: the exact x0 at pure noise is the prior mean, whatever x is, and each loop lands on
    ``alpha_1 x0 + sigma_1 (...)`` with finite values (no clipping of the first level: its timestep is 1000)."""
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(), 6)
    assert float(plan.timesteps[0]) == 1000.0 and math.isinf(plan.sigmas[0])
    seen = []
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name in ("ddim", "euler_ancestral", "renoise") else {}
    model = flow_model()
    den = GuidedDenoiser(diffusers_model_fn(model), None, {"class_labels": LABELS}, prediction_type="flow")
    out = SAMPLERS[name](den, noise(4), plan, callback=seen.append, disable=True, **kwargs)
    prior_means = torch.stack([model.mixture(int(c)).mean() for c in LABELS]).view(-1, 1, 2, 1)
    torch.testing.assert_close(seen[0]["x0_hat"], prior_means, rtol=0, atol=1e-12)
    assert all(torch.isfinite(d["x"]).all() for d in seen) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------
# diffusers flow transformers through the adapter
# ------------------------------------------------------------------------------------------------------------
def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4).eval()


def test_sd3_transformer_with_cfg_follows_the_pipeline_loop():
    """SD3's own loop (one batched [u; c] call, ``u + w (c - u)``, FlowMatchEuler shift 3) == sample_euler over
    GuidedDenoiser(CFG(w)) with the transformer's keyword arguments as the condition (float32 tolerance)."""
    net = tiny_sd3_transformer()
    g = torch.Generator().manual_seed(1)
    text = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g), "pooled_projections": torch.randn(2, 64, generator=g)}
    null = {k: torch.zeros_like(v) for k, v in text.items()}
    latents = torch.randn(2, 4, 8, 8, generator=g)
    w, steps = 4.0, 6
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    x, theirs = latents, []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                      encoder_hidden_states=torch.cat([null["encoder_hidden_states"], text["encoder_hidden_states"]]),
                      pooled_projections=torch.cat([null["pooled_projections"], text["pooled_projections"]])).sample
            u, c = out.chunk(2)
            x = scheduler.step(u + w * (c - u), t, x).prev_sample
            theirs.append(x)
    plan = plan_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), steps)
    den = GuidedDenoiser(diffusers_model_fn(net), CFG(w), text, null, prediction_type=plan.prediction_type)
    ours = []
    sample_euler(den, latents, plan, callback=lambda d: ours.append(flow_scale(d["x"], plan, d["i"] + 1).float()),
                 disable=True)
    assert_trajectories_close(ours, theirs, 20 * float32_tolerance(theirs, steps), "sd3 + cfg")
    assert den.calls == steps and den.rows == 4 * steps


class FluxTransformer2DModel(torch.nn.Module):
    """Records what the adapter hands a Flux-named network."""

    def forward(self, hidden_states, timestep, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        self.seen = (timestep, kwargs)
        return Transformer2DModelOutput(sample=hidden_states)


def test_flux_style_transformer_gets_timestep_over_1000_and_fixed_kwargs():
    net = FluxTransformer2DModel()
    ids = torch.zeros(16, 3)
    fn = diffusers_model_fn(net, img_ids=ids)
    fn(torch.zeros(2, 16, 64), torch.tensor(750.0), {"encoder_hidden_states": torch.zeros(2, 4, 8)})
    timestep, kwargs = net.seen
    assert torch.allclose(timestep, torch.full((2,), 0.75)) and kwargs["img_ids"] is ids
    assert kwargs["encoder_hidden_states"].shape == (2, 4, 8)
    with pytest.raises(TypeError, match="no adapter"):
        diffusers_model_fn(torch.nn.Linear(2, 2))(torch.zeros(1, 2), torch.tensor(1.0), None)


# ------------------------------------------------------------------------------------------------------------
# no autograd graph in the loops (a grad-requiring network under GuidedDenoiser)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_loops_build_no_autograd_graph(name):
    """Nothing is saved for backward during a run (without ``no_grad`` each step's linear layer saves its input,
    the graph grows with the steps), and the output has no ``grad_fn``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    assert all(p.requires_grad for p in net.parameters())
    den = GuidedDenoiser(lambda x, t, c: net(x) * (1 + c[:, None]), CFG(2.0), torch.ones(8), torch.zeros(8),
                         prediction_type="flow")
    saved = []
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name in ("ddim", "euler_ancestral", "renoise") else {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = SAMPLERS[name](den, torch.randn(8, 3), plan_from_scheduler(FlowMatchEulerDiscreteScheduler(), 5),
                             disable=True, **kwargs)
    assert out.grad_fn is None and not out.requires_grad
    assert sum(saved) == 0, f"{sum(saved)} elements saved for backward"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        net(torch.randn(8, 3)).sum()  # the check has power: the same network outside the loops saves tensors
    assert sum(saved) > 0
