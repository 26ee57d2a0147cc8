import pytest
import tiny_zoo_unet as builds
from zoo_harness import assert_build_reproduces_native


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


def _unfold(rows, frames):
    """UNet3D's internal ``[B * F, C, H, W]`` back to ``[B, C, F, H, W]``."""
    return rows.reshape(-1, frames, *rows.shape[1:]).transpose(1, 2)


def test_cfgpp_steps_each_frame_of_a_frames_folded_video():
    """TextToVideoSD steps its video with the frames folded into the batch (``Family.frames_in_batch``): CFG++
    through apply equals a few-line DDIM oracle (eta 0) run on the network's own outputs, frame by frame."""
    import torch

    from diffguide import guidance
    from zoo_harness import output_latents

    make, call = builds.BUILDS["TextToVideoSDPipeline"]
    pipe, lam, frames = make(), 0.6, 3
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(5))
    inputs, outputs = [], []
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    pipe.unet.conv_out.register_forward_hook(lambda m, args, out: outputs.append(out))
    with guidance.apply(pipe, guidance.CFGPlusPlus(lam)):
        kw = {k: v for k, v in call(3.0).items() if k != "guidance_scale"}
        out = output_latents(pipe(**kw, latents=x.clone()))
    x = x.double()
    sched = pipe.scheduler
    timesteps = sched.timesteps.tolist()
    assert len(outputs) == len(timesteps) == 2 and outputs[0].shape[0] == 2 * frames
    ac = sched.alphas_cumprod.double()
    for i, t in enumerate(timesteps):
        assert torch.allclose(_unfold(inputs[i], frames).double(), x.expand(2, -1, -1, -1, -1), atol=1e-5)
        uncond, cond = _unfold(outputs[i], frames).double().chunk(2)
        a = ac[t]
        a_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else sched.final_alpha_cumprod.double()
        x0 = (x - (1 - a).sqrt() * (uncond + lam * (cond - uncond))) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * uncond
    torch.testing.assert_close(out, x.float(), rtol=1e-5, atol=1e-5)


CHANNELS_AND_START = {
    "GLIGEN-inpaint": (lambda: builds.gligen(inpaint=True), lambda s: builds.gligen_call(s, inpaint=True)),
    **{name: builds.BUILDS[name] for name in ("StableDiffusionGLIGENPipeline", "StableDiffusionDepth2ImgPipeline",
                                              "StableDiffusionUpscalePipeline", "PaintByExamplePipeline",
                                              "AltDiffusionImg2ImgPipeline", "VideoToVideoSDPipeline",
                                              "I2VGenXLPipeline")},
}


def _fold(video):
    """``[B, C, F, H, W]`` with the frames folded into the batch, as text-to-video SD steps it."""
    return video.transpose(1, 2).reshape(-1, video.shape[1], *video.shape[3:])


@pytest.mark.parametrize("name", sorted(CHANNELS_AND_START))
def test_guides_see_the_stepped_latent_and_level_and_apg_matches_its_oracle(name):
    """Conditioning channels (GLIGEN inpainting, depth, low-res image, masked example) and a cut schedule
    (AltDiffusion img2img, no set_begin_index): a probe guide is handed exactly the latent the scheduler steps and the
    level it steps from, at every step, and APG (eta 0, no clamp, no momentum) equals its few-line oracle in x0.
    Video-to-video SD and I2VGen-XL step the video with its frames folded into the batch: guides see the video, the
    scheduler its frames."""
    import torch

    from diffguide import guidance
    from test_pipeline_zoo import Recorder, from_x0, recording, to_x0
    from zoo_harness import assert_native_reproduced, run

    make, call = CHANNELS_AND_START[name]
    pipe, scale = make(), 3.0
    if pipe.scheduler.config.prediction_type == "v_prediction":  # x0 = a x - s v (the upscaler)
        def x0_of(v, x, a, s):
            return a * x - s * v

        def pred_of(x0, x, a, s):
            return (a * x - x0) / s
    else:
        def x0_of(eps, x, a, s):
            return to_x0(eps, x, a, s, False)

        def pred_of(x0, x, a, s):
            return from_x0(x0, x, a, s, False)
    assert_native_reproduced(pipe, call, scale)
    kw = {k: v for k, v in call(scale).items() if k != "guidance_scale"}
    for guide in (recording(guidance.CFG(scale)), recording(guidance.APG(scale, eta=0.0, norm_threshold=0.0,
                                                                         momentum=0.0))):
        rec = Recorder(pipe)
        try:
            run(pipe, kw, guide)
        finally:
            rec.remove()
        assert len(guide.seen) == len(rec.steps) >= 2
        folded = pipe.unet.config.get("down_block_types")[0].endswith("3D")
        fold = _fold if folded else (lambda video: video)
        for seen, step in zip(guide.seen, rec.steps):
            assert torch.equal(fold(seen["x"]), step["sample"])
            assert torch.equal(seen["alpha"], step["alpha"].to(seen["alpha"].dtype))
            assert torch.equal(seen["sigma"], step["sigma"].to(seen["sigma"].dtype))
            if isinstance(guide, guidance.APG):
                x, a, s = seen["x"].double(), step["alpha"], step["sigma"]
                d_c, d_u = (x0_of(seen[k].double(), x, a, s) for k in ("cond", "uncond"))
                delta, dims = d_c - d_u, tuple(range(1, x.ndim))
                par = (delta * d_c).sum(dims, keepdim=True) / (d_c * d_c).sum(dims, keepdim=True) * d_c
                expected = pred_of(d_c + (scale - 1) * (delta - par), x, a, s)
                atol = 64 * torch.finfo(torch.float32).eps * float(x.abs().max() / s + expected.abs().max())
                torch.testing.assert_close(step["pred"].double(), fold(expected), rtol=1e-4, atol=atol)


def test_diffusers_cfg_guider_on_a_frames_folded_video_is_bit_identical_to_native_cfg():
    """A diffusers guider combines the predictions in the shape the scheduler steps (frames folded into the batch);
    its result is unfolded back to the network's [B, C, F, H, W] before the pipeline combines it."""
    from diffusers.guiders import ClassifierFreeGuidance

    from zoo_harness import run

    make, call = builds.BUILDS["TextToVideoSDPipeline"]
    pipe = make()
    native, native_rows = run(pipe, call(3.0))
    kw = {k: v for k, v in call(3.0).items() if k != "guidance_scale"}
    guided, rows = run(pipe, kw, ClassifierFreeGuidance(guidance_scale=3.0))
    assert rows == native_rows and native.shape[2] == 3
    assert (guided == native).all()
