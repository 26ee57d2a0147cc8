"""GFCG and autoguidance: reference class and scale rules, formula, cost, inference mode, the hook's extra pass."""

import pytest
import torch

from diffguide import guidance
from diffguide.guidance import CFG, GFCG, Autoguidance, Guidance, Guided, GuidedDenoiser, Step
from diffguide.guidance.gfcg import SCALE_RULES
from guide_models import F64, class_pipe, count_rows, gmm_model, gmm_problem, tiny_unet
from diffguide.samplers import diffusers_model_fn, plan_from_scheduler, sample_ddim
from tiny_pipes import tiny_sd


class CountingClassifier(torch.nn.Module):
    """Linear classifier on flattened images that records how it was called."""

    def __init__(self, in_features, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(in_features, num_classes).double()
        self.calls = []

    def forward(self, images):
        self.calls.append((torch.is_grad_enabled(), images.requires_grad, images.shape[0]))
        return self.linear(images.flatten(1).double())


def fixed_logits(logits):
    return lambda images: logits.to(images.device)


def oracle_reference(probs, labels):
    order = probs.argsort(dim=1, descending=True)
    return torch.tensor([next(k for k in row.tolist() if k != y) for row, y in zip(order, labels.tolist())])


def one_step(gen, gmm, batch=5, t=400):
    labels = torch.arange(batch) % 3
    x = torch.randn(batch, 1, 4, 4, generator=gen, dtype=F64)
    alpha, sigma = gmm.noise_level(t)
    return Step(x, torch.tensor(t), alpha, sigma, 3, 10, gmm.eps(x, t, labels), gmm.eps(x, t, None), cond=labels,
                evaluate=lambda x_, c_: gmm.eps(x_, t, c_))


# ------------------------------------------------------------------------------------------------ rules
def test_reference_never_target_and_scale_rules(gen):
    gmm, _ = gmm_model()
    for trial in range(20):
        step = one_step(gen, gmm)
        logits = 3 * torch.randn(5, 3, generator=gen, dtype=F64)
        logits[trial % 5, step.cond[trial % 5]] += 10.0              # a row where the target dominates
        for name, rule in SCALE_RULES.items():
            guide = GFCG(fixed_logits(logits), scale=2.0, rule=name, temperature=0.5)
            ref, s = guide.reference(step)
            probs = torch.softmax(logits / 0.5, dim=1)
            p_y, p_r = probs[torch.arange(5), step.cond], probs[torch.arange(5), ref]
            assert (ref != step.cond).all()
            assert torch.equal(ref, oracle_reference(probs, step.cond))
            expected = {"confusion": p_r / (p_y + p_r), "deficit": 1 - p_y, "binary": (p_r >= p_y).double()}[name]
            assert torch.allclose(s, 2.0 * expected, atol=1e-12)


def test_gfcg_formula_against_reference(gen):
    """D = CFG(D_y, D_null) + s (D_y - D(x; c_ref)), checked in x0 space with independent GMM calls."""
    gmm, _ = gmm_model()
    step = one_step(gen, gmm)
    logits = torch.randn(5, 3, generator=gen, dtype=F64)
    guide = GFCG(fixed_logits(logits), scale=1.5, base=CFG(3.0))
    out = guide.combine(step).denoise
    ref = oracle_reference(torch.softmax(logits, 1), step.cond)
    probs = torch.softmax(logits, 1)
    p_y, p_r = probs[torch.arange(5), step.cond], probs[torch.arange(5), ref]
    s = (1.5 * p_r / (p_y + p_r)).view(-1, 1, 1, 1)
    x0 = lambda eps: (step.x - step.sigma * eps) / step.alpha  # noqa: E731
    d_y, d_u, d_ref = x0(step.pred_cond), x0(step.pred_uncond), x0(gmm.eps(step.x, 400, ref))
    expected = d_u + 3.0 * (d_y - d_u) + s * (d_y - d_ref)
    assert torch.allclose(x0(out), expected, atol=1e-10)
    assert torch.equal(guide.references[0], ref)


def test_zero_scale_is_exactly_the_base_guide_and_skips_the_reference_pass():
    gmm, plan, labels, null, x = gmm_problem(batch=6, steps=8)
    cfg_den = GuidedDenoiser(gmm.eps, CFG(3.0), labels, null)
    cfg_out = sample_ddim(cfg_den, x.clone(), plan, disable=True)
    clf = CountingClassifier(16)
    for guide in (GFCG(clf, scale=0.0, base=CFG(3.0)),
                  GFCG(clf, scale=2.0, base=CFG(3.0), rule=lambda p_y, p_r: torch.zeros_like(p_y))):
        den = GuidedDenoiser(gmm.eps, guide, labels, null)
        assert torch.equal(sample_ddim(den, x.clone(), plan, disable=True), cfg_out)
        assert den.rows == cfg_den.rows and (guide.scales == 0).all()


def test_classifier_once_per_step_in_inference_mode():
    gmm, plan, labels, null, x = gmm_problem(batch=6, steps=8)
    clf = CountingClassifier(16)
    guide = GFCG(clf, scale=2.0, base=CFG(3.0))
    den = GuidedDenoiser(gmm.eps, guide, labels, null)
    with torch.enable_grad():
        out = sample_ddim(den, x.clone().requires_grad_(True), plan, disable=True)
    assert len(clf.calls) == 8 == guide.classifier_calls
    assert all(not grad and not req and n == 6 for grad, req, n in clf.calls)  # no autograd, no graph inputs
    assert den.rows == 3 * 6 * 8                                 # cond + uncond + reference class
    assert (guide.references != labels).all() and guide.references.shape == (8, 6)
    assert torch.isfinite(out).all()
    # an active noise interval: the classifier runs only there, the base guide everywhere
    sigmas = plan.sigmas[:-1]
    lo, hi = float(sigmas[5]), float(sigmas[1])
    clf.calls.clear()
    guide = GFCG(clf, scale=2.0, base=CFG(3.0), sigma_lo=lo, sigma_hi=hi)
    den = GuidedDenoiser(gmm.eps, guide, labels, null)
    sample_ddim(den, x.clone(), plan, disable=True)
    active = int(((sigmas > lo) & (sigmas <= hi)).sum())
    assert len(clf.calls) == active == 4 and den.rows == 2 * 6 * 8 + 6 * active
    assert (guide.references[0] == -1).all()


# ---------------------------------------------------------------------------------------- autoguidance
def test_autoguidance_formula_and_rows():
    """pred = D0 + w (D1 - D0) with the same condition (edm2 `ref_Dx.lerp(Dx, w)`), no unconditional pass."""
    gmm, plan, labels, null, x = gmm_problem(batch=6, steps=8)
    weak, _ = gmm_model(seed=1, spread=0.8)

    class Lerp(Guidance):
        def needs_uncond(self, level, batch_size):
            return torch.zeros(batch_size, dtype=torch.bool)

        def combine(self, step):
            pred = weak.eps(step.x, step.t, step.cond).lerp(step.pred_cond, 2.5)
            return Guided(pred, pred)

    ref = sample_ddim(GuidedDenoiser(gmm.eps, Lerp(), labels, null), x.clone(), plan, disable=True)
    auto = Autoguidance(weak.eps, 2.5)
    den = GuidedDenoiser(gmm.eps, auto, labels, null)
    out = sample_ddim(den, x.clone(), plan, disable=True)
    assert torch.allclose(out, ref, atol=1e-12)
    assert den.rows == 6 * 8 == auto.guide_rows


# ----------------------------------------------------------------------------------------------- hook
def test_hook_step_cond_and_evaluate_match_direct_network_calls():
    """Inside guidance.apply the step carries the conditional half's labels / embeddings, and step.evaluate
    is one counted network pass equal to calling the network directly with another condition."""
    seen = {}

    class Probe(CFG):
        def combine(self, step):
            if step.index == 1:
                other = (step.cond + 1) % 10 if not step.cond.is_floating_point() else step.cond.flip(0)
                seen.update(cond=step.cond, x=step.x, t=step.t, other=other, out=step.evaluate(step.x, other))
                with pytest.raises(ValueError, match="shape"):
                    step.evaluate(step.x[:1], other[:1])
            return super().combine(step)

    pipe = class_pipe()
    rows, handle = count_rows(pipe.unet)
    with guidance.apply(pipe, Probe(2.0)) as stats:
        pipe(class_labels=[3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert seen["cond"].tolist() == [3, 7]
    direct = pipe.unet(seen["x"], seen["t"], class_labels=seen["other"]).sample
    assert torch.allclose(seen["out"], direct, atol=1e-6)
    assert stats.rows == 2 * 2 * 3 + 2 == sum(rows) and stats.rows_per_step == [4, 6, 4]

    sd = tiny_sd()
    with guidance.apply(sd, Probe(2.0)):
        sd(prompt=["a cat", "dog"], height=16, width=16, num_inference_steps=3)
    embeds, _ = sd.encode_prompt(["a cat", "dog"], "cpu", 1, False)
    assert torch.equal(seen["cond"], embeds)
    direct = sd.unet(seen["x"], seen["t"], encoder_hidden_states=seen["other"]).sample
    assert torch.allclose(seen["out"], direct, atol=1e-6)


def test_gfcg_through_apply_equals_our_sampler_loop():
    """GFCG + CFG on the class pipeline: the hook (extra pass via step.evaluate) and GuidedDenoiser agree."""
    pipe = class_pipe()
    clf = CountingClassifier(64, num_classes=10)
    labels, steps = [3, 7, 1], 4
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rows, handle = count_rows(pipe.unet)
    guide = GFCG(clf, scale=1.5, base=CFG(2.0))
    with guidance.apply(pipe, guide) as stats:
        hooked = pipe(class_labels=labels, num_inference_steps=steps, latents=noise.clone(), output_type="pt").images
    handle.remove()
    assert stats.rows == 3 * 3 * steps == sum(rows) and guide.classifier_calls == steps
    hooked_refs = guide.references.clone()
    den = GuidedDenoiser(diffusers_model_fn(pipe.unet), GFCG(clf, scale=1.5, base=CFG(2.0)), torch.tensor(labels),
                         torch.full((3,), 10))
    with torch.no_grad():
        ours = sample_ddim(den, noise.clone(), plan_from_scheduler(pipe.scheduler, steps), disable=True)
    assert torch.allclose(hooked, (ours / 2 + 0.5).clamp(0, 1), atol=1e-4)
    assert torch.equal(den.guide.references, hooked_refs) and den.rows == stats.rows


def test_gfcg_with_autoguidance_through_apply():
    pipe = class_pipe()
    weak = tiny_unet(seed=1)
    clf = CountingClassifier(64, num_classes=10)
    auto = Autoguidance(diffusers_model_fn(weak), 2.0)
    guide = GFCG(clf, scale=1.0, base=auto)
    with guidance.apply(pipe, guide) as stats:
        img = pipe(class_labels=[0, 5], num_inference_steps=3, output_type="pt").images
    assert stats.rows == 2 * 2 * 3                               # main network: target + reference class
    assert auto.guide_rows == 2 * 3 and torch.isfinite(img).all()
    # the reference class can be evaluated by the weak model instead (ATG's guiding network)
    guide = GFCG(clf, scale=1.0, base=Autoguidance(diffusers_model_fn(weak), 2.0),
                 reference_model=diffusers_model_fn(weak))
    with guidance.apply(pipe, guide) as stats:
        pipe(class_labels=[0, 5], num_inference_steps=3, output_type="pt")
    assert stats.rows == 2 * 3 and guide.reference_rows == 2 * 3


def test_gfcg_on_text_to_image_with_class_prompts():
    sd = tiny_sd()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    class_conds, _ = sd.encode_prompt([f"the digit {w}" for w in words], "cpu", 1, False)
    classifier = CountingClassifier(3 * 16 * 16, num_classes=10)
    guide = GFCG(classifier, scale=1.0, base=CFG(3.0), labels=torch.tensor([3, 8]), class_conds=class_conds,
                 decode=guidance.vae_decoder(sd.vae))
    with guidance.apply(sd, guide) as stats:
        img = sd(prompt=["the digit three", "the digit eight"], height=16, width=16, num_inference_steps=3).images
    assert stats.rows == 3 * 2 * 3 and len(classifier.calls) == 3 and len(img) == 2
    assert (guide.references != torch.tensor([3, 8])).all()
    with pytest.raises(ValueError, match="class_conds"):
        with guidance.apply(sd, GFCG(classifier, labels=torch.tensor([3, 8]), decode=guidance.vae_decoder(sd.vae))):
            sd(prompt=["a", "b"], height=16, width=16, num_inference_steps=2)


def test_gfcg_bad_input(gen):
    gmm, _ = gmm_model()
    step = one_step(gen, gmm)
    with pytest.raises(ValueError, match="logits"):
        GFCG(lambda images: torch.zeros(5)).combine(step)
    with pytest.raises(ValueError, match="logits"):
        GFCG(lambda images: torch.zeros(4, 3)).combine(step)
    with pytest.raises(ValueError, match="non-finite"):
        GFCG(lambda images: torch.full((5, 3), float("nan"))).combine(step)
    with pytest.raises(ValueError, match="scale rule"):
        GFCG(lambda images: torch.zeros(5, 3), rule=lambda p_y, p_r: -p_y).combine(step)
    with pytest.raises(ValueError, match="0..2"):
        GFCG(lambda images: torch.zeros(5, 3), labels=torch.tensor([0, 1, 2, 3, 0])).combine(step)
    step.evaluate = None
    with pytest.raises(ValueError, match="evaluate"):
        GFCG(lambda images: torch.randn(5, 3)).combine(step)
    with pytest.raises(TypeError, match="base"):
        GFCG(lambda images: images, base="cfg")
    with pytest.raises(ValueError, match="rule"):
        GFCG(lambda images: images, rule="margin")
    with pytest.raises(ValueError, match="sigma_hi"):
        GFCG(lambda images: images, sigma_lo=2.0, sigma_hi=1.0)
    with pytest.raises(TypeError, match="callable"):
        Autoguidance("weak.ckpt")
