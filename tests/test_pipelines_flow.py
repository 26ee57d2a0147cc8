"""guidance.apply on the transformer pipelines of diffusers 0.42.1 (tiny random weights, prompt embeddings given).

Bars: CFG through apply is bit-identical to the native call and evaluates as many network rows (counted inside
the network, at its first layer); guides that skip the unconditional branch skip those rows or calls.
"""

import inspect

import diffusers
import pytest
import torch

from diffguide import guidance
from diffguide.guidance.families import family_of, native_guide
from tiny_pipes import PIPELINES, embeds, first_layer, tiny_flux, tiny_flux_with_text_encoders, tiny_qwen, tiny_wan


def count_rows(pipe, name):
    rows = []
    handles = [first_layer(net, name).register_forward_pre_hook(lambda m, a, k=None: rows.append(a[0].shape[0]))
               for net in _networks(pipe)]
    return rows, handles


def _networks(pipe):
    return [getattr(pipe, a) for a in ("transformer", "transformer_2") if getattr(pipe, a, None) is not None]


def run(pipe, name, seed=0, batch=2, steps=2, **extra):
    kw = dict(embeds(name, batch), num_inference_steps=steps, output_type="latent",
              generator=torch.Generator().manual_seed(seed))
    kw.update(extra)
    return pipe(**kw)[0]  # images, or frames (Wan)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_through_apply_is_bit_exact_with_native(name):
    make, _, native_kw = PIPELINES[name]
    pipe = make()
    guide = native_guide(family_of(pipe), 4.0)
    rows, handles = count_rows(pipe, name)
    native = run(pipe, name, **native_kw(4.0))
    native_rows = sum(rows)
    rows.clear()
    with guidance.apply(pipe, guide) as stats:
        hooked = run(pipe, name)  # no scale passed: the guide's rules
    for h in handles:
        h.remove()
    if family_of(pipe).native_exact:
        assert torch.equal(native, hooked), (native - hooked).abs().max()
    else:  # Z-Image's c + s (c - u) vs CFG's u + (s + 1)(c - u): float32 rounding of O(1) latents, 2 steps
        assert 0 < (native - hooked).abs().max() <= 1e-5
    assert stats.rows == native_rows == sum(rows) == 2 * 2 * 2
    with guidance.apply(pipe, guide):
        other = run(pipe, name, **native_kw(9.0))  # a scale passed to the pipeline does not change the result
    assert torch.equal(hooked, other)
    assert torch.equal(native, run(pipe, name, **native_kw(4.0)))  # restored


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_scale_one_evaluates_only_conditional_rows(name):
    make = PIPELINES[name][0]
    pipe = make()
    rows, handles = count_rows(pipe, name)
    with guidance.apply(pipe, guidance.CFG(1.0)) as stats:
        run(pipe, name)
    for h in handles:
        h.remove()
    assert sum(rows) == stats.rows == 2 * 2  # conditional rows only, both steps
    assert stats.uncond_rows_per_sample.tolist() == [0, 0]


def test_wan22_two_networks_are_both_guided_bit_exact():
    """Wan 2.2: ``transformer`` above the boundary, ``transformer_2`` below; both branches of both are hooked."""
    pipe = tiny_wan(two_stage=True)
    rows, handles = count_rows(pipe, "wan")
    native = run(pipe, "wan", steps=3, guidance_scale=4.0, guidance_scale_2=4.0)
    native_rows = sum(rows)
    rows.clear()
    with guidance.apply(pipe, guidance.CFG(4.0)) as stats:
        hooked = run(pipe, "wan", steps=3)
    for h in handles:
        h.remove()
    assert torch.equal(native, hooked) and stats.rows == native_rows == sum(rows) == 3 * 2 * 2
    # a second scale for the low-noise stage is the guide's to decide: refused up front, naming what to use
    with pytest.raises(ValueError, match="guidance_scale_2 must be None under guidance.apply.*GuidanceInterval"):
        with guidance.apply(pipe, guidance.CFG(4.0)):
            run(pipe, "wan", steps=3, guidance_scale_2=2.0)


def test_qwen_native_cfg_needs_the_norm_rescale():
    pipe = tiny_qwen()
    native = run(pipe, "qwen", true_cfg_scale=4.0)
    with guidance.apply(pipe, guidance.CFG(4.0)):
        plain = run(pipe, "qwen")
    with guidance.apply(pipe, guidance.NormRescale(guidance.CFG(4.0))):
        rescaled = run(pipe, "qwen")
    assert torch.equal(native, rescaled) and (native - plain).abs().max() > 1e-3


def test_adaptive_guidance_on_two_call_pipeline_skips_uncond_calls():
    """AG (one-way truncation once cos(x0_c, x0_u) > threshold) on Flux's two calls: the unconditional call is not
    made once both samples are truncated, counted at the network's first layer."""
    pipe = tiny_flux()
    rows, handles = count_rows(pipe, "flux")
    with guidance.apply(pipe, guidance.CFG(4.0)) as cfg_stats:
        run(pipe, "flux", steps=4)
    cfg_rows = sum(rows)
    rows.clear()
    ag = guidance.AdaptiveGuidance(4.0, threshold=0.5)
    with guidance.apply(pipe, ag) as stats:
        run(pipe, "flux", steps=4)
    for h in handles:
        h.remove()
    assert cfg_rows == cfg_stats.rows == 4 * 2 * 2
    assert sum(rows) == stats.rows < cfg_rows
    # each sample's unconditional rows: the steps up to and including the one that measured cos > threshold
    assert stats.uncond_rows_per_sample.tolist() == ag.truncated_at.tolist()
    assert sum(rows) == 4 * 2 + int(ag.truncated_at.sum())


class FirstSampleOnly(guidance.CFG):
    """CFG on sample 0, conditional-only on the others (a per-sample mask, as AG's truncation makes one)."""

    def needs_uncond(self, level, batch_size):
        return torch.arange(batch_size, device=level.alpha.device) == 0


@pytest.mark.parametrize("name", ["flux", "cogview4", "sd3"])
def test_per_sample_uncond_mask_evaluates_only_those_rows(name):
    make = PIPELINES[name][0]
    pipe = make()
    rows, handles = count_rows(pipe, name)
    with guidance.apply(pipe, FirstSampleOnly(4.0)) as stats:
        mixed = run(pipe, name)
    for h in handles:
        h.remove()
    assert sum(rows) == stats.rows == 2 * (2 + 1)
    with guidance.apply(pipe, guidance.CFG(4.0)):
        cfg = run(pipe, name)
    with guidance.apply(pipe, guidance.CFG(1.0)):
        cond_only = run(pipe, name)
    # rows of a smaller batch may round differently in the attention kernels: 1e-5 on these O(1) latents
    torch.testing.assert_close(mixed[0], cfg[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], cond_only[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,callback", [("sd3", "SD3CFGCutoffCallback"), ("cogview4", "SDCFGCutoffCallback")])
def test_callback_turning_cfg_off_continues_conditional_only(name, callback):
    """diffusers' CFG-cutoff callbacks set ``pipe._guidance_scale = 0`` mid-run: batched (SD3) and two-call (CogView4)
    pipelines then run conditional-only, under apply exactly as natively."""
    import diffusers.callbacks

    make, _, native_kw = PIPELINES[name]
    pipe = make()
    cut = lambda: getattr(diffusers.callbacks, callback)(cutoff_step_ratio=None, cutoff_step_index=1)  # noqa: E731
    native = run(pipe, name, batch=1, steps=3, callback_on_step_end=cut(), **native_kw(4.0))
    with guidance.apply(pipe, guidance.CFG(4.0)) as stats:
        hooked = run(pipe, name, batch=1, steps=3, callback_on_step_end=cut())
    assert torch.equal(native, hooked)
    assert stats.cond_only_steps == 1 and stats.rows_per_step == [2, 2, 1]


@pytest.mark.parametrize("name", ["sd3", "flux", "sana", "qwen", "wan"])
def test_bf16_bit_exact(name):
    make, _, native_kw = PIPELINES[name]
    pipe = make().to(dtype=torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in embeds(name).items()}
    native = run(pipe, name, **kw, **native_kw(4.0))
    with guidance.apply(pipe, native_guide(family_of(pipe), 4.0)):
        hooked = run(pipe, name, **kw)
    assert pipe.transformer.dtype == torch.bfloat16 and torch.equal(native, hooked)


# SD3, HunyuanDiT and Lumina 2 do not repeat prompt embeddings passed directly (natively a shape error)
@pytest.mark.parametrize("name", ["flux", "sana", "pixart", "qwen", "cogview4", "wan"])
def test_images_per_prompt_and_generator_lists_bit_exact(name):
    make, _, native_kw = PIPELINES[name]
    pipe = make()
    per_prompt = "num_videos_per_prompt" if name == "wan" else "num_images_per_prompt"

    def extra():
        return {per_prompt: 2, "generator": [torch.Generator().manual_seed(i) for i in (3, 4)]}

    native = run(pipe, name, batch=1, **extra(), **native_kw(4.0))
    with guidance.apply(pipe, native_guide(family_of(pipe), 4.0)) as stats:
        hooked = run(pipe, name, batch=1, **extra())
    assert native.shape[0] == 2 and torch.equal(native, hooked) and stats.rows == 2 * 2 * 2


def test_torch_compiled_network_is_hooked_through_its_wrapper():
    """A ``torch.compile``d transformer is an ``OptimizedModule`` around ``_orig_mod`` whose forward takes
    ``(*args, **kwargs)``: apply binds calls to the wrapped module's signature and calls the wrapper's forward.
    The wrapper is built here with dynamo disabled (``DisableContext``): the same object ``torch.compile`` returns,
    without its 20 s graph capture on this CPU (``torch.compile(backend="eager")`` passes the same asserts)."""
    from torch._dynamo.eval_frame import DisableContext, OptimizedModule

    pipe = PIPELINES["sd3"][0]()
    native = run(pipe, "sd3", guidance_scale=4.0)
    pipe.transformer = OptimizedModule(pipe.transformer, DisableContext())
    compiled_forward = pipe.transformer.forward
    rows, handles = count_rows(pipe, "sd3")
    with guidance.apply(pipe, guidance.CFG(4.0)) as stats:
        hooked = run(pipe, "sd3")
    with guidance.apply(pipe, guidance.CFG(1.0)):
        run(pipe, "sd3")
    for h in handles:
        h.remove()
    assert torch.equal(native, hooked) and stats.rows == 8 and sum(rows) == 8 + 4
    assert pipe.transformer.forward is compiled_forward  # restored
    assert torch.equal(native, run(pipe, "sd3", guidance_scale=4.0))


def recorded_calls(pipe, name, **kw):
    """A native run's network calls per step (keyword arguments), and the flow sigmas it stepped through."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    run(pipe, name, steps=3, **kw)
    handle.remove()
    return calls, pipe.scheduler.sigmas.clone()


def apg_oracle(w, r=5.0, momentum=-0.5):
    """APG (Sadat et al. 2025, Alg. 1) on x0 = x - s v, written out: momentum, norm clamp, projection on x0_c."""
    running = []

    def combine(x, s, s_next, v_c, v_u, i):
        x0_c, x0_u = x - s * v_c, x - s * v_u
        delta = x0_c - x0_u
        if running:
            delta = delta + momentum * running[-1]
        running.append(delta)
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
        delta = delta * torch.clamp(r / norm, max=1.0)
        unit = x0_c / x0_c.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
        par = (delta * unit).flatten(1).sum(1).view(-1, *[1] * (delta.ndim - 1)) * unit
        x0 = x0_c + (w - 1) * (delta - par)
        return x + (s_next - s) * (x - x0) / s  # Euler on v = (x - x0) / s

    return combine


def cfg_zero_star_oracle(w, zero_init_steps=1):
    """CFG-Zero* (Fan et al. 2025, Eq. 9-10 and zero-init): s* = <c, u> / ||u||^2 per sample."""
    def combine(x, s, s_next, v_c, v_u, i):
        if i < zero_init_steps:
            return x
        dims = list(range(1, v_c.ndim))
        s_star = (v_c * v_u).sum(dims, keepdim=True) / (v_u.pow(2).sum(dims, keepdim=True) + 1e-8)
        return x + (s_next - s) * (s_star * v_u + w * (v_c - s_star * v_u))

    return combine


def cfgpp_oracle(lam):
    """CFG++ (Chung et al. 2025, Alg. 1) on a flow step: x' = (1 - s') x0(v_lam) + s' eps(v_u), v_lam = u + lam (c - u),
    x0(v) = x - s v, eps(v) = x + (1 - s) v."""
    def combine(x, s, s_next, v_c, v_u, i):
        v_lam = v_u + lam * (v_c - v_u)
        return (1 - s_next) * (x - s * v_lam) + s_next * (x + (1 - s) * v_u)

    return combine


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("guide,oracle", [
    (lambda: guidance.APG(4.0, norm_threshold=5.0, momentum=-0.5), lambda: apg_oracle(4.0)),
    (lambda: guidance.CFGZeroStar(4.0, zero_init_steps=1), lambda: cfg_zero_star_oracle(4.0)),
    (lambda: guidance.CFGPlusPlus(0.6), lambda: cfgpp_oracle(0.6)),
], ids=["APG", "CFGZeroStar", "CFG++"])
def test_flow_guides_through_apply_equal_a_hand_written_euler_loop(name, guide, oracle):
    """The pipeline under apply vs a hand-written flow loop (Euler x' = x + (s' - s) v_guided; CFG++'s own step)
    that calls the network itself with the native run's arguments (cond and uncond rows), on the flow sigmas of
    the scheduler."""
    make, _, native_kw = PIPELINES[name]
    pipe = make()
    calls, sigmas = recorded_calls(pipe, name, **native_kw(4.0))
    start = torch.randn(run(pipe, name, steps=1).shape, generator=torch.Generator().manual_seed(7))
    with guidance.apply(pipe, guide()):
        hooked = run(pipe, name, steps=3, latents=start.clone())
    combine, x = oracle(), start.clone()
    with torch.no_grad():
        for i in range(3):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if name == "sd3":  # one batched [uncond; cond] call
                v_u, v_c = pipe.transformer(**dict(calls[i], hidden_states=torch.cat([x, x])))[0].chunk(2)
            else:  # Flux: cond call, then uncond call
                v_c = pipe.transformer(**dict(calls[2 * i], hidden_states=x))[0]
                v_u = pipe.transformer(**dict(calls[2 * i + 1], hidden_states=x))[0]
            x = combine(x, s, s_next, v_c, v_u, i)
    # float32 rounding of the reordered formulas over 3 steps on O(1) latents
    torch.testing.assert_close(hooked, x, atol=1e-5, rtol=1e-5)


def test_flux_without_negative_prompt_gets_the_empty_one():
    """Flux runs true CFG only with a negative prompt; apply supplies "" (as Flux's own docs suggest)."""
    pipe = tiny_flux_with_text_encoders()
    kw = dict(prompt=["a cat", "dog"], height=16, width=16, max_sequence_length=8, num_inference_steps=2,
              output_type="latent")
    native = pipe(true_cfg_scale=4.0, negative_prompt="", generator=torch.Generator().manual_seed(0), **kw)[0]
    with guidance.apply(pipe, guidance.CFG(4.0)) as stats:
        hooked = pipe(generator=torch.Generator().manual_seed(0), **kw)[0]
    assert torch.equal(native, hooked) and stats.rows == 2 * 2 * 2
    bare = tiny_flux()  # no tokenizer: the empty prompt cannot be encoded
    with guidance.apply(bare, guidance.CFG(4.0)):
        with pytest.raises(ValueError, match="FluxPipeline runs CFG only with a negative prompt.*negative_prompt_embeds"):
            run(bare, "flux", prompt_embeds=embeds("flux")["prompt_embeds"],
                pooled_prompt_embeds=embeds("flux")["pooled_prompt_embeds"], negative_prompt_embeds=None,
                negative_pooled_prompt_embeds=None)


@pytest.mark.parametrize("name,arg,value,hint", [
    ("hunyuan", "guidance_rescale", 0.7, "CFGRescale"),
    ("sd3", "skip_guidance_layers", [0], "skip-layer"),
    ("lumina2", "cfg_trunc_ratio", 0.5, "GuidanceInterval"),
])
def test_pipeline_cfg_options_apply_would_override_are_refused(name, arg, value, hint):
    pipe = PIPELINES[name][0]()
    with guidance.apply(pipe, guidance.CFG(4.0)):
        with pytest.raises(ValueError, match=f"{arg} must be .* under guidance.apply .*{hint}"):
            run(pipe, name, **{arg: value})


def test_unsupported_pipelines_and_schedulers_are_refused_up_front():
    from diffusers import DDIMScheduler

    class NewPipeline(diffusers.DiffusionPipeline):  # a pipeline no family describes
        def __call__(self, prompt=None, guidance_scale=5.0):
            pass

    with pytest.raises(TypeError, match="NewPipeline has no unet or transformer.*serves "
                                        ".*StableDiffusionPipeline.*FluxPipeline"):
        with guidance.apply(NewPipeline(), guidance.CFG(2.0)):
            pass
    pipe = PIPELINES["sd3"][0]()
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline runs a flow network; its scheduler DDIMScheduler"):
        with guidance.apply(pipe, guidance.CFG(2.0)):
            pass
    assert "forward" not in pipe.transformer.__dict__ and getattr(pipe, "_diffguide_session", None) is None


def test_subclasses_are_served_only_with_their_parents_call():
    from diffusers import FluxPipeline

    class KeepsCall(FluxPipeline):
        pass

    class OverridesCall(FluxPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    parts = tiny_flux().components
    keeps = KeepsCall(**parts)
    keeps.set_progress_bar_config(disable=True)
    native = run(keeps, "flux", true_cfg_scale=4.0)
    with guidance.apply(keeps, guidance.CFG(4.0)):
        assert torch.equal(native, run(keeps, "flux"))
    with pytest.raises(TypeError, match="OverridesCall overrides the __call__ of FluxPipeline"):
        with guidance.apply(OverridesCall(**parts), guidance.CFG(4.0)):
            pass


# name -> (network time at flow level s, sign of the velocity in the output, one batched [u; c] call)
RCFGPP_PIPES = {"sd3": (lambda s: 1000 * s, 1, True), "flux": (lambda s: s, 1, False),
                "lumina2": (lambda s: 1 - s, -1, False), "zimage": (lambda s: 1 - s, -1, True)}


@pytest.mark.parametrize("name", list(RCFGPP_PIPES))
def test_rectified_cfgpp_through_apply_equals_the_papers_loop(name):
    """Rectified-CFG++ (Saini et al. 2025, Alg. 1) through apply vs the algorithm written out on the scheduler's
    sigmas: v_c at x; predictor x_hat = x + f (s' - s) v_c; v = v_c + lam (v(x_hat, s_hat | c) - v(x_hat, s_hat | u))
    with the network's time at s_hat (1000 s, s, 1 - s: each pipeline's convention); Euler x' = x + (s' - s) v.
    Three passes per step, counted inside the network."""
    time_of, sign, batched = RCFGPP_PIPES[name]
    make = PIPELINES[name][0]
    pipe = make()
    net = pipe.transformer
    signature = inspect.signature(net.forward)
    calls = []
    hook = net.register_forward_pre_hook(
        lambda m, a, k: calls.append(dict(signature.bind(*a, **k).arguments)), with_kwargs=True)
    run(pipe, name, steps=3, **PIPELINES[name][2](4.0))
    hook.remove()
    sigmas = pipe.scheduler.sigmas.clone()
    start = torch.randn(run(pipe, name, steps=1).shape, generator=torch.Generator().manual_seed(7))
    rows, handles = count_rows(pipe, name)
    with guidance.apply(pipe, guidance.RectifiedCFGPlusPlus(1.5, predictor_fraction=0.5)) as stats:
        hooked = run(pipe, name, steps=3, latents=start.clone())
    for h in handles:
        h.remove()
    latent, time_arg = ("x", "t") if name == "zimage" else ("hidden_states", "timestep")

    def branch(call, half):  # the cond (half=1) or uncond (half=0) rows of a batched call ([u; c], Z-Image [c; u])
        if not batched:
            return call
        out = {}
        for key, value in call.items():
            if isinstance(value, (torch.Tensor, list)) and len(value) == 4:
                first = half if name != "zimage" else 1 - half
                value = value[2 * first:2 * first + 2] if isinstance(value, list) else value.chunk(2)[first]
            out[key] = value
        return out

    def velocity(call, x, s):
        t = call[time_arg]
        kw = dict(call, **{time_arg: torch.full_like(t, time_of(s)),
                           latent: list(x.unsqueeze(2).unbind(0)) if name == "zimage" else x})
        out = net(**kw)[0]
        out = torch.stack(list(out)).squeeze(2).float() if name == "zimage" else out
        return sign * out

    lam, f, x = 1.5, 0.5, start.clone()
    with torch.no_grad():
        for i in range(3):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            cond_call, uncond_call = ((branch(calls[i], 1), branch(calls[i], 0)) if batched
                                      else (calls[2 * i], calls[2 * i + 1]))
            v_c = velocity(cond_call, x, s)
            s_hat = s + f * (s_next - s)
            x_hat = x + (s_hat - s) * v_c
            v = v_c + lam * (velocity(cond_call, x_hat, s_hat) - velocity(uncond_call, x_hat, s_hat))
            x = x + (s_next - s) * v
    torch.testing.assert_close(hooked, x, atol=1e-5, rtol=1e-5)  # float32 rounding over 3 steps
    assert stats.rows == sum(rows) == 3 * 2 * 3  # v_c, then both branches at x_hat: 3 rows per sample and step


@pytest.mark.parametrize("name,why", [("cogview4", "no function of the flow level"), ("sd", "runs no flow network")])
def test_rectified_cfgpp_refused_up_front_where_the_level_cannot_be_moved(name, why):
    from tiny_pipes import tiny_sd

    pipe = tiny_sd() if name == "sd" else PIPELINES[name][0]()
    for guide in (guidance.RectifiedCFGPlusPlus(1.0), guidance.NormRescale(guidance.RectifiedCFGPlusPlus(1.0))):
        with pytest.raises(TypeError, match=f"{type(guide).__name__} evaluates the network at other noise levels; "
                                            f".*{why}.*Supported: StableDiffusion3Pipeline"):
            with guidance.apply(pipe, guide):
                pass


@pytest.mark.parametrize("name", ["sd3", "lumina2"])   # network time 1000 s / 1 - s
def test_next_level_is_the_schedulers_next_time_in_low_precision_pipelines(name):
    """``step.next_level`` comes from the scheduler's float64 sigmas, not from the latents' dtype: its time is the
    time the pipeline feeds its network at the next step, also in bfloat16 (where the level's own sigma is rounded
    to 3 digits)."""
    pipe = PIPELINES[name][0]().to(dtype=torch.bfloat16)
    seen = []

    class Recording(guidance.CFG):
        def combine(self, step):
            seen.append((float(step.t), step.next_level))
            return super().combine(step)

    kw = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in embeds(name, 1).items()}
    with guidance.apply(pipe, Recording(2.0)):
        pipe(**kw, num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    times = [t for t, _ in seen]
    assert [level.index for _, level in seen] == [1, 2, 3, 4] and float(seen[-1][1].sigma) == 0   # the last: s = 0
    for (_, level), t_next in zip(seen, times[1:]):
        assert float(level.t) == pytest.approx(t_next, rel=1e-6, abs=1e-6)
