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
