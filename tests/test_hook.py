"""guidance.apply on real diffusers pipelines: bit-exact CFG, no extra rows, restoration, CFG++ schedulers."""

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DModel)

from diffguide import guidance
from diffguide.guidance import GuidedDenoiser
from diffguide.samplers import diffusers_model_fn, plan_from_scheduler, sample_ddim, sample_dpmpp_2m, sample_euler
from tiny_pipes import tiny_class_pipe, tiny_dit, tiny_sd, tiny_sdxl


PIPES = {
    "sd": (tiny_sd, dict(prompt=["a cat", "dog"], height=16, width=16)),
    "sdxl": (tiny_sdxl, dict(prompt=["a cat", "dog"], height=16, width=16)),
    "dit": (tiny_dit, dict(class_labels=[0, 1])),
    "class": (tiny_class_pipe, dict(class_labels=[3, 7])),
}


def count_rows(pipe):
    """Rows the network really evaluates: a pre-hook on the first layer every forward passes through.

    A hook on the network itself would see only the pipeline's input (the patched forward bypasses it).
    """
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    first = net.pos_embed if hasattr(net, "pos_embed") else net.conv_in
    rows = []
    handle = first.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.mark.parametrize("name", list(PIPES))
def test_cfg_through_apply_is_bit_exact_with_native(name):
    make, kw = PIPES[name]
    pipe = make()
    kw = dict(kw, num_inference_steps=4, output_type="np")
    rows, handle = count_rows(pipe)
    native = pipe(guidance_scale=5.0, generator=torch.Generator().manual_seed(3), **kw).images
    native_rows = sum(rows)
    rows.clear()
    with guidance.apply(pipe, guidance.CFG(5.0)) as stats:
        hooked = pipe(generator=torch.Generator().manual_seed(3), **kw).images  # no guidance_scale passed
    handle.remove()
    assert abs(native - hooked).max() == 0.0
    assert stats.rows == native_rows == sum(rows)
    again = pipe(guidance_scale=5.0, generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(native - again).max() == 0.0  # restored


def test_cfg_exact_in_bf16_with_images_per_prompt():
    pipe = tiny_sd().to(dtype=torch.bfloat16)
    kw = dict(prompt="a cat", num_images_per_prompt=2, height=16, width=16, num_inference_steps=3, output_type="pt")
    native = pipe(guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kw).images
    with guidance.apply(pipe, guidance.CFG(3.0)):
        hooked = pipe(guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert native.shape[0] == 2 and torch.equal(native, hooked)


def test_guide_scale_rules_over_pipeline_argument():
    pipe = tiny_class_pipe()
    kw = dict(class_labels=[1, 2], num_inference_steps=3, output_type="pt")
    native = pipe(guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **kw).images
    with guidance.apply(pipe, guidance.CFG(4.0)):
        hooked = pipe(guidance_scale=9.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(native, hooked)


@pytest.mark.parametrize("name", ["class", "sd", "dit"])
def test_cfg_scale_one_evaluates_only_conditional_rows(name):
    make, kw = PIPES[name]
    pipe = make()
    kw = dict(kw, num_inference_steps=3, output_type="pt")
    rows, handle = count_rows(pipe)
    pipe(guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **kw)
    assert sum(rows) == 2 * 2 * 3  # native CFG: [uncond; cond] for both samples, every step
    rows.clear()
    native = pipe(guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    rows.clear()
    with guidance.apply(pipe, guidance.CFG(1.0)) as stats:
        hooked = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    handle.remove()
    assert sum(rows) == stats.rows == 2 * 3  # the network ran on the conditional rows only
    assert stats.uncond_rows_per_sample.tolist() == [0, 0]
    if name != "dit":  # DiT without CFG evaluates a different batch (and draws different noise)
        assert torch.equal(native, hooked)


@pytest.mark.parametrize("guide", [guidance.CFG(7.5), guidance.APG(7.5, norm_threshold=5.0),
                                   guidance.CFGPlusPlus(0.6)], ids=repr)
def test_guides_evaluate_as_many_rows_as_native_cfg(guide):
    pipe = tiny_sd()
    kw = dict(prompt=["a cat", "dog"], height=16, width=16, num_inference_steps=3, output_type="latent")
    rows, handle = count_rows(pipe)
    pipe(guidance_scale=7.5, generator=torch.Generator().manual_seed(0), **kw)
    native = sum(rows)
    rows.clear()
    with guidance.apply(pipe, guide) as stats:
        pipe(generator=torch.Generator().manual_seed(0), **kw)
    handle.remove()
    assert sum(rows) == stats.rows == native == 2 * 2 * 3
    assert stats.uncond_rows_per_sample.tolist() == [3, 3]    # every sample's unconditional row, every step


def test_extra_call_arguments_reach_the_pipeline():
    """Arguments in the pipeline's ``**kwargs`` (SD's legacy ``callback``) and named ones arrive unchanged."""
    pipe = tiny_sd()
    kw = dict(prompt=["a cat", "dog"], height=16, width=16, num_inference_steps=4, output_type="np")

    def run(**extra):
        legacy, on_end = [], []
        images = pipe(generator=torch.Generator().manual_seed(3), callback=lambda i, t, x: legacy.append(i),
                      callback_steps=2, callback_on_step_end=lambda p, i, t, d: on_end.append(i) or {}, **kw,
                      **extra).images
        return images, legacy, on_end

    with pytest.warns(FutureWarning):
        native = run(guidance_scale=5.0)
    with guidance.apply(pipe, guidance.CFG(5.0)):
        with pytest.warns(FutureWarning):
            hooked = run()
    assert native[1] == hooked[1] == [0, 2] and native[2] == hooked[2] == [0, 1, 2, 3]
    assert abs(native[0] - hooked[0]).max() == 0.0


def test_rejects_pipelines_without_cfg_batching():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(TypeError, match="DDPMPipeline does not run classifier-free guidance.*serves .* StableDiffusionPipeline.*FluxPipeline"):
        with guidance.apply(pipe, guidance.CFG(2.0)):
            pass
    assert type(pipe) is DDPMPipeline and "forward" not in pipe.unet.__dict__


def test_rescale_equals_native_guidance_rescale():
    pipe = tiny_sd()
    kw = dict(prompt=["a cat"], height=16, width=16, num_inference_steps=3, output_type="np")
    native = pipe(guidance_scale=6.0, guidance_rescale=0.7, generator=torch.Generator().manual_seed(0), **kw).images
    with guidance.apply(pipe, guidance.CFGRescale(6.0, 0.7)):
        hooked = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(native - hooked).max() == 0.0


def test_restores_pipeline_on_exception():
    pipe = tiny_sd()

    class Boom(guidance.CFG):
        def combine(self, step):
            raise RuntimeError("boom")

    cls, fwd = type(pipe), pipe.unet.forward
    with pytest.raises(RuntimeError, match="boom"):
        with guidance.apply(pipe, Boom(2.0)):
            pipe(prompt="a", height=16, width=16, num_inference_steps=2)
    assert type(pipe) is cls and "forward" not in pipe.unet.__dict__ and pipe.unet.forward == fwd
    assert "step" not in pipe.scheduler.__dict__


@pytest.mark.parametrize("sched_cls,sampler", [
    (lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1), sample_ddim),
    (lambda: EulerDiscreteScheduler(), sample_euler),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), sample_dpmpp_2m),
])
def test_cfgpp_through_pipeline_equals_our_sampler_loop(sched_cls, sampler):
    """Two code paths (scheduler hook vs our loop) give the same CFG++ trajectory."""
    pipe = tiny_sd(scheduler=sched_cls())
    steps, lam = 6, 0.8
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with guidance.apply(pipe, guidance.CFGPlusPlus(lam)):
        hooked = pipe(prompt=["a cat", "dog"], height=16, width=16, num_inference_steps=steps, latents=noise.clone(),
                      output_type="latent").images
    cond, uncond = pipe.encode_prompt(["a cat", "dog"], "cpu", 1, True)
    plan = plan_from_scheduler(sched_cls(), steps)
    x = noise * pipe.scheduler.init_noise_sigma  # the pipeline's state: VP for DDIM/DPM, x/alpha for Euler
    if isinstance(pipe.scheduler, EulerDiscreteScheduler):
        x = x * float(plan.alpha(0))
    model = GuidedDenoiser(diffusers_model_fn(pipe.unet), guidance.CFGPlusPlus(lam), cond, uncond)
    with torch.no_grad():
        ours = sampler(model, x, plan, disable=True)  # ends at sigma 0 (Euler, DPM) or DDIM's final VP level
    assert torch.allclose(hooked, ours, atol=2e-4, rtol=1e-4), (hooked - ours).abs().max()


def test_cfgpp_euler_ancestral_through_pipeline_renoises_with_uncond():
    """SD + EulerAncestralDiscreteScheduler under apply(CFG++): every step is k-diffusion's ancestral step with the
    guided denoised estimate and the unconditional direction, x' = D_lam + s_down eps_u + s_up z (guidance.md 2.3),
    with z drawn from the pipeline's generator."""
    make = lambda: EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   steps_offset=1)
    pipe = tiny_sd(scheduler=make())
    steps, lam, prompts = 6, 0.3, ["a cat", "dog"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    with guidance.apply(pipe, guidance.CFGPlusPlus(lam)):
        pipe(prompt=prompts, height=16, width=16, num_inference_steps=steps, latents=noise.clone(),
             output_type="latent", generator=torch.Generator().manual_seed(5),
             callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].clone()) or {})
    assert len(seen) == steps
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    ref = make()
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(5)
    x = noise * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        s, s_next = float(ref.sigmas[i]), float(ref.sigmas[i + 1])
        with torch.no_grad():
            eps_u, eps_c = (pipe.unet(x / (1 + s**2) ** 0.5, t, encoder_hidden_states=e).sample for e in (uncond, cond))
        s_up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        s_down = (s_next**2 - s_up**2) ** 0.5
        z = torch.randn(x.shape, generator=gen)
        expected = x - s * (eps_u + lam * (eps_c - eps_u)) + s_down * eps_u + s_up * z
        gap = float((seen[i] - expected).abs().max())
        assert gap <= 5e-5, f"step {i}: {gap}"  # renoising with eps_lam instead is off by 1e-3 to 1e-1 here
        x = seen[i]


def test_cfgpp_rejects_schedulers_it_cannot_serve():
    with pytest.raises(ValueError, match="support"):
        with guidance.apply(tiny_sd(scheduler=PNDMScheduler()), guidance.CFGPlusPlus(0.5)):
            pass
    clipping = tiny_class_pipe()
    clipping.scheduler = DDIMScheduler(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample"):
        with guidance.apply(clipping, guidance.CFGPlusPlus(0.5)):
            pass
    with pytest.raises(TypeError, match="doubled"):
        with guidance.apply(tiny_dit(), guidance.CFGPlusPlus(0.5)):
            pass
    # Euler-ancestral is served
    with guidance.apply(tiny_sd(scheduler=EulerAncestralDiscreteScheduler()), guidance.CFGPlusPlus(0.5)) as st:
        tiny = st
    assert tiny.rows == 0


def test_apply_refuses_unknown_prediction_type_and_leaves_pipeline_untouched():
    pipe = tiny_sd(scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True))
    cls = type(pipe)
    for guide in (guidance.CFG(3.0), guidance.CFGPlusPlus(0.5)):
        with pytest.raises(ValueError, match="StableDiffusionPipeline runs a diffusion network.*DPMSolverMultistepScheduler is a rectified-flow"):
            with guidance.apply(pipe, guide):
                pass
        assert type(pipe) is cls and "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
        assert getattr(pipe, "_diffguide_session", None) is None


def test_apply_refuses_guidance_distilled_unets():
    """A unet with time_cond_proj_dim (LCM-style w-embedding) never runs [uncond; cond] batches."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    base = tiny_sd()
    distilled = UNet2DConditionModel.from_config(base.unet.config, time_cond_proj_dim=8)
    assert distilled.config.time_cond_proj_dim == 8
    sd = StableDiffusionPipeline(**dict(base.components, unet=distilled))
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "safety_checker",
                                                                 "feature_extractor", "image_encoder")}
    lcm = LatentConsistencyModelPipeline(**parts, unet=distilled, scheduler=LCMScheduler(),
                                         requires_safety_checker=False)
    for pipe in (sd, lcm):
        cls = type(pipe)
        with pytest.raises(TypeError, match=f"{cls.__name__} has a guidance-distilled unet.*time_cond_proj_dim"):
            with guidance.apply(pipe, guidance.CFG(3.0)):
                pass
        assert type(pipe) is cls and "forward" not in pipe.unet.__dict__


def test_apply_bad_input():
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="Guidance"):
        with guidance.apply(pipe, "cfg"):
            pass
    with pytest.raises(TypeError, match="serves"):
        with guidance.apply(object(), guidance.CFG(2.0)):
            pass
    with pytest.raises(ValueError, match="guidance_rescale"):
        with guidance.apply(pipe, guidance.CFG(2.0)):
            pipe(prompt="a", height=16, width=16, num_inference_steps=2, guidance_rescale=0.5)
    with guidance.apply(pipe, guidance.CFG(2.0)):
        with pytest.raises(ValueError, match="already"):
            with guidance.apply(pipe, guidance.CFG(2.0)):
                pass
