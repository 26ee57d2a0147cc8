import pytest
import torch

import tiny_zoo_dit as builds
from diffguide import guidance
from diffguide.guidance.families import family_of
from zoo_harness import assert_build_reproduces_native

SCALE = 3.0


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


class SeeingCFG(guidance.CFG):
    """CFG that records the latent and the two predictions it is handed."""

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.seen = []

    def combine(self, step):
        alpha, sigma = (float(torch.as_tensor(v).flatten()[0]) for v in (step.alpha, step.sigma))
        self.seen.append((step.x.clone(), step.pred_cond.clone(), step.pred_uncond.clone(), alpha, sigma))
        return super().combine(step)


def scheduler_level(scheduler, timestep) -> tuple[float, float]:
    """``(alpha, sigma)`` of ``timestep`` read from the scheduler's own arrays: ``(1 - s, s)`` at the timestep's place
    in a flow schedule, ``(sqrt(abar_t), sqrt(1 - abar_t))`` on a diffusion one."""
    t = torch.as_tensor(timestep).flatten()[0]
    if type(scheduler).__name__.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas", False):
        s = float(scheduler.sigmas[int((scheduler.timesteps == t).nonzero()[0])])
        return 1 - s, s
    abar = float(scheduler.alphas_cumprod[int(t)])
    return abar ** 0.5, (1 - abar) ** 0.5


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_guides_see_the_stepped_latent_and_the_prediction_it_steps_on(name):
    """At every step a guide's ``x`` is the latent the scheduler steps (conditioning channels cut off), its level
    the one the scheduler steps from (img2img-like runs start part-way: ``Family.start``), and its predictions are
    in the sign the scheduler steps on: ``u + s (c - u)`` of what it saw is what gets stepped (HiDream negates the
    network output first: ``Family.output_sign``)."""
    make, call = builds.BUILDS[name]
    pipe = make()
    stepped, step = [], pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        stepped.append((model_output.clone(), sample.clone(),
                        scheduler_level(pipe.scheduler, timestep)))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    probe = SeeingCFG(SCALE)
    kwargs = dict(call(SCALE), generator=torch.Generator().manual_seed(0))
    del kwargs[family_of(pipe).scale_arg]
    with guidance.apply(pipe, probe):
        pipe(**kwargs)
    assert len(probe.seen) == len(stepped) >= 1
    # the build is no trivial one: its network tells the prompt from the negative one
    assert any(not torch.equal(cond, uncond) for _, cond, uncond, _, _ in probe.seen)
    for (x, cond, uncond, alpha, sigma), (model_output, sample, level) in zip(probe.seen, stepped):
        assert x.shape == sample.shape and torch.equal(x, sample)
        assert (alpha, sigma) == pytest.approx(level, rel=1e-6, abs=1e-7)
        torch.testing.assert_close(model_output, uncond + SCALE * (cond - uncond), rtol=1e-6, atol=1e-6)


def test_rows_along_another_dimension_follow_row_selection():
    """HiDream batches its Llama embeddings on dim 1 (``Family.batch_dims``): once AG drops the unconditional rows,
    the network's conditional-only calls get the prompt's own Llama and T5 embeddings, layer by layer."""
    import torch

    from diffguide import guidance

    make, call = builds.BUILDS["HiDreamImagePipeline"]
    pipe = make()
    kwargs = dict(call(3.0), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    del kwargs["guidance_scale"]
    seen = []
    projections = pipe.transformer.caption_projection  # Llama layers 0 and 1, then T5
    for i, layer in enumerate(projections):
        layer.register_forward_pre_hook(lambda module, args, i=i: seen.append((i, args[0].clone())))
    ag = guidance.AdaptiveGuidance(3.0, threshold=1e-6)
    with guidance.apply(pipe, ag):
        pipe(**kwargs)
    assert int(ag.truncated_at[0]) < 2  # the last step ran the conditional rows only
    last = dict(seen[-len(projections):])
    torch.testing.assert_close(last[0], kwargs["prompt_embeds_llama3"][0], rtol=0, atol=0)
    torch.testing.assert_close(last[1], kwargs["prompt_embeds_llama3"][1], rtol=0, atol=0)
    torch.testing.assert_close(last[2], kwargs["prompt_embeds_t5"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["HunyuanDiTPAGPipeline", "PixArtSigmaPAGPipeline", "SanaPAGPipeline",
                                  "StableDiffusion3PAGPipeline"])
def test_pag_pipelines_refuse_a_perturbed_branch_and_name_the_guider_that_runs_it(name):
    """With ``pag_scale > 0`` the PAG pipelines batch a third, perturbed-attention branch: refused before any
    network call, naming diffusers' PerturbedAttentionGuidance."""
    make, call = builds.BUILDS[name]
    pipe = make()
    calls = []
    network = pipe.transformer
    network.register_forward_pre_hook(lambda module, args: calls.append(1))
    kwargs = dict(call(SCALE), pag_scale=3.0, generator=torch.Generator().manual_seed(0))
    del kwargs["guidance_scale"]
    with pytest.raises(ValueError, match="pag_scale must be 0.0 under guidance.apply.*PerturbedAttentionGuidance"):
        with guidance.apply(pipe, guidance.CFG(SCALE)):
            pipe(**kwargs)
    assert not calls


def test_rectified_cfgpp_passes_run_the_network_at_the_predicted_level():
    """Rectified-CFG++'s corrector passes (conditional, then unconditional) run HiDream's network at time
    ``1000 s_hat``, ``s_hat = s + f (s' - s)`` on the scheduler's own sigmas (``flow_time="proportional"``, its time
    argument named ``timesteps``); the step's own call (its conditional row only) runs at ``1000 s``."""
    make, call = builds.BUILDS["HiDreamImagePipeline"]
    pipe = make()
    times = []
    pipe.transformer.t_embedder.register_forward_pre_hook(lambda module, args: times.append(args[0].double()))
    kwargs = dict(call(SCALE), generator=torch.Generator().manual_seed(0))
    del kwargs["guidance_scale"]
    with guidance.apply(pipe, guidance.RectifiedCFGPlusPlus(1.5, predictor_fraction=0.5)):
        pipe(**kwargs)
    sigmas = pipe.scheduler.sigmas.double()
    expected = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        s_hat = s + 0.5 * (s_next - s)
        expected += [(1, 1000 * s), (1, 1000 * s_hat), (1, 1000 * s_hat)]
    assert [len(t) for t in times] == [rows for rows, _ in expected]
    for t, (_, time) in zip(times, expected):
        torch.testing.assert_close(t, torch.full_like(t, float(time)), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("layers", [2, 3])
def test_diffusers_cfg_guider_reproduces_hidream_with_llama_rows_on_dim_1(layers):
    """diffusers' ClassifierFreeGuidance under apply joins its batches on dim 0: HiDream's Llama embeddings
    ``[layers, B, L, D]`` are handed to it rows first and back (``Family.batch_dims``), whether or not ``layers``
    happens to equal the CFG batch; the result is the native call's, bit for bit."""
    from diffusers.guiders import ClassifierFreeGuidance

    make, call = builds.BUILDS["HiDreamImagePipeline"]
    pipe = make()
    kwargs = dict(call(SCALE), prompt_embeds_llama3=torch.randn(layers, 1, 5, 16),
                  negative_prompt_embeds_llama3=torch.randn(layers, 1, 5, 16))
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    del kwargs["guidance_scale"]
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=SCALE)):
        guided = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(guided, native)
