"""The media builds (AnimateDiff, audio, Kandinsky, DeepFloyd IF): native CFG reproduced bit for bit under apply."""

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

import tiny_zoo_media as builds
from diffguide import guidance
from diffguide.guidance.families import family_of
from zoo_harness import assert_build_reproduces_native, assert_native_reproduced, run


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


@pytest.mark.parametrize("name", sorted(builds.LEARNED_VARIANCE))
def test_learned_variance_channels_are_the_native_ones(name):
    """With a scheduler that steps on the learned variance (DDPM ``learned_range``), the variance channels the
    pipeline hands ``scheduler.step`` under apply (a diffguide guide or a diffusers guider) must be the native ones
    (the conditional rows'), or the latents differ."""
    make, call = builds.BUILDS[name]
    pipe = make()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    fixed, _ = run(pipe, call(3.0))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range")
    learned, _ = run(pipe, call(3.0))
    assert not torch.equal(fixed, learned)  # the variance channels reach the step
    assert_native_reproduced(pipe, call)
    from diffusers.guiders import ClassifierFreeGuidance  # diffusers' guider path hands on the same channels

    assert torch.equal(run(pipe, call(3.0), ClassifierFreeGuidance(guidance_scale=3.0))[0], learned)


class _Probe(guidance.CFG):
    """CFG that records the level it is handed at every step."""

    def combine(self, step):
        self.sigmas.append(float(step.sigma))
        return super().combine(step)


@pytest.mark.parametrize("name", sorted(builds.STRENGTH))
def test_start_level_is_where_the_scheduler_steps_from(name):
    """strength < 1 on a scheduler that keeps one sigma per step (Euler): a guide is handed the VP level of the
    sigma the scheduler steps from, the k-th of its schedule (k > 0), whether the pipeline calls set_begin_index
    (``Family.start`` "begin_index") or only cuts its timesteps ("timestep")."""
    make, call = builds.BUILDS[name]
    pipe = make()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    first_timesteps = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, *a, **k: (first_timesteps.append(t), step(out, t, *a, **k))[1]
    probe = _Probe(3.0)
    probe.sigmas = []
    run(pipe, call(3.0), probe)
    sched = pipe.scheduler
    assert (getattr(sched, "begin_index", None) is None) == (family_of(pipe).start == "timestep")
    first = int((sched.timesteps == first_timesteps[0]).nonzero()[0])
    ve = sched.sigmas[first].double()
    assert first > 0 and len(probe.sigmas) == len(first_timesteps)
    assert probe.sigmas[0] == pytest.approx(float(ve / (1 + ve**2).sqrt()), rel=1e-6)


class _CondProbe(guidance.CFG):
    """CFG that records the condition it is handed (``step.cond``) at every step."""

    def combine(self, step):
        self.conds.append(step.cond)
        return super().combine(step)


@pytest.mark.parametrize("name", ["IFSuperResolutionPipeline", "AudioLDMPipeline"])
def test_step_cond_is_the_prompt_condition(name):
    """``step.cond`` is the prompt's embedding: IF's super-resolution stage passes its noise level as
    ``class_labels`` (not the condition), AudioLDM its projected text embedding (the condition)."""
    make, call = builds.BUILDS[name]
    pipe = make()
    probe = _CondProbe(3.0)
    probe.conds = []
    kwargs = call(3.0)
    run(pipe, kwargs, probe)
    assert len(probe.conds) == kwargs["num_inference_steps"]
    for cond in probe.conds:
        assert torch.equal(cond, kwargs["prompt_embeds"])


def test_free_init_passes_count_their_steps_from_their_own_start():
    """AnimateDiff's FreeInit runs the schedule again within one call, each pass set anew by
    ``scheduler.set_timesteps``: a guide is handed the level the scheduler steps from at every step of every pass,
    and native CFG stays bit-identical. (Its coarse-to-fine option and video-to-video FreeInit fail natively on
    builds this small: the first pass keeps no step.)"""
    make, call = builds.BUILDS["AnimateDiffControlNetPipeline"]
    pipe = make()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.enable_free_init(num_iters=2)
    assert_native_reproduced(pipe, call)
    sched, stepped = pipe.scheduler, []
    step = sched.step

    def recording_step(out, t, *args, **kwargs):
        index = sched.step_index if sched.step_index is not None else sched.index_for_timestep(t)
        ve = sched.sigmas[index].double()
        stepped.append(float(ve / (1 + ve**2).sqrt()))
        return step(out, t, *args, **kwargs)

    sched.step = recording_step
    probe = _Probe(3.0)
    probe.sigmas = []
    run(pipe, call(3.0), probe)
    assert len(probe.sigmas) == len(stepped) == 4 and stepped[:2] == stepped[2:]  # two passes of 2 steps
    assert probe.sigmas == pytest.approx(stepped, rel=1e-6)


class _LatentProbe(guidance.CFG):
    """CFG that records the latent, level and predictions it is handed at every step."""

    def combine(self, step):
        self.seen.append((step.x.clone(), float(step.alpha), float(step.sigma), step.pred_cond.shape))
        return super().combine(step)


@pytest.mark.parametrize("name", ["KandinskyInpaintPipeline", "KandinskyV22InpaintPipeline",
                                  "IFSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"])
def test_guides_see_the_stepped_latent_beside_conditioning_and_variance_channels(name):
    """Mask / masked-image (Kandinsky) or upscaled-image (IF) channels go into the network, learned-variance channels
    come out of it: a guide is handed the latent the scheduler steps (its channels only, its values) and its level
    (from ``alphas_cumprod`` at the step's timestep), with predictions of the latent's shape."""
    make, call = builds.BUILDS[name]
    pipe = make()
    sched, stepped = pipe.scheduler, []
    step = sched.step

    def recording_step(out, t, sample, *args, **kwargs):
        abar = sched.alphas_cumprod[int(t)].double()
        stepped.append((sample.clone(), float(abar.sqrt()), float((1 - abar).sqrt())))
        return step(out, t, sample, *args, **kwargs)

    sched.step = recording_step
    probe = _LatentProbe(3.0)
    probe.seen = []
    run(pipe, call(3.0), probe)
    unet_in, unet_out = pipe.unet.config.in_channels, pipe.unet.config.out_channels
    assert len(probe.seen) == len(stepped) >= 2
    for (x, alpha, sigma, pred_shape), (sample, alpha_ref, sigma_ref) in zip(probe.seen, stepped):
        assert sample.shape[1] < unet_in and 2 * sample.shape[1] == unet_out
        assert x.shape == sample.shape == pred_shape and torch.equal(x, sample)
        assert (alpha, sigma) == pytest.approx((alpha_ref, sigma_ref), rel=1e-6)


@pytest.mark.parametrize("name", ["AnimateDiffControlNetPipeline", "AnimateDiffVideoToVideoPipeline"])
def test_free_noise_context_windows_reproduce_native_cfg(name):
    """AnimateDiff's FreeNoise runs the motion modules over sliding frame windows inside the UNet call and encodes
    the prompts per frame (it takes prompts, not embeddings): still one ``[u; c]`` call per step, reproduced."""
    make, call = builds.BUILDS[name]
    pipe = make()
    pipe.enable_free_noise(context_length=2, context_stride=1)

    def prompted(s):
        kwargs = {k: v for k, v in call(s).items() if k not in ("prompt_embeds", "negative_prompt_embeds")}
        return dict(kwargs, prompt="a cat", negative_prompt="a dog")

    assert_native_reproduced(pipe, prompted)


@pytest.mark.parametrize("name", ["AnimateDiffSDXLPipeline", "AnimateDiffVideoToVideoControlNetPipeline",
                                  "IFSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"])
def test_diffusers_cfg_guider_reproduces_native_cfg(name):
    """diffusers' ClassifierFreeGuidance through apply pairs the per-frame repeated arguments (AnimateDiff's prompt
    embeddings and ControlNet residuals: ``frames`` rows per latent row) like the per-row ones, and combines IF
    super-resolution's 3 noise channels only, beside its 3 upscaled-image input channels, handing on the
    conditional rows' variance channels: bit-identical to native CFG, same network rows."""
    from diffusers.guiders import ClassifierFreeGuidance

    make, call = builds.BUILDS[name]
    pipe = make()
    native, native_rows = run(pipe, call(3.0))
    guided, rows = run(pipe, call(3.0), ClassifierFreeGuidance(guidance_scale=3.0))
    assert rows == native_rows and torch.equal(guided, native)


def test_pag_guider_through_apply_equals_animatediff_pag():
    """What the refusal of pag_scale > 0 points to, on AnimateDiff: diffusers' PerturbedAttentionGuidance through
    apply at pag_scale=0, skipping the attention scores where the pipeline's ``pag_applied_layers=["mid"]`` puts its
    identity processors (the mid block's spatial transformer and its motion module), equals the pipeline's own PAG
    (one [u; c; c-perturbed] batch) to float32 rounding."""
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig

    make, call = builds.BUILDS["AnimateDiffPAGPipeline"]
    pipe = make()
    skips = [LayerSkipConfig(indices=[0], fqn=f"mid_block.{blocks}.0.transformer_blocks", skip_attention=False,
                             skip_attention_scores=True, skip_ff=False) for blocks in ("attentions", "motion_modules")]
    # diffusers' guider perturbs steps int(start N) < i (strict): start -1 includes step 0, as the pipeline does
    pag = PerturbedAttentionGuidance(guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=-1.0,
                                     perturbed_guidance_stop=1.0, perturbed_guidance_config=skips)
    hooked, _ = run(pipe, call(3.0), pag)
    plain, _ = run(pipe, call(3.0))
    reference, _ = run(pipe, dict(call(3.0), pag_scale=2.0))
    assert (reference - hooked).abs().max() <= 1e-5  # other batch shapes than the pipeline's: rounding (2e-6)
    assert (reference - plain).abs().max() > 0.05
    with guidance.apply(pipe, guidance.CFG(3.0)):
        with pytest.raises(ValueError, match="pag_scale must be 0.0 .*PerturbedAttentionGuidance"):
            pipe(**{k: v for k, v in call(3.0).items() if k != "pag_scale"})  # its default is 3.0
