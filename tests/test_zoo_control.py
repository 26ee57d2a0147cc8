"""ControlNet / T2I-Adapter / ControlNet-XS / PAG pipelines under apply: native CFG reproduced bit for bit on every
tiny build, the control really steering the builds, ControlNet residuals following AdaptiveGuidance's row selection
on SDXL, and PAG's own third branch refused up front."""

from __future__ import annotations

import pytest
import torch

import tiny_zoo_control as builds
from diffguide import guidance
from zoo_harness import assert_build_reproduces_native, run

CONTROLLED = sorted(name for name, (_, kind, _, _) in builds.CLASSES.items() if kind != "pag")


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


@pytest.mark.parametrize("name", CONTROLLED)
def test_the_control_steers_the_tiny_build(name):
    """Without it the residual arguments could be zero (diffusers starts ControlNets at zero) and a row mix-up in
    them would not show in the bit-for-bit check."""
    pipe, kw = builds.build(name), builds.call(name, 3.0)
    scale = "adapter_conditioning_scale" if builds.CLASSES[name][1] == "adapter" else "controlnet_conditioning_scale"
    controlled, _ = run(pipe, kw)
    uncontrolled, _ = run(pipe, dict(kw, **{scale: 0.0}))
    assert (controlled - uncontrolled).abs().max() > 1e-2


def test_sdxl_controlnet_residuals_follow_adaptive_guidance_rows():
    """On AG's conditional-only steps the UNet gets the conditional row of everything the pipeline batched, the
    ControlNet residuals included: its output there equals a direct UNet call on those rows (and not on the
    unconditional row's residuals)."""
    name = "StableDiffusionXLControlNetPipeline"
    pipe = builds.build(name)
    calls, outputs = [], []
    hooks = [pipe.unet.register_forward_pre_hook(lambda m, args, kw: calls.append((args, kw)), with_kwargs=True),
             pipe.unet.conv_out.register_forward_hook(lambda m, args, out: outputs.append(out))]
    try:
        latents, _ = run(pipe, dict(builds.call(name, 3.0), num_inference_steps=4),
                         guidance.AdaptiveGuidance(3.0, threshold=0.5))  # cosine > 0.5 at once: cond rows only
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(latents).all() and len(calls) == len(outputs) == 4
    rows = [len(out) for out in outputs]
    assert rows[0] == 2 and rows.count(1) >= 2, rows  # full CFG first, then conditional rows only

    def unet_on_row(args, kw, row: int, residual_row: int):
        (sample, t), picked = args, lambda v: v[row:row + 1]
        return pipe.unet(picked(sample), t, encoder_hidden_states=picked(kw["encoder_hidden_states"]),
                         added_cond_kwargs={k: picked(v) for k, v in kw["added_cond_kwargs"].items()},
                         down_block_additional_residuals=[d[residual_row:residual_row + 1]
                                                          for d in kw["down_block_additional_residuals"]],
                         mid_block_additional_residual=kw["mid_block_additional_residual"][
                             residual_row:residual_row + 1], return_dict=False)[0]

    with torch.no_grad():
        for (args, kw), out in zip(calls, outputs):
            assert kw["mid_block_additional_residual"].shape[0] == 2  # the pipeline batched both rows
            if len(out) == 1:
                assert torch.equal(out, unet_on_row(args, kw, 1, 1))
                assert not torch.allclose(out, unet_on_row(args, kw, 1, 0))  # the wrong row's residuals differ


def test_pag_third_branch_is_refused_up_front():
    """PAG pipelines are served at pag_scale=0 only; their default (3.0) batches a third branch apply does not
    combine: refused before any network call, naming the guide that does it."""
    name = "StableDiffusionXLPAGPipeline"
    pipe = builds.build(name)
    kw = {k: v for k, v in builds.call(name, 3.0).items() if k != "pag_scale"}
    with guidance.apply(pipe, guidance.CFG(3.0)):
        with pytest.raises(ValueError, match="pag_scale must be 0.0 .*PerturbedAttentionGuidance"):
            pipe(**kw)


@pytest.mark.parametrize("name", ["StableDiffusionXLControlNetInpaintPipeline",
                                  "StableDiffusionControlNetPAGInpaintPipeline",
                                  "StableDiffusionXLControlNetUnionImg2ImgPipeline", "StableDiffusionXLPAGImg2ImgPipeline"])
def test_guides_see_the_stepped_latent_and_level_from_strength(name, monkeypatch):
    """From strength 0.6 (the schedule cut, set_begin_index), on 9-channel inpainting UNets fed ControlNet residuals
    and on img2img: a probe is handed the 4-channel latent the scheduler steps and its level, and APG and CFG++ equal
    their few-line oracles (the checks of test_pipeline_zoo, run on these builds)."""
    import test_pipeline_zoo as zoo

    key = "sdxl-" + name if builds.CLASSES[name][0] else "sd-" + name  # its prefix names the UNet's first layer
    monkeypatch.setitem(zoo.tiny_zoo.BUILDS, key, builds.BUILDS[name])
    monkeypatch.setattr(zoo, "_BUILT", {})
    zoo.test_guides_see_the_stepped_latent_and_level_and_apg_cfgpp_match_oracles(key)


class _Reevaluates(guidance.CFG):
    """CFG that also re-evaluates the conditional branch through ``step.evaluate`` (as GFCG's reference class does)
    and records how far that pass lands from the step's own conditional prediction."""

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.gaps: list[float] = []

    def combine(self, step):
        self.gaps.append(float((step.evaluate(step.x, step.cond) - step.pred_cond).abs().max()))
        return super().combine(step)


def test_t2i_adapter_features_refuse_extra_passes(monkeypatch):
    """The adapter's features come from the image alone, but the UNet pops them from their list as it runs
    (``down_intrablock_additional_residuals``): an extra pass would run without them. The row's ``residuals``
    refuses it; without the field the same pass silently misses the adapter (far from the conditional prediction
    it re-evaluates)."""
    import dataclasses

    from diffguide.guidance import families

    name = "StableDiffusionAdapterPipeline"
    pipe = builds.build(name)
    with pytest.raises(ValueError, match=r"passes ControlNet residuals \(down_intrablock_additional_residuals\)"):
        run(pipe, builds.call(name, 3.0), _Reevaluates(3.0))
    plain = dataclasses.replace(families.family_of(pipe), residuals=())
    monkeypatch.setattr(families, "FAMILIES", (plain,) + families.FAMILIES)
    probe = _Reevaluates(3.0)
    run(pipe, builds.call(name, 3.0), probe)
    assert len(probe.gaps) == 2 and min(probe.gaps) > 1e-2


@pytest.mark.parametrize("name", ["StableDiffusionControlNetXSPipeline", "StableDiffusionXLControlNetXSPipeline"])
def test_controlnet_xs_extra_passes_recompute_the_control(name):
    """ControlNet-XS runs its control inside the UNet call (``controlnet_cond`` per row): an extra pass at the step's
    own x and condition reproduces the conditional prediction to float32 rounding (batch 1 against the step's 2)."""
    probe = _Reevaluates(3.0)
    latents, _ = run(builds.build(name), builds.call(name, 3.0), probe)
    assert torch.isfinite(latents).all() and len(probe.gaps) == 2
    assert max(probe.gaps) < 1e-5, probe.gaps


@pytest.mark.parametrize("name", ["StableDiffusionXLControlNetPAGImg2ImgPipeline", "StableDiffusionPAGInpaintPipeline"])
def test_pag_guider_through_apply_equals_the_pipelines_own_pag(name):
    """What the refusal of pag_scale > 0 points to: diffusers' PerturbedAttentionGuidance through apply on the PAG
    pipeline at pag_scale=0 equals the pipeline's own PAG (its [u; c; c-perturbed] batch) to float32 rounding, with
    ControlNet residuals (selected for the perturbed conditional pass) or inpainting channels."""
    import test_diffusers_guiders_apply as guiders

    pipe, kw = builds.build(name), builds.call(name, 3.0)
    hooked, _ = run(pipe, kw, guiders.pag(3.0, 2.0))
    classic = type(pipe)(**pipe.components, pag_applied_layers=["mid"])
    classic.set_progress_bar_config(disable=True)
    plain, _ = run(classic, kw)
    # last: with latents out, SDXL ControlNet-PAG img2img returns before restoring its attention processors (l. 1670)
    reference, _ = run(classic, dict(kw, pag_scale=2.0))
    # one [u; c; c_perturbed] batch against a [u; c] and a [c] one: other batch shapes, rounding (measured < 3e-6)
    assert (reference - hooked).abs().max() <= 1e-5
    assert (reference - plain).abs().max() > 0.05


@pytest.mark.parametrize("variant", ["guess_mode", "multi_controlnet"])
def test_controlnet_variants_reproduce_native_cfg(variant):
    """guess_mode (the ControlNet on the conditional rows only, zero residuals for the unconditional ones) and two
    ControlNets whose residuals the pipeline sums: still per-row UNet arguments, native CFG reproduced bit for bit,
    and AG's conditional-only steps run."""
    from diffusers import MultiControlNetModel

    from zoo_harness import assert_native_reproduced

    name = "StableDiffusionXLControlNetPipeline"
    pipe = builds.build(name)
    extra = dict(guess_mode=True)
    if variant == "multi_controlnet":
        second = builds._controlnet(sdxl=True)
        with torch.no_grad():
            for param in second.parameters():
                param.mul_(1.5)  # a different second ControlNet
        pipe = type(pipe)(**dict(pipe.components, controlnet=MultiControlNetModel([pipe.controlnet, second])))
        pipe.set_progress_bar_config(disable=True)
        extra = dict(image=[builds.image(seed=11), builds.image(seed=12)])
    call = lambda s: dict(builds.call(name, s), **extra)  # noqa: E731
    assert_native_reproduced(pipe, call)
    latents, _ = run(pipe, dict(call(3.0), num_inference_steps=4), guidance.AdaptiveGuidance(3.0, threshold=0.5))
    assert torch.isfinite(latents).all()
