"""apply() on the derived diffusers pipelines (img2img, inpaint, ControlNet, Kontext, I2V): the native call
reproduced bit for bit with the same network rows; guides handed exactly the latent the scheduler steps and the
level it steps from; APG and CFG++ equal to few-line oracles there; the runtime guard and the refusals."""

from __future__ import annotations

import pytest
import torch

import tiny_zoo
from diffguide import guidance
from diffguide.guidance import families
from diffguide.guidance.families import Family, family_of, native_guide

SCALE = 3.0
FIRST_LAYER = {"sd": "conv_in", "sdxl": "conv_in", "sd3": "pos_embed", "flux": "x_embedder", "qwen": "img_in",
               "wan": "patch_embedding"}
NAMES = sorted(tiny_zoo.BUILDS)
_BUILT: dict = {}


def build(name: str):
    """One tiny pipeline per name for the whole module (random weights, fixed seeds)."""
    if name not in _BUILT:
        _BUILT[name] = tiny_zoo.BUILDS[name][0]()
    return _BUILT[name]


def kwargs(name: str) -> dict:
    return dict(tiny_zoo.BUILDS[name][1](SCALE), generator=torch.Generator().manual_seed(0))


def latents(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "images", None) if hasattr(out, "images") \
        else out.frames


def network(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


class Recorder:
    """Every ``scheduler.step`` of a run as the scheduler itself sees it: the prediction handed over, the sample it
    steps, its noise level read from its own arrays (independently of apply), and the stepped result."""

    def __init__(self, pipe) -> None:
        self.pipe, self.steps = pipe, []
        sched = pipe.scheduler
        self.orig = sched.step

        def step(model_output, timestep, sample, *args, **kwargs):
            out = self.orig(model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self.steps.append(dict(pred=model_output.clone(), sample=sample.clone(), prev=prev.clone(),
                                   **self.level(timestep)))
            return out

        sched.step = step

    def level(self, timestep) -> dict:
        sched = self.pipe.scheduler
        t = torch.as_tensor(timestep).flatten()[0]
        if hasattr(sched, "sigmas") and type(sched).__name__.startswith("FlowMatch"):
            i = int((sched.timesteps == t).nonzero()[0])  # its place in the schedule: no begin index involved
            s, s_next = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
            return dict(alpha=1 - s, sigma=s, alpha_next=1 - s_next, sigma_next=s_next, flow=True)
        abar = sched.alphas_cumprod[int(t)].double()
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        abar_prev = sched.alphas_cumprod[prev_t].double() if prev_t >= 0 else torch.as_tensor(
            sched.final_alpha_cumprod).double()
        return dict(alpha=abar.sqrt(), sigma=(1 - abar).sqrt(), alpha_next=abar_prev.sqrt(),
                    sigma_next=(1 - abar_prev).sqrt(), flow=False)

    def remove(self) -> None:
        del self.pipe.scheduler.step


def recording(base):
    """``base`` guide that also records the step it was handed."""

    class Probe(type(base)):
        def combine(self, step):
            self.seen.append(dict(x=step.x.clone(), alpha=step.alpha, sigma=step.sigma, index=step.index,
                                  cond=step.pred_cond.clone(), uncond=step.pred_uncond.clone()))
            return super().combine(step)

    base.__class__ = Probe
    base.seen = []
    return base


def run(pipe, name, guide=None):
    layer = getattr(network(pipe), FIRST_LAYER[name.split("-")[0]])
    rows = []
    handle = layer.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        if guide is None:
            return latents(pipe(**kwargs(name))), rows
        with guidance.apply(pipe, guide):
            return latents(pipe(**kwargs(name))), rows
    finally:
        handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_native_guide_reproduces_the_native_call_bit_for_bit(name):
    pipe = build(name)
    native, native_rows = run(pipe, name)
    guided, rows = run(pipe, name, native_guide(family_of(pipe), SCALE))
    assert torch.equal(guided, native)
    assert rows == native_rows and sum(rows) > 0


def to_x0(pred, x, alpha, sigma, flow):
    return x - sigma * pred if flow else (x - sigma * pred) / alpha


def from_x0(x0, x, alpha, sigma, flow):
    return (x - x0) / sigma if flow else (x - alpha * x0) / sigma


def eps_of(pred, x, alpha, sigma, flow):
    return x + alpha * pred if flow else pred


@pytest.mark.parametrize("name", NAMES)
def test_guides_see_the_stepped_latent_and_level_and_apg_cfgpp_match_oracles(name):
    pipe = build(name)
    # a probe (CFG) is handed exactly the latent the scheduler steps and the level it steps from, at every step
    rec = Recorder(pipe)
    probe = recording(guidance.CFG(SCALE))
    try:
        run(pipe, name, probe)
    finally:
        rec.remove()
    assert len(probe.seen) == len(rec.steps) >= 2
    for seen, step in zip(probe.seen, rec.steps):
        assert seen["x"].shape == step["sample"].shape and torch.equal(seen["x"], step["sample"])
        assert torch.equal(seen["alpha"], step["alpha"].to(seen["alpha"].dtype))
        assert torch.equal(seen["sigma"], step["sigma"].to(seen["sigma"].dtype))
    # APG (eta 0, no clamp, no momentum): D = D_c + (w - 1) (delta - <delta, D_c> D_c / |D_c|^2) in x0 space
    rec = Recorder(pipe)
    apg = recording(guidance.APG(SCALE, eta=0.0, norm_threshold=0.0, momentum=0.0))
    try:
        run(pipe, name, apg)
    finally:
        rec.remove()
    apart = []
    for seen, step in zip(apg.seen, rec.steps):
        x, a, s, flow = step["sample"].double(), step["alpha"], step["sigma"], step["flow"]
        d_c, d_u = (to_x0(seen[k].double(), x, a, s, flow) for k in ("cond", "uncond"))
        delta, dims = d_c - d_u, tuple(range(1, x.ndim))
        par = (delta * d_c).sum(dims, keepdim=True) / (d_c * d_c).sum(dims, keepdim=True) * d_c
        expected = from_x0(d_c + (SCALE - 1) * (delta - par), x, a, s, flow)
        # the guide runs in float32: x -> x0 -> prediction loses ~eps32 |x| / sigma (DDIM's last steps)
        atol = 64 * torch.finfo(torch.float32).eps * float(x.abs().max() / s + expected.abs().max())
        torch.testing.assert_close(step["pred"].double(), expected, rtol=1e-4, atol=atol)
        cfg = from_x0(d_c + (SCALE - 1) * delta, x, a, s, flow)  # what a wrong (CFG) combination would give
        apart.append(float((cfg - expected).abs().max() / (expected - step["pred"].double()).abs().max()))
    assert max(apart) > 100  # the oracle tells APG from CFG by far more than the rounding it allows
    # CFG++ (lam): denoise with u + lam (c - u), renoise with the unconditional noise estimate
    rec = Recorder(pipe)
    lam = 0.6
    cfgpp = recording(guidance.CFGPlusPlus(lam))
    finals = []
    try:
        with guidance.apply(pipe, cfgpp):
            inner = pipe.scheduler.step

            def outer(*args, **kw):
                out = inner(*args, **kw)
                finals.append((out[0] if isinstance(out, tuple) else out.prev_sample).clone())
                return out

            pipe.scheduler.step = outer
            pipe(**kwargs(name))
    finally:
        rec.remove()
    assert len(finals) == len(cfgpp.seen) >= 2
    for seen, step, final in zip(cfgpp.seen, rec.steps, finals):
        x, a, s, flow = step["sample"].double(), step["alpha"], step["sigma"], step["flow"]
        c, u = seen["cond"].double(), seen["uncond"].double()
        x0 = to_x0(u + lam * (c - u), x, a, s, flow)
        expected = step["alpha_next"] * x0 + step["sigma_next"] * eps_of(u, x, a, s, flow)
        torch.testing.assert_close(final.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["flux-img2img", "wan-v2v"])
def test_start_level_is_where_the_scheduler_steps_from(name):
    """strength < 1 on a flow schedule: the first level is the schedule's k-th (k > 0), not its first; Flux img2img
    tells the scheduler (set_begin_index), Wan video-to-video only cuts its timesteps (Family.start "timestep")."""
    pipe = build(name)
    probe = recording(guidance.CFG(SCALE))
    rec = Recorder(pipe)
    try:
        run(pipe, name, probe)
    finally:
        rec.remove()
    sched = pipe.scheduler
    assert (sched.begin_index is None) == (family_of(pipe).start == "timestep")
    first = int((sched.sigmas.double() == rec.steps[0]["sigma"]).nonzero()[0])
    assert first > 0 and probe.seen[0]["sigma"] == sched.sigmas[first].to(probe.seen[0]["sigma"].dtype)
    assert probe.seen[0]["sigma"] != sched.sigmas[0]


@pytest.mark.parametrize("name", ["sd-img2img", "sd-inpaint", "flux-img2img", "wan-v2v"])
def test_step_index_is_the_place_in_the_schedule_the_scheduler_steps(name):
    """strength < 1: guides are told the step's place in the whole schedule (what step-dependent guides such as
    CFG-Zero*'s zeroed first steps read), whether the scheduler knows its begin index (Flux), has none to set (DDIM)
    or is not told (Wan video-to-video)."""
    pipe = build(name)
    probe = recording(guidance.CFG(SCALE))
    timesteps = []
    inner = pipe.scheduler.step

    def step(model_output, timestep, *args, **kw):
        timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))
        return inner(model_output, timestep, *args, **kw)

    pipe.scheduler.step = step
    try:
        run(pipe, name, probe)
    finally:
        del pipe.scheduler.step
    schedule = pipe.scheduler.timesteps.double().tolist()
    places = [schedule.index(t) for t in timesteps]
    assert places[0] > 0 and [seen["index"] for seen in probe.seen] == places


def test_controlnet_residuals_follow_row_selection_and_extra_passes_are_refused():
    pipe = build("sd-controlnet")
    ag = guidance.AdaptiveGuidance(SCALE, threshold=0.5)  # cosine > 0.5 at once: conditional rows only
    out, rows = run(pipe, "sd-controlnet", ag)
    assert torch.isfinite(out).all() and sum(rows) < 2 * len(rows)  # residuals of the kept rows only
    gfcg = guidance.GFCG(lambda images: images.flatten(1)[:, :3], scale=1.0, base=guidance.CFG(SCALE),
                         labels=torch.tensor([0]), class_conds=torch.randn(3, 5, 16), decode=lambda z: z[:, :3])
    with pytest.raises(ValueError, match="StableDiffusionControlNetPipeline passes ControlNet residuals"):
        run(pipe, "sd-controlnet", gfcg)
    with pytest.raises(TypeError, match="runs no flow network|ControlNet residuals"):
        with guidance.apply(pipe, guidance.RectifiedCFGPlusPlus(1.5)):
            pass


def test_per_frame_repeated_arguments_follow_row_selection(monkeypatch):
    """AnimateDiff repeats the prompt embeddings per frame: AG's conditional-only steps select all their frames.
    Without the row's ``repeated`` field the selection takes the wrong rows, and the UNet refuses the batch."""
    import dataclasses

    pipe = build("sd-animatediff")
    out, rows = run(pipe, "sd-animatediff", guidance.AdaptiveGuidance(SCALE, threshold=0.5))
    frames = 3
    assert torch.isfinite(out).all() and rows[0] == 2 * frames and rows[-1] == frames
    row = family_of(pipe)
    plain = dataclasses.replace(row, repeated=())
    monkeypatch.setattr(families, "FAMILIES", (plain,) + families.FAMILIES)
    with pytest.raises(RuntimeError, match="size of tensor"):
        run(pipe, "sd-animatediff", guidance.AdaptiveGuidance(SCALE, threshold=0.5))


def test_rectified_cfgpp_is_refused_on_a_flow_controlnet_family():
    from diffguide.guidance.hook import _check_guide
    from diffguide.guidance.session import Session

    pipe = build("sd3-img2img")
    session = Session(pipe, guidance.combiners.GuideCombiner(guidance.CFG(SCALE)))
    session.family = next(f for f in families.FAMILIES if "StableDiffusion3ControlNetPipeline" in f.pipelines)
    with pytest.raises(TypeError, match="ControlNet residuals \\(block_controlnet_hidden_states\\)"):
        _check_guide(session, guidance.RectifiedCFGPlusPlus(1.5))


def test_runtime_guard_refuses_a_batch_the_layout_does_not_describe(monkeypatch):
    """InstructPix2Pix batches [text; image; uncond]: read with a two-branch row at an even batch it would be
    combined silently wrong; the guard refuses it at the first scheduler step, naming the pipeline."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = build("sd-pix2pix")
    assert isinstance(pipe, StableDiffusionInstructPix2PixPipeline)
    wrong = Family(("StableDiffusionInstructPix2PixPipeline",), "uc", "diffusion", networks=("unet",),
                   latent="sample", conditioning="channels")
    monkeypatch.setattr(families, "FAMILIES", (wrong,) + families.FAMILIES)
    kw = dict(tiny_zoo._sd_embeds(None), image=tiny_zoo.image(), num_inference_steps=2, output_type="latent",
              )
    kw["prompt_embeds"] = kw["prompt_embeds"].repeat(2, 1, 1)
    kw["negative_prompt_embeds"] = kw["negative_prompt_embeds"].repeat(2, 1, 1)
    with pytest.raises(ValueError, match="StableDiffusionInstructPix2PixPipeline called its network on 6 rows "
                                         "for a latent batch of 2"):
        with guidance.apply(pipe, guidance.CFG(SCALE)):
            pipe(**kw)


def test_served_and_refused_classes_are_diffusers_classes_with_specific_reasons():
    import diffusers

    served = families.supported_pipelines()
    assert len(served) == len(set(served)) >= 100
    assert not set(served) & set(families.REFUSED)
    for name in served + list(families.REFUSED):
        assert name == "ClassConditionalPipeline" or hasattr(diffusers, name), name
    for name, reason in families.REFUSED.items():
        stub = type(name, (), {})()
        with pytest.raises(TypeError) as info:
            family_of(stub)
        message = str(info.value)
        assert message.startswith(f"{name} {reason}") and f"serves {len(served)} classes" in message
        assert "StableDiffusionImg2ImgPipeline" in message and "no table entry" not in message
    for name in served:  # family_of returns the class's row
        stub_cls = getattr(diffusers, name, None)
        if stub_cls is not None:
            row = next(f for f in families.FAMILIES if name in f.pipelines)
            assert family_of_name(stub_cls) is row


def family_of_name(cls):
    """The row family_of reads for ``cls`` (by the class whose __call__ it runs), without building it."""
    owner = next((c for c in cls.__mro__ if "__call__" in vars(c)), cls)
    return next(f for f in families.FAMILIES if owner.__name__ in f.pipelines)


def test_image_cfg_is_instruct_pix2pix_for_any_scales_and_needs_the_image_branch():
    pipe = build("sd-pix2pix")
    native = latents(pipe(**dict(kwargs("sd-pix2pix"), guidance_scale=5.0, image_guidance_scale=2.5)))
    with guidance.apply(pipe, guidance.ImageCFG(5.0, 2.5)) as stats:  # the guide's scales rule, not the call's
        guided = latents(pipe(**dict(kwargs("sd-pix2pix"), guidance_scale=1.0, image_guidance_scale=0.5)))
    assert torch.equal(guided, native)
    assert stats.rows_per_step == [3] * len(stats.rows_per_step)
    with pytest.raises(ValueError, match="ImageCFG needs the image-only branch"):
        run(build("sd-img2img"), "sd-img2img", guidance.ImageCFG(5.0, 2.5))
    from diffusers.guiders import ClassifierFreeGuidance

    with pytest.raises(TypeError, match="batches 3 branches"):
        with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=5.0)):
            pass


def test_pag_pipelines_are_served_at_pag_scale_zero_only():
    pipe = build("sd-pag")
    with pytest.raises(ValueError, match="pag_scale must be 0.0 under guidance.apply.*PerturbedAttentionGuidance"):
        with guidance.apply(pipe, guidance.CFG(SCALE)):
            pipe(**dict(kwargs("sd-pag"), pag_scale=3.0))


def test_every_row_names_arguments_its_networks_forward_takes():
    """For every served diffusers class, the network its __init__ declares takes the row's latent and time
    arguments (a static check of the rows without a tiny build)."""
    import inspect
    import typing

    import diffusers

    checked = 0
    for family in families.FAMILIES:
        for name in family.pipelines:
            cls = getattr(diffusers, name, None)
            if cls is None:
                continue
            hints = typing.get_type_hints(cls.__init__)
            network = hints.get(family.networks[0])
            assert network is not None, f"{name}.__init__ takes no {family.networks[0]}"
            options = typing.get_args(network) or (network,)  # unions of network classes
            classes = [c for c in options if isinstance(c, type) and hasattr(c, "forward")]
            assert classes, f"{name}: {network}"
            for net in classes:
                params = inspect.signature(net.forward).parameters
                assert family.latent in params and family.timestep in params, f"{name}: {net.__name__}"
            checked += 1
    assert checked >= 140
