"""diffusers' own guiders (diffusers.guiders.BaseGuidance) through guidance.apply on classic pipelines.

Oracles: native CFG (bit-identical; Z-Image to rounding), diffusers' classic PAG pipelines, SD3's native
skip_guidance_layers (bit-identical), diffguide's APG applied to epsilon (APG's documented conversion) and
CFGZeroStar, and few-line formulas of FDG and MAG run as diffguide guides on the same predictions; batched, list and
two-call pipelines alike. Rows are counted inside the network, at its first layer.
"""

import contextlib
import functools

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline
from diffusers.guiders import (AdaptiveProjectedGuidance, AdaptiveProjectedMixGuidance, AutoGuidance,
                               ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance, FrequencyDecoupledGuidance,
                               LTX2Guidance, MagnitudeAwareGuidance, PerturbedAttentionGuidance, SkipLayerGuidance,
                               SmoothedEnergyGuidance, TangentialClassifierFreeGuidance)
from diffusers.hooks import LayerSkipConfig, SmoothedEnergyGuidanceConfig
from diffusers.utils import logging as diffusers_logging
from kornia.geometry import pyrdown, pyrup

from diffguide import guidance
from diffguide.guidance.base import Guidance, Guided
from diffguide.guidance.families import supported_pipelines
from tiny_pipes import PIPELINES, embeds, tiny_class_pipe, tiny_dit, tiny_sd, tiny_sd3, tiny_sdxl

diffusers_logging.set_verbosity_error()  # every guider warns that guiders are experimental

SD_KW = dict(prompt=["a cat", "dog"], height=16, width=16, num_inference_steps=3, output_type="latent")
MID = "mid_block.attentions.0.transformer_blocks"  # the tiny UNets' one mid-block transformer: classic PAG's "mid"


def latents(pipe, seed=3, **extra):
    return pipe(generator=torch.Generator().manual_seed(seed), **SD_KW, **extra).images


def count_rows(net, first):
    rows = []
    return rows, getattr(net, first).register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))


def has_hooks(net) -> bool:
    """Whether any diffusers hook (layer skip, SEG blur, ...) is still registered on a submodule."""
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in net.modules())


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cfg_guider_is_bit_identical_to_native_cfg_on_unet_pipelines(name):
    pipe = {"sd": tiny_sd, "sdxl": tiny_sdxl}[name]()
    rows, handle = count_rows(pipe.unet, "conv_in")
    native = latents(pipe, guidance_scale=5.0)
    native_rows, _ = list(rows), rows.clear()
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=5.0)) as stats:
        hooked = latents(pipe)  # no guidance_scale passed: the guider's rules
    handle.remove()
    assert torch.equal(native, hooked)
    assert rows == native_rows == stats.rows_per_step == [4, 4, 4]
    assert stats.uncond_rows_per_sample.tolist() == [3, 3]  # one unconditional row per sample and step
    assert torch.equal(native, latents(pipe, guidance_scale=5.0))  # restored


@pytest.mark.parametrize("make", [tiny_dit, tiny_class_pipe])  # [cond; uncond] with learned sigma, [uncond; cond]
def test_cfg_guider_is_bit_identical_to_native_cfg_on_class_conditional_pipelines(make):
    pipe = make()
    kw = dict(class_labels=[0, 1], num_inference_steps=3, output_type="np")
    native = pipe(guidance_scale=5.0, generator=torch.Generator().manual_seed(3), **kw).images
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=5.0)) as stats:
        hooked = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(native - hooked).max() == 0.0 and stats.rows_per_step == [4, 4, 4]


UNETS, CLASS_PIPES = ["sd", "sdxl"], [tiny_dit, tiny_class_pipe]
BATCHED, TWO_CALLS = ["sd3", "sana", "pixart", "hunyuan"], ["flux", "wan", "cogview4", "lumina2"]
# tested against their own CFG below: Qwen (native norm rescale), Z-Image (native c + s (c - u))
OTHERS = ["qwen", "zimage"]


def test_every_family_is_covered_by_a_cfg_guider_oracle():
    names = [type(make()).__name__ for make in [tiny_sd, tiny_sdxl, *CLASS_PIPES]]
    names += [type(PIPELINES[name][0]()).__name__ for name in BATCHED + TWO_CALLS + OTHERS]
    # one class per text-to-image parent row; the derived rows (img2img, inpaint, ...) in test_pipeline_zoo.py
    assert len(set(names)) == len(names) and set(names) <= set(supported_pipelines())


@pytest.mark.parametrize("name", BATCHED)
def test_cfg_guider_is_bit_identical_to_native_cfg_on_transformer_pipelines(name):
    make, first, native_kw = PIPELINES[name]
    pipe = make()

    def run(**extra):
        return pipe(**embeds(name, 2), num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra)[0]

    native = run(**native_kw(4.0))
    rows, handle = count_rows(pipe.transformer, first)
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0)) as stats:
        hooked = run()
    handle.remove()
    assert torch.equal(native, hooked)
    assert rows == stats.rows_per_step == [4, 4]


def test_cfg_guider_outside_its_window_runs_conditional_rows_only():
    pipe = tiny_sd()
    rows, handle = count_rows(pipe.unet, "conv_in")
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=5.0, start=0.4)) as stats:
        hooked = latents(pipe)
    handle.remove()
    assert rows == stats.rows_per_step == [2, 4, 4]  # int(0.4 * 3) = 1: step 0 is conditional only
    assert stats.uncond_rows_per_sample.tolist() == [2, 2] == [(sum(rows) - 2 * 3) // 2] * 2
    assert not torch.equal(hooked, latents(pipe, guidance_scale=5.0))


def pag(scale=5.0, pag_scale=3.0):
    # diffusers' PAG guider perturbs steps int(start N) < i (strict): start -1 includes step 0, as the classic
    # pipeline does
    return PerturbedAttentionGuidance(
        guidance_scale=scale, perturbed_guidance_scale=pag_scale, perturbed_guidance_start=-1.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=LayerSkipConfig(indices=[0], fqn=MID, skip_attention=False,
                                                  skip_attention_scores=True, skip_ff=False))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_pag_guider_equals_diffusers_classic_pag_pipeline(name):
    pipe = {"sd": tiny_sd, "sdxl": tiny_sdxl}[name]()
    extra = {"force_zeros_for_empty_prompt": False} if name == "sdxl" else {}
    classic_cls = {"sd": StableDiffusionPAGPipeline, "sdxl": StableDiffusionXLPAGPipeline}[name]
    classic = classic_cls(**pipe.components, pag_applied_layers=["mid"], **extra)
    classic.set_progress_bar_config(disable=True)
    reference = latents(classic, guidance_scale=5.0, pag_scale=3.0)
    rows, handle = count_rows(pipe.unet, "conv_in")
    with guidance.apply(pipe, pag()) as stats:
        hooked = latents(pipe)
    handle.remove()
    # classic PAG evaluates one [u; c; c_perturbed] batch, apply a [u; c] batch and a perturbed [c] one: the
    # same arithmetic on other batch shapes, float32 rounding (measured 3.8e-6 on both) against a PAG effect > 0.5
    assert (reference - hooked).abs().max() <= 1e-5
    assert (reference - latents(pipe, guidance_scale=5.0)).abs().max() > 0.1
    assert rows == [2, 4] * 3 and stats.rows_per_step == [6, 6, 6] and stats.calls == 6
    assert stats.uncond_rows_per_sample.tolist() == [3, 3]  # the perturbed pass is on the conditional inputs
    assert not has_hooks(pipe.unet)  # cleanup_models removed the perturbation


@pytest.mark.parametrize("start, stop", [(0.0, 1.0), (0.2, 0.8), (0.01, 0.2)])
def test_skip_layer_guider_equals_native_sd3_skip_guidance_layers(start, stop):
    pipe = tiny_sd3(num_layers=3)

    def run(**extra):
        return pipe(**embeds("sd3", 2), num_inference_steps=5, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra)[0]

    native = run(guidance_scale=4.0, skip_guidance_layers=[1], skip_layer_guidance_scale=2.5,
                 skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    guider = SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.5,
                               skip_layer_config=LayerSkipConfig(indices=[1]), skip_layer_guidance_start=start,
                               skip_layer_guidance_stop=stop)
    with guidance.apply(pipe, guider) as stats:
        hooked = run()
    assert torch.equal(native, hooked)
    skipped = [i for i in range(5) if 5 * start < i < 5 * stop]  # the native pipeline's window
    assert stats.rows_per_step == [6 if i in skipped else 4 for i in range(5)]
    assert stats.uncond_rows_per_sample.tolist() == [5, 5]
    assert not has_hooks(pipe.transformer)


class EpsAPG(Guidance):
    """diffguide's APG update (Alg. 1) applied to the epsilon predictions instead of x0."""

    def __init__(self, apg: guidance.APG) -> None:
        self.apg = apg

    def reset(self) -> None:
        self.apg.reset()

    def combine(self, step):
        pred = self.apg.update(step.pred_cond, step.pred_uncond)
        return Guided(pred, pred)


@pytest.mark.parametrize("scale, eta, threshold, momentum", [(5.0, 0.0, 15.0, -0.5), (5.0, 0.3, 0.5, 0.0)])
def test_apg_guider_equals_diffguide_apg_in_its_documented_conversion(scale, eta, threshold, momentum):
    pipe = tiny_sd()
    guider = AdaptiveProjectedGuidance(guidance_scale=scale - 1, adaptive_projected_guidance_momentum=momentum,
                                       adaptive_projected_guidance_rescale=threshold, eta=eta,
                                       use_original_formulation=True)
    with guidance.apply(pipe, guider):
        hooked = latents(pipe)
    with guidance.apply(pipe, EpsAPG(guidance.APG(scale, eta=eta, norm_threshold=threshold, momentum=momentum))):
        ours = latents(pipe)
    # diffusers casts the parallel and orthogonal parts from float64 separately, diffguide only the parallel one:
    # float32 rounding (measured <= 2.2e-6) against an APG effect of 0.2 over CFG
    assert (hooked - ours).abs().max() <= 1e-5
    with guidance.apply(pipe, guidance.CFG(scale)):
        assert (hooked - latents(pipe)).abs().max() > 0.1


@pytest.mark.parametrize("zero_init_steps", [0, 1])
def test_cfg_zero_star_guider_equals_diffguide_cfg_zero_star(zero_init_steps):
    pipe = tiny_sd()
    with guidance.apply(pipe, ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=zero_init_steps)):
        hooked = latents(pipe)
    with guidance.apply(pipe, guidance.CFGZeroStar(4.0, zero_init_steps=zero_init_steps)):
        assert torch.equal(hooked, latents(pipe))


def test_smoothed_energy_guider_perturbs_its_third_pass():
    pipe = tiny_sd()
    guider = SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_guidance_start=0.0,
                                    seg_guidance_stop=1.0,
                                    seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn=MID))
    rows, handle = count_rows(pipe.unet, "conv_in")
    with guidance.apply(pipe, guider) as stats:
        hooked = latents(pipe)
    handle.remove()
    assert rows == [4, 2, 4, 2, 4] and stats.rows_per_step == [4, 6, 6]  # SEG's window is start < i (strict)
    assert stats.uncond_rows_per_sample.tolist() == [3, 3]  # the blurred pass is on the conditional inputs
    with guidance.apply(pipe, guidance.CFG(4.0)):
        assert (hooked - latents(pipe)).abs().max() > 1e-3  # the blurred-attention pass differs from pred_cond
    assert not has_hooks(pipe.unet)


def test_auto_guidance_runs_its_unconditional_pass_on_the_skipped_network():
    pipe = tiny_sd()
    guider = AutoGuidance(guidance_scale=3.0, auto_guidance_config=LayerSkipConfig(indices=[0], fqn=MID,
                                                                                   skip_attention=True))
    rows, handle = count_rows(pipe.unet, "conv_in")
    with guidance.apply(pipe, guider) as stats:
        hooked = latents(pipe)
    handle.remove()
    assert rows == [2, 2] * 3 and stats.rows_per_step == [4, 4, 4]  # cond and skipped-uncond: separate calls
    assert stats.uncond_rows_per_sample.tolist() == [3, 3]  # its "uncond" takes the unconditional inputs
    # not CFG: the guider's "uncond" is the unconditional inputs through the layer-skipped network
    assert (hooked - latents(pipe, guidance_scale=3.0)).abs().max() > 1e-3
    assert not has_hooks(pipe.unet)


@pytest.mark.parametrize("name, make, kw", [
    ("sd", TangentialClassifierFreeGuidance, {}),
    ("sd", AdaptiveProjectedMixGuidance, {"adaptive_projected_guidance_start_step": 0}),  # APG from step 1
    ("flux", MagnitudeAwareGuidance, {})])  # (B, seq, C) outputs: the shape diffusers' own MAG forward takes
def test_other_two_pass_guiders_run_their_own_combination(name, make, kw):
    guider = make(guidance_scale=4.0, **kw)
    if name == "sd":
        pipe = tiny_sd()
        with guidance.apply(pipe, guider) as stats:
            hooked = latents(pipe)
        cfg = latents(pipe, guidance_scale=4.0)
    else:
        pipe = PIPELINES[name][0]()
        with guidance.apply(pipe, guider) as stats:
            hooked = run_transformer(pipe, name, steps=3)
        cfg = run_transformer(pipe, name, steps=3, true_cfg_scale=4.0)
    assert torch.isfinite(hooked).all() and stats.rows_per_step == [4, 4, 4]
    assert (hooked - cfg).abs().max() > 1e-4  # the guider's combination, not the pipeline's CFG


class Mambo(Guidance):
    """MAMBO-G as diffusers documents it: CFG whose scale decays with the relative guidance magnitude,
    ``w' = 1 + (w - 1) exp(-alpha |c - u| / |u|)`` (norms over each whole sample), ``u + w' (c - u)``."""

    def __init__(self, scale: float, alpha: float) -> None:
        self.scale, self.alpha = scale, alpha

    def combine(self, step):
        c, u = step.pred_cond, step.pred_uncond
        ratio = (c - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
        w = (1 + (self.scale - 1) * torch.exp(-self.alpha * ratio)).view(-1, *[1] * (c.ndim - 1))
        pred = u + w * (c - u)
        return Guided(pred, pred)


def test_magnitude_aware_guider_fails_in_diffusers_on_images_and_runs_under_apply():
    from diffusers.guiders.magnitude_aware_guidance import mambo_guidance

    c, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):  # torch.norm(x, dim=[1, 2, 3]): matrix_norm
        mambo_guidance(c, u, 4.0)
    pipe = tiny_sd()
    with guidance.apply(pipe, MagnitudeAwareGuidance(guidance_scale=6.0, alpha=2.0)) as stats:
        hooked = latents(pipe)
    with guidance.apply(pipe, Mambo(6.0, alpha=2.0)):
        ours = latents(pipe)
    # a norm over (C, H * W) against one over the flattened sample: float32 summation order (measured 0 here)
    assert (hooked - ours).abs().max() <= 1e-5 and stats.rows_per_step == [4, 4, 4]
    assert (hooked - latents(pipe, guidance_scale=6.0)).abs().max() > 1e-3  # the decayed scale, not CFG's


def laplacian(x, levels):
    """Laplacian pyramid, finest level first: Gaussian levels by pyrdown, each minus the next one pyrup'ed."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(pyrdown(gauss[-1]))
    return [g - pyrup(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


class FDG(Guidance):
    """Frequency-decoupled guidance (Sadat et al. 2025, Alg. 1): CFG at its own scale on each level of the
    Laplacian pyramids of cond and uncond, the pyramid then collapsed (``x = pyrup(x) + level``, coarse to fine).
    Z-Image's predictions reach diffguide guides with their frame axis (B, C, 1, H, W): images of (B, C, H, W)."""

    def __init__(self, scales):
        self.scales = scales

    def combine(self, step):
        shape = step.pred_cond.shape
        c, u = (pred.reshape(shape[0], -1, *shape[-2:]) for pred in (step.pred_cond, step.pred_uncond))
        n = len(self.scales)
        levels = [u + w * (c - u) for w, c, u in zip(self.scales, laplacian(c, n), laplacian(u, n))]
        pred = levels[-1]
        for level in reversed(levels[:-1]):
            pred = pyrup(pred) + level
        return Guided(pred.reshape(shape), pred.reshape(shape))


@pytest.mark.parametrize("name", ["sd", "zimage", "lumina2"])  # epsilon; Z-Image's list batches; Lumina 2's -output
def test_frequency_decoupled_guider_equals_the_laplacian_pyramid_formula(name):
    scales = [7.0, 2.0]
    if name == "sd":
        pipe, run = tiny_sd(), latents
    elif name == "lumina2":                      # 4x4 latents (at the default 16x16 they are 2x2, refused)
        pipe = PIPELINES[name][0]()
        run = lambda pipe: pipe(**{**embeds(name, 2), "height": 32, "width": 32}, num_inference_steps=2,
                                output_type="latent", generator=torch.Generator().manual_seed(0))[0]
    else:
        pipe = PIPELINES[name][0]()
        run = functools.partial(run_transformer, name=name)
    with guidance.apply(pipe, FrequencyDecoupledGuidance(guidance_scales=scales)) as stats:
        hooked = run(pipe)
    with guidance.apply(pipe, FDG(scales)):
        ours = run(pipe)
    # the same kornia filters in the same order: bit-identical (measured)
    assert torch.equal(hooked, ours)
    assert stats.rows_per_step == [4] * len(stats.rows_per_step)
    with guidance.apply(pipe, guidance.CFG(7.0)):
        assert (hooked - run(pipe)).abs().max() > 1e-3  # low frequencies at scale 2: not CFG at 7


@pytest.mark.parametrize("name, what", [("flux", "packed token sequence"), ("wan", "video latents")])
def test_frequency_decoupled_guider_is_refused_on_non_image_predictions(name, what):
    make, first, _ = PIPELINES[name]
    pipe = make()
    rows, handle = count_rows(pipe.transformer, first)
    with pytest.raises(ValueError, match=f"Laplacian pyramids.*{what}"):
        with guidance.apply(pipe, FrequencyDecoupledGuidance(guidance_scales=[7.0, 2.0])):
            run_transformer(pipe, name)
    handle.remove()
    assert rows == [] and "forward" not in pipe.transformer.__dict__  # refused before the network ran


@pytest.mark.parametrize("height, width, levels, what, fits", [   # tiny_sd: latents are half the image's size
    (24, 40, 2, "comes back at 16x32", (24, 16)),   # 12x20: kornia pads sides of which none is a power of two
    (8, 8, 3, "fails in kornia", (16, 16)),         # 4x4: the 2x2 second level is too small to blur
    (24, 16, 4, "fails in kornia", (32, 32))])      # 12x8: not divisible by 2^3
def test_frequency_decoupled_guider_on_latents_its_pyramid_cannot_rebuild_is_refused(height, width, levels, what, fits):
    from diffusers.guiders import frequency_decoupled_guidance as fdg

    probe = torch.zeros(1, 4, height // 2, width // 2)   # what diffusers' FDG itself does on these latents
    with pytest.raises(RuntimeError) if "fails" in what else contextlib.nullcontext():
        assert fdg.build_image_from_pyramid(fdg.build_laplacian_pyramid_func(probe, levels)).shape != probe.shape
    pipe = tiny_sd()
    rows, handle = count_rows(pipe.unet, "conv_in")
    with pytest.raises(ValueError, match=rf"{levels}-level Laplacian pyramid of the {height // 2}x{width // 2} "
                                         rf"StableDiffusionPipeline latents {what}.*multiples of .* = {2 ** (levels - 1)}, at least {2 ** levels}"):
        with guidance.apply(pipe, FrequencyDecoupledGuidance(guidance_scales=[3.0] * levels)):
            pipe(prompt=["a cat"], height=height, width=width, num_inference_steps=2, output_type="latent")
    handle.remove()
    assert rows == []                                     # refused before the network ran
    with guidance.apply(pipe, FrequencyDecoupledGuidance(guidance_scales=[3.0] * levels)):   # a size that fits
        out = pipe(prompt=["a cat"], height=fits[0], width=fits[1], num_inference_steps=2, output_type="latent")
    assert out.images.shape == (1, 4, fits[0] // 2, fits[1] // 2)


def test_the_sizes_the_fdg_refusal_names_are_those_kornia_rebuilds():
    """The refusal says what fits: sides that are multiples of 2^(levels - 1), at least 2^levels, one of them a power
    of two. That rule, against kornia's pyramid rebuilt by diffusers (the refusal's own test), on every size up to
    32 x 32 for 2 to 4 levels."""
    from diffusers.guiders import frequency_decoupled_guidance as fdg

    def rebuilds(h, w, levels):
        try:
            probe = torch.zeros(1, 1, h, w)
            return fdg.build_image_from_pyramid(fdg.build_laplacian_pyramid_func(probe, levels)).shape == probe.shape
        except RuntimeError:
            return False

    power_of_two = lambda n: n & (n - 1) == 0
    for levels in range(2, 5):
        k = 2 ** (levels - 1)
        for h in range(1, 33):
            for w in range(1, 33):
                stated = h % k == 0 and w % k == 0 and min(h, w) >= 2 * k and (power_of_two(h) or power_of_two(w))
                assert rebuilds(h, w, levels) == stated, (h, w, levels)


@pytest.mark.parametrize("kw, off", [({"guidance_scales": [7.0, 1.0]}, 1),  # level 1 at scale 1
                                     ({"guidance_scales": [7.0, 2.0], "start": [0.5, 0.0]}, 0)])  # level 0 from 1
def test_frequency_decoupled_guider_with_levels_off_at_some_step_is_refused(kw, off):
    guider = FrequencyDecoupledGuidance(**kw)
    guider.set_state(step=0, num_inference_steps=3, timestep=None)
    with pytest.raises((RuntimeError, UnboundLocalError)):  # diffusers' own forward on such a step
        guider.forward(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))
    pipe = tiny_sd()
    rows, handle = count_rows(pipe.unet, "conv_in")
    with pytest.raises(ValueError, match=rf"levels \[{off}\] do not guide at step 0"):
        with guidance.apply(pipe, guider):
            latents(pipe)
    handle.remove()
    assert rows == []


def with_ip_adapter(pipe, embed_dim=8):
    """An IP-adapter (4 image tokens per image embedding, random weights) loaded into the tiny UNet."""
    unet, g = pipe.unet, torch.Generator().manual_seed(5)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": 0.1 * torch.randn(4 * cross, embed_dim, generator=g),
                  "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    cross_attentions = [name[:-len(".processor")] for name in unet.attn_processors if "attn2" in name]
    weights = {f"{2 * i + 1}.{proj}.weight": 0.3 * torch.randn(unet.get_submodule(name).to_k.weight.shape, generator=g)
               for i, name in enumerate(cross_attentions) for proj in ("to_k_ip", "to_v_ip")}
    unet._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": weights})
    return pipe


def test_ip_adapter_embeddings_reach_every_guider_pass_with_their_own_rows():
    """IP-adapter embeddings sit in a list inside ``added_cond_kwargs``: each guider batch gets its rows of them."""
    pipe = with_ip_adapter(tiny_sd())
    embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(7))]  # (negative; positive) image embed
    native = latents(pipe, guidance_scale=5.0, ip_adapter_image_embeds=embeds)
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=5.0)) as stats:
        hooked = latents(pipe, ip_adapter_image_embeds=embeds)
    assert torch.equal(native, hooked) and stats.rows_per_step == [4, 4, 4]
    pipe.set_ip_adapter_scale(0.0)
    assert (native - latents(pipe, guidance_scale=5.0, ip_adapter_image_embeds=embeds)).abs().max() > 0.1
    pipe.set_ip_adapter_scale(1.0)
    classic = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    classic.set_progress_bar_config(disable=True)
    reference = latents(classic, guidance_scale=5.0, pag_scale=3.0, ip_adapter_image_embeds=embeds)
    with guidance.apply(pipe, pag()):
        hooked = latents(pipe, ip_adapter_image_embeds=embeds)  # the perturbed pass takes the positive embeds
    assert (reference - hooked).abs().max() <= 1e-5  # as the PAG test above: other batch shapes (measured 5.5e-6)


def test_guider_needing_inputs_the_pipeline_does_not_compute_is_refused():
    pipe = tiny_sd()
    with guidance.apply(pipe, LTX2Guidance(guidance_scale=4.0)):  # its CFG term alone: (cond, uncond)
        ltx2 = latents(pipe)
    # c + (s - 1)(c - u) is CFG's u + s (c - u) to float32 rounding (measured 1.5e-6)
    assert (ltx2 - latents(pipe, guidance_scale=4.0)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"pred_cond_stg.*does not compute|does not compute.*pred_cond_stg"):
        with guidance.apply(pipe, LTX2Guidance(guidance_scale=4.0, stg_scale=1.0)):
            latents(pipe)
    assert not has_hooks(pipe.unet) and type(pipe).__name__ == "StableDiffusionPipeline"


def test_mixed_and_nested_use_is_refused():
    pipe = tiny_sd()
    cfg = ClassifierFreeGuidance(guidance_scale=4.0)
    with guidance.apply(pipe, guidance.CFG(4.0)):
        with pytest.raises(ValueError, match="cannot be combined"):
            with guidance.apply(pipe, cfg):
                pass
    with guidance.apply(pipe, cfg):
        with pytest.raises(ValueError, match="already inside guidance.apply"):
            with guidance.apply(pipe, guidance.CFG(4.0)):
                pass
    with pytest.raises(TypeError, match="guidance.Guidance"):
        guidance.GuidanceInterval(cfg, sigma_lo=0.1, sigma_hi=1.0)  # a diffguide guide around a diffusers guider
    adapter = guidance.as_diffusers_guider(guidance.CFG(4.0), pipe.scheduler)
    with pytest.raises(TypeError, match=r"pass the guide itself: guidance.apply\(pipe, CFG"):
        with guidance.apply(pipe, adapter):
            pass
    with pytest.raises(ValueError, match="guidance_rescale must be 0.0"):
        with guidance.apply(pipe, cfg):
            latents(pipe, guidance_rescale=0.5)
    assert torch.equal(latents(pipe, guidance_scale=4.0), latents(pipe, guidance_scale=4.0))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and "forward" not in pipe.unet.__dict__


def run_transformer(pipe, name, steps=2, **extra):
    return pipe(**embeds(name, 2), num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra)[0]


@pytest.mark.parametrize("name", TWO_CALLS)
def test_cfg_guider_is_bit_identical_to_native_cfg_on_two_call_pipelines(name):
    make, first, native_kw = PIPELINES[name]
    pipe = make()
    # Lumina 2 steps on the negated output (the guider sees its negation) and rescales norms unless told not to
    extra = {"cfg_normalization": False} if name == "lumina2" else {}
    native = run_transformer(pipe, name, **native_kw(4.0), **extra)
    rows, handle = count_rows(pipe.transformer, first)
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0)) as stats:
        hooked = run_transformer(pipe, name)
    handle.remove()
    assert torch.equal(native, hooked)
    assert rows == [2, 2, 2, 2] and stats.rows_per_step == [4, 4] and stats.calls == 4
    assert stats.uncond_rows_per_sample.tolist() == [2, 2]


class RecordingCFG(ClassifierFreeGuidance):
    def forward(self, pred_cond, pred_uncond=None):
        self.seen = getattr(self, "seen", []) + [pred_cond]
        return super().forward(pred_cond, pred_uncond)


@pytest.mark.parametrize("name", ["lumina2", "zimage"])
def test_guiders_see_the_velocity_the_pipeline_steps_on(name):
    """Lumina 2 and Z-Image step on the negated network output: the guider gets that (as Z-Image's Modular
    denoise block hands it), Z-Image's (C, 1, H, W) per-sample outputs stacked without the frame axis."""
    make, first, _ = PIPELINES[name]
    pipe = make()
    outputs, forward = [], pipe.transformer.forward

    @functools.wraps(forward)
    def recorded(*args, **kwargs):  # the network's own outputs: apply hooks around this forward
        out = forward(*args, **kwargs)
        outputs.append(out[0])
        return out

    pipe.transformer.forward = recorded
    guider = RecordingCFG(guidance_scale=4.0)
    with guidance.apply(pipe, guider):
        run_transformer(pipe, name)
    if name == "zimage":  # one [cond...; uncond...] list call per step
        cond = [-torch.stack(out[:2]).squeeze(2) for out in outputs]
    else:  # cond, then uncond
        cond = [-out for out in outputs[::2]]
    assert len(guider.seen) == len(cond) == 2
    assert all(torch.equal(seen, c) for seen, c in zip(guider.seen, cond))


def test_cfg_guider_outside_its_window_skips_the_unconditional_call_on_two_call_pipelines():
    make, first, _ = PIPELINES["flux"]
    pipe = make()
    rows, handle = count_rows(pipe.transformer, first)
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0, stop=0.5)) as stats:
        run_transformer(pipe, "flux", steps=4)
    handle.remove()
    assert rows == [2, 2, 2, 2, 2, 2] and stats.rows_per_step == [4, 4, 2, 2]  # steps int(0.5 * 4) = 2 on: cond only
    assert stats.uncond_rows_per_sample.tolist() == [2, 2] == [(sum(rows) - 2 * 4) // 2] * 2


def test_cfg_guider_on_zimage_list_batches_equals_native_cfg():
    make, first, native_kw = PIPELINES["zimage"]
    pipe = make()
    rows, handle = count_rows(pipe.transformer, first)
    native = run_transformer(pipe, "zimage", **native_kw(3.0))  # c + 3 (c - u) = u + 4 (c - u)
    native_rows, _ = list(rows), rows.clear()
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0)) as stats:
        hooked = run_transformer(pipe, "zimage")
    # the other floating-point expression of the same combination: float32 rounding of O(1) latents (measured 8e-7)
    assert (native - hooked).abs().max() <= 1e-5
    assert rows == native_rows == stats.rows_per_step == [4, 4] and stats.uncond_rows_per_sample.tolist() == [2, 2]
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True)):
        assert torch.equal(native, run_transformer(pipe, "zimage"))  # c + s (c - u): Z-Image's own expression
    handle.remove()


def test_qwen_cfg_guider_is_plain_cfg_without_the_native_norm_rescale():
    pipe = PIPELINES["qwen"][0]()
    with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0)):
        hooked = run_transformer(pipe, "qwen")
    with guidance.apply(pipe, guidance.CFG(4.0)):
        assert torch.equal(hooked, run_transformer(pipe, "qwen"))


def test_skip_layer_guider_on_flux_adds_a_skipped_conditional_call():
    pipe = PIPELINES["flux"][0]()
    guider = SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                               skip_layer_guidance_stop=1.0,
                               skip_layer_config=LayerSkipConfig(indices=[0], fqn="transformer_blocks"))
    with guidance.apply(pipe, guider) as stats:
        hooked = run_transformer(pipe, "flux", steps=3)
    assert stats.rows_per_step == [4, 6, 6] and stats.calls == 8  # its window is start < i (strict)
    assert (hooked - run_transformer(pipe, "flux", steps=3, true_cfg_scale=4.0)).abs().max() > 1e-3
    assert not has_hooks(pipe.transformer)


def test_two_call_pipeline_without_unconditional_inputs_is_refused_naming_them():
    pipe = PIPELINES["flux"][0]()
    kw = {k: v for k, v in embeds("flux", 2).items() if not k.startswith("negative")}
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        with guidance.apply(pipe, ClassifierFreeGuidance(guidance_scale=4.0)):
            pipe(**kw, num_inference_steps=2, output_type="latent")
