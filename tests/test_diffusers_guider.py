"""diffguide guides as diffusers guiders in Modular SDXL (and the Modular SD3 core) built offline from tiny components.

Oracles: diffusers' own ``ClassifierFreeGuidance`` (bit for bit), and the same guide through ``guidance.apply`` on
the classic ``StableDiffusionXLPipeline`` with the same components. The classic pipeline runs one batched
``[uncond; cond]`` UNet call where the Modular one runs the two batches separately; that changes float32 rounding
(native CFG of the two pipelines differs by ~8e-6 on these 3-step latents, asserted below; where both run only
the conditional rows, autoguidance, they agree exactly), hence ``ATOL = 1e-4``.
"""

import warnings

import pytest
import torch
from diffusers import (ClassifierFreeGuidance, DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler, SD3Transformer2DModel)
from diffusers.modular_pipelines import BlockState
from diffusers.utils import logging as diffusers_logging

import diffguide as dg
from diffguide.samplers import diffusers_model_fn
from tiny_pipes import tiny_modular_sdxl, tiny_sdxl

ATOL = 1e-4
STEPS = 3
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


@pytest.fixture(autouse=True)
def _quiet():
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "guiders are experimental", component-spec notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    diffusers_logging.set_verbosity(level)


def pipes(scheduler: str = "ddim"):
    classic = tiny_sdxl()
    classic.scheduler = SCHEDULERS[scheduler].from_config(classic.scheduler.config)
    return classic, tiny_modular_sdxl(classic)


def inputs(steps: int = STEPS, seed: int = 0) -> dict:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return dict(prompt=["a cat", "a dog"], negative_prompt=["", "blur"], num_inference_steps=steps, latents=latents,
                height=16, width=16)


def modular(pipe, guider, steps: int = STEPS) -> torch.Tensor:
    pipe.update_components(guider=guider)
    return pipe(**inputs(steps), output="latents")


def classic_apply(pipe, guide, steps: int = STEPS, seed: int = 0):
    with dg.apply(pipe, guide) as stats:
        out = pipe(**inputs(steps, seed), output_type="latent").images
    return out, stats


def count_rows(pipe):
    """Rows the UNet really evaluates per call (a pre-hook on its first layer)."""
    rows = []
    return rows, pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_cfg_adapter_is_bit_identical_to_diffusers_cfg(scale):
    classic, pipe = pipes()
    rows, handle = count_rows(pipe)
    native = modular(pipe, ClassifierFreeGuidance(guidance_scale=scale))
    native_rows = list(rows)
    rows.clear()
    guider = dg.as_diffusers_guider(dg.CFG(scale), pipe.scheduler)
    adapted = modular(pipe, guider)
    handle.remove()
    assert torch.equal(native, adapted)
    assert rows == native_rows == [2] * STEPS * (1 if scale == 1.0 else 2)  # CFG(1) skips the uncond pass
    assert guider.stats.rows_per_step == [2 * (1 if scale == 1.0 else 2)] * STEPS
    if scale != 1.0:  # the floor of the tolerance used against the classic pipeline
        gap = (classic(**inputs(), guidance_scale=scale, output_type="latent").images - native).abs().max()
        assert 0 <= gap < ATOL / 4


def autoguidance():
    weak = tiny_sdxl(seed=1).unet
    return dg.Autoguidance(diffusers_model_fn(weak), scale=2.0)


def dynamic_cfg():
    return dg.DynamicCFG(lambda images, step: -images.flatten(1).std(1), candidates=(1.0, 3.0, 6.0))


# (guide, scale of the plain CFG it must differ from); CFG++ without its renoise term would be CFG(lam)
GUIDES = {
    "apg": (lambda: dg.APG(5.0, norm_threshold=0.5), 5.0),
    "cfgpp": (lambda: dg.CFGPlusPlus(0.6), 0.6),
    "ag-x0": (lambda: dg.AdaptiveGuidance(5.0, threshold=0.9995, space="x0"), 5.0),
    "interval-apg": (lambda: dg.GuidanceInterval(dg.APG(5.0, norm_threshold=0.5), sigma_lo=1.0), 5.0),
    "cfg-zero-star": (lambda: dg.CFGZeroStar(5.0), 5.0),
    "autoguidance": (autoguidance, 2.0),
    "dynamic-cfg": (dynamic_cfg, 6.0),
}
CASES = [(name, "ddim") for name in GUIDES] + [("apg", "euler"), ("cfgpp", "euler")]


@pytest.mark.parametrize("name,scheduler", CASES)
def test_adapter_equals_apply_on_classic_pipeline(name, scheduler):
    make, cfg_scale = GUIDES[name]
    classic, pipe = pipes(scheduler)
    guide = make()
    expected, stats = classic_apply(classic, guide)
    rows, handle = count_rows(pipe)
    guider = dg.as_diffusers_guider(guide, pipe.scheduler)
    adapted = modular(pipe, guider)
    handle.remove()
    assert (adapted - expected).abs().max() < ATOL
    if name == "autoguidance":  # conditional rows only in both pipelines: same UNet batches, no rounding gap
        assert torch.equal(adapted, expected)
    plain = modular(pipe, ClassifierFreeGuidance(guidance_scale=cfg_scale))
    assert (adapted - plain).abs().max() > 10 * ATOL  # the guide changed the result: the comparison can fail
    assert sum(rows) == guider.stats.rows == stats.rows  # no per-sample skipping here: same rows as apply
    assert "step" not in vars(pipe.scheduler)  # CFG++'s one-step wrapper is gone
    again = modular(pipe, dg.as_diffusers_guider(guide, pipe.scheduler))
    assert torch.equal(adapted, again)  # state (APG momentum, AG trigger) is reset at step 0


class CosineRecorder(dg.CFG):
    """CFG that records, per step, the cosine of the epsilon predictions AG thresholds on (few-line formula)."""

    def __init__(self, scale):
        super().__init__(scale)
        self.cosines = []

    def combine(self, step):
        eps_c, eps_u = step.eps(step.pred_cond).flatten(1).double(), step.eps(step.pred_uncond).flatten(1).double()
        self.cosines.append((eps_c * eps_u).sum(1) / (eps_c.norm(dim=1) * eps_u.norm(dim=1)))
        return super().combine(step)


def first_crossings(cosines: torch.Tensor, threshold: float) -> list[int]:
    """Each sample's first conditional-only step: one after the first step whose cosine passes ``threshold``."""
    steps = len(cosines)
    return [next((k + 1 for k in range(steps) if cosines[k, i] > threshold), steps) for i in range(cosines.shape[1])]


def test_adaptive_guidance_skips_unconditional_passes():
    classic, pipe = pipes()
    # AG runs CFG on a sample until its cosine passes the threshold, so up to that step its trajectory and cosines
    # are plain CFG's: record them, and pick a threshold (with a margin to every cosine) at which the two samples
    # stop CFG at different steps before the last, so that a step needs the unconditional rows of one sample only.
    recorder = CosineRecorder(5.0)
    classic_apply(classic, recorder, steps=4)
    cosines = torch.stack(recorder.cosines)  # (steps, samples)
    values = cosines[:-1].flatten().sort().values
    candidates = [float(lo + hi) / 2 for lo, hi in zip(values[:-1], values[1:]) if hi - lo > 2e-5]
    threshold = next(t for t in candidates if len(set(first_crossings(cosines, t))) == 2
                     and max(first_crossings(cosines, t)) < 4)
    truncated_at = first_crossings(cosines, threshold)
    guide = dg.AdaptiveGuidance(5.0, threshold=threshold, space="eps")
    expected, stats = classic_apply(classic, guide, steps=4)
    assert guide.truncated_at.tolist() == truncated_at
    rows, handle = count_rows(pipe)
    guider = dg.as_diffusers_guider(guide, pipe.scheduler)
    adapted = modular(pipe, guider, steps=4)
    handle.remove()
    assert guide.truncated_at.tolist() == truncated_at
    assert (adapted - expected).abs().max() < ATOL
    # apply evaluates each sample's unconditional row while it needs it; the protocol runs the unconditional batch
    # for both samples (all or none) while either needs it, then none
    needs_uncond = [sum(k < stop for stop in truncated_at) for k in range(4)]
    assert stats.rows_per_step == [2 + n for n in needs_uncond]
    assert guider.stats.rows_per_step == [4 if n else 2 for n in needs_uncond]
    assert rows == [2] * sum(2 if n else 1 for n in needs_uncond)  # one UNet call per batch of 2 rows
    assert guider.num_conditions == 2  # after the last step: the next call encodes its negative prompt again


def test_linear_ag_replaced_step_skips_the_unconditional_pass():
    classic, pipe = pipes()
    guide = dg.LinearAG(5.0, replace=[2])
    with guide.calibration():
        classic_apply(classic, guide, steps=4, seed=1)  # calibrated on other latents: an imperfect estimate
    guide.fit()
    expected, stats = classic_apply(classic, guide, steps=4)
    rows, handle = count_rows(pipe)
    guider = dg.as_diffusers_guider(guide, pipe.scheduler)
    adapted = modular(pipe, guider, steps=4)
    handle.remove()
    assert (adapted - expected).abs().max() < ATOL
    assert rows == [2] * 7 and guider.stats.rows_per_step == stats.rows_per_step == [4, 4, 2, 4]
    cfg = modular(pipe, ClassifierFreeGuidance(guidance_scale=5.0), steps=4)
    assert (adapted - cfg).abs().max() > 10 * ATOL  # the regression estimate was used at step 2


class HalfUncond(dg.CFG):
    """CFG whose second sample never asks for the unconditional branch (a per-sample need)."""

    def needs_uncond(self, level, batch_size):
        return torch.arange(batch_size) % 2 == 0


def test_partial_need_evaluates_all_rows_and_matches_apply():
    classic, pipe = pipes()
    expected, stats = classic_apply(classic, HalfUncond(5.0))
    guider = dg.as_diffusers_guider(HalfUncond(5.0), pipe.scheduler)
    adapted = modular(pipe, guider)
    assert (adapted - expected).abs().max() < ATOL
    assert stats.rows_per_step == [3] * STEPS and guider.stats.rows_per_step == [4] * STEPS
    assert guider.stats.uncond_rows_per_sample.tolist() == stats.uncond_rows_per_sample.tolist() == [STEPS, 0]
    cond_only = modular(pipe, ClassifierFreeGuidance(guidance_scale=1.0))
    cfg = modular(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    assert (adapted[1] - cond_only[1]).abs().max() < ATOL < (adapted[1] - cfg[1]).abs().max()
    assert (adapted[0] - cfg[0]).abs().max() < ATOL


def test_refused_guides_and_schedulers():
    scheduler = DDIMScheduler()
    gfcg = dg.GFCG(lambda images: images.flatten(1)[:, :3])
    for guide in (gfcg, dg.GuidanceInterval(gfcg, sigma_lo=1.0)):
        with pytest.raises(ValueError, match="GFCG evaluates the main network once more.*guidance.apply"):
            dg.as_diffusers_guider(guide, scheduler)
    for guide in (dg.guidance.RectifiedCFGPlusPlus(1.0), dg.guidance.NormRescale(dg.guidance.RectifiedCFGPlusPlus(1.0))):
        with pytest.raises(ValueError, match="at another noise level within the step.*guidance.apply"):
            dg.as_diffusers_guider(guide, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="already a diffusers guider"):
        dg.as_diffusers_guider(ClassifierFreeGuidance(), scheduler)
    with pytest.raises(TypeError, match="already a diffusers guider"):
        dg.as_diffusers_guider(dg.as_diffusers_guider(dg.CFG(), scheduler), scheduler)
    with pytest.raises(TypeError, match="must be a diffguide guidance.Guidance"):
        dg.as_diffusers_guider(dg.guidance.FKCCFG(2.0), scheduler)
    with pytest.raises(ValueError, match="DDPM-family one"):
        dg.as_diffusers_guider(dg.CFG(), EDMEulerScheduler())
    with pytest.raises(ValueError, match="not for flow matching"):
        dg.as_diffusers_guider(dg.CFGPlusPlus(), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="CFG\\+\\+-style guides support"):
        dg.as_diffusers_guider(dg.CFGPlusPlus(), PNDMScheduler())
    with pytest.raises(TypeError, match="no config file"):
        dg.as_diffusers_guider(dg.CFG(), scheduler).save_pretrained("unused")
    with_reference = dg.GFCG(lambda images: images.flatten(1)[:, :3], reference_model=lambda x, t, c: x)
    assert dg.as_diffusers_guider(with_reference, scheduler).guide is with_reference


def test_mixed_and_nested_use_refused():
    classic, pipe = pipes()
    pipe.update_components(guider=dg.as_diffusers_guider(dg.CFG(5.0), pipe.scheduler))
    with dg.apply(classic, dg.CFG(5.0)):  # the same UNet is inside apply
        with pytest.raises(ValueError, match="either through apply or as a Modular guider"):
            pipe(**inputs(), output="latents")
    outer = dg.as_diffusers_guider(dg.CFG(5.0), pipe.scheduler)
    inner = dg.as_diffusers_guider(dg.APG(5.0), pipe.scheduler)
    outer.prepare_models(pipe.unet)
    with pytest.raises(ValueError, match="already driven by another DiffguideGuider"):
        inner.prepare_models(pipe.unet)
    outer.cleanup_models(pipe.unet)
    assert not pipe.unet._forward_pre_hooks and not hasattr(pipe.unet, "_diffguide_guider")


def test_bad_inputs_named():
    classic, pipe = pipes()
    guider = dg.as_diffusers_guider(dg.CFG(5.0), pipe.scheduler)
    with pytest.raises(ValueError, match="pipeline's own scheduler"):  # timesteps never set on it
        guider.set_state(0, STEPS, torch.tensor(999))
    pipe.scheduler.set_timesteps(STEPS)
    t = pipe.scheduler.timesteps[0]
    guider.set_state(0, STEPS, t)
    embeds = torch.zeros(2, 5, 32)
    with pytest.raises(ValueError, match="no unconditional prompt_embeds"):
        guider.prepare_inputs({"prompt_embeds": (embeds, None), "image_embeds": (None, None)})
    batches = guider.prepare_inputs({"prompt_embeds": (embeds, embeds + 1), "image_embeds": (None, None)})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
    assert torch.equal(batches[1].prompt_embeds, embeds + 1)
    state = BlockState(prompt_embeds=embeds, negative_prompt_embeds=None, guidance=embeds[:, 0])
    fields = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds"), "guidance": "guidance"}
    with pytest.raises(ValueError, match="no unconditional encoder_hidden_states"):  # the block-state variant
        guider.prepare_inputs_from_block_state(state, fields)
    state.negative_prompt_embeds = embeds - 1
    cond, uncond = guider.prepare_inputs_from_block_state(state, fields)
    assert torch.equal(uncond.encoder_hidden_states, embeds - 1) and uncond.guidance is state.guidance
    other = dg.as_diffusers_guider(dg.CFGPlusPlus(0.6), DDIMScheduler.from_config(pipe.scheduler.config))
    pipe.update_components(guider=other)  # CFG++ on a scheduler the pipeline does not step
    other.scheduler.set_timesteps(STEPS)
    with pytest.raises(RuntimeError, match="was not stepped"):
        pipe(**inputs(), output="latents")


class Probe(dg.CFG):
    """CFG that records the noise level and step position the adapter hands it."""

    def __init__(self, scale):
        super().__init__(scale)
        self.seen = []

    def combine(self, step):
        self.seen.append((float(step.t), step.ve_sigma, step.index, step.num_steps))
        return super().combine(step)


def test_noise_level_follows_the_scheduler_in_img2img():
    classic, pipe = pipes("euler")
    probe = Probe(5.0)
    pipe.update_components(guider=dg.as_diffusers_guider(probe, pipe.scheduler))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe(prompt="a cat", image=image, strength=0.5, num_inference_steps=6, height=16, width=16,
         generator=torch.Generator().manual_seed(0), output="latents")
    abar = pipe.scheduler.alphas_cumprod.double()
    train_sigmas = ((1 - abar) / abar).sqrt()
    assert [(index, steps) for _, _, index, steps in probe.seen] == [(0, 3), (1, 3), (2, 3)]  # the last half
    for t, ve_sigma, _, _ in probe.seen:  # Euler's sigma at a fractional timestep: linear interpolation
        low = int(t)
        expected = train_sigmas[low] + (t - low) * (train_sigmas[min(low + 1, 999)] - train_sigmas[low])
        assert abs(ve_sigma - float(expected)) < 1e-5 * float(expected)


# -- flow matching: the Modular SD3 denoising core (prompt embeddings passed directly, no text encoders) -------------
def sd3_core():
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep)

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=8).eval()
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe._blocks.sub_blocks["denoise"].set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    embeds = {name: torch.randn(2, *shape, generator=g) for name, shape in (
        ("prompt_embeds", (5, 16)), ("negative_prompt_embeds", (5, 16)),
        ("pooled_prompt_embeds", (8,)), ("negative_pooled_prompt_embeds", (8,)))}
    return dict(embeds, latents=torch.randn(2, 4, 8, 8, generator=g), num_inference_steps=STEPS, height=16, width=16)


def flow_reference(pipe, guide_x0):
    """Few-line oracle: Euler on the flow ODE, ``x' = x + (s' - s) v`` with ``v = (x - x0_hat) / s`` and
    ``x0 = x - s v`` per branch, on the pipeline's own levels; ``guide_x0(x0_c, x0_u, i) -> x0_hat``."""
    kw, sched = sd3_inputs(), pipe.scheduler
    x = kw["latents"]

    def velocity(x, t, prefix):
        return pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                                encoder_hidden_states=kw[prefix + "prompt_embeds"],
                                pooled_projections=kw[prefix + "pooled_prompt_embeds"], return_dict=False)[0]

    for i, t in enumerate(sched.timesteps):
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        v_c, v_u = velocity(x, t, ""), velocity(x, t, "negative_")
        x0_hat = guide_x0(x - s * v_c, x - s * v_u, i)
        x = x + (s_next - s) * ((x - x0_hat) / s)
    return x


def test_flow_cfg_adapter_is_bit_identical_to_diffusers_cfg():
    pipe = sd3_core()
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=4.0))
    native = pipe(**sd3_inputs(), output="latents")
    pipe.update_components(guider=dg.as_diffusers_guider(dg.CFG(4.0), pipe.scheduler))
    assert torch.equal(native, pipe(**sd3_inputs(), output="latents"))


def test_flow_apg_and_ag_in_x0_equal_a_reference_euler_loop():
    pipe = sd3_core()
    assert float(pipe.scheduler.config.shift) == 3.0
    apg = dg.APG(4.0, norm_threshold=0.5)
    pipe.update_components(guider=dg.as_diffusers_guider(apg, pipe.scheduler))
    adapted = pipe(**sd3_inputs(), output="latents")
    assert float(pipe.scheduler.sigmas[0]) == 1.0  # the first level is pure noise: alpha = 0
    oracle = dg.APG(4.0, norm_threshold=0.5)
    expected = flow_reference(pipe, lambda x0_c, x0_u, i: oracle.update(x0_c, x0_u))
    assert (adapted - expected).abs().max() < 1e-5 * expected.abs().max()
    cfg = flow_reference(pipe, lambda x0_c, x0_u, i: x0_u + 4.0 * (x0_c - x0_u))
    assert (adapted - cfg).abs().max() > 1e-2  # APG is not CFG here: the comparison can fail

    ag = dg.AdaptiveGuidance(4.0, threshold=0.9, space="x0")
    guider = dg.as_diffusers_guider(ag, pipe.scheduler)
    pipe.update_components(guider=guider)
    rows = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    adapted = pipe(**sd3_inputs(), output="latents")
    handle.remove()
    stop = ag.truncated_at.tolist()
    assert stop[0] == stop[1] and 0 < stop[0] < STEPS  # both samples pass the threshold together, mid-run

    def ag_x0(x0_c, x0_u, i):
        cos = torch.nn.functional.cosine_similarity(x0_c.flatten(1).double(), x0_u.flatten(1).double(), dim=1)
        if i < stop[0]:  # the trigger: cos passes 0.9 first at step stop - 1, which still uses CFG
            assert bool((cos > 0.9).all()) == (i == stop[0] - 1)
        return x0_c if i >= stop[0] else x0_u + 4.0 * (x0_c - x0_u)

    expected = flow_reference(pipe, ag_x0)
    assert (adapted - expected).abs().max() < 1e-5 * expected.abs().max()
    assert rows == [2] * (2 * stop[0] + (STEPS - stop[0]))  # no unconditional pass after the trigger
