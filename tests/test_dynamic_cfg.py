"""Dynamic CFG: greedy per-step scale choice vs brute force, monotone evaluators, cost, evaluators, errors."""

import json

import pytest
import torch

from diffguide import guidance
from diffguide.guidance import ClassifierConfidence, ClipAlignment, DynamicCFG, GuidedDenoiser
from guide_models import F64, gmm_problem
from diffguide.samplers import sample_ddim
from tiny_pipes import tiny_sd

CANDIDATES = (1.0, 1.5, 2.0, 3.0, 5.0)


def guidance_direction(images, step):
    """<image, x0_c - x0_u>: strictly increasing in the candidate scale (no clamping)."""
    d = step.x0(step.pred_cond) - step.x0(step.pred_uncond)
    return (images * d).flatten(1).sum(1)


class Recording(DynamicCFG):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def combine(self, step):
        self.steps.append(step)
        return super().combine(step)


def run(guide, batch=6, steps=8, seed=0):
    gmm, plan, labels, null, x = gmm_problem(batch=batch, steps=steps, seed=seed)
    den = GuidedDenoiser(gmm.eps, guide, labels, null)
    return sample_ddim(den, x, plan, disable=True), den, gmm, labels


@pytest.mark.parametrize("sign,expected", [(1.0, max(CANDIDATES)), (-1.0, min(CANDIDATES))])
def test_monotone_evaluator_gives_constant_extreme_schedule(sign, expected):
    guide = Recording(lambda images, step: sign * guidance_direction(images, step), CANDIDATES, clip=False)
    _, den, _, _ = run(guide)
    assert guide.schedule.shape == (8, 6)
    # where x0_c and x0_u coincide (the exact GMM at low noise) all candidates give the same image
    gap = torch.stack([(s.x0(s.pred_cond) - s.x0(s.pred_uncond)).flatten(1).norm(dim=1) for s in guide.steps])
    distinct = gap > 1e-6
    assert distinct[:5].all()
    assert (guide.schedule[distinct] == expected).all()
    assert den.rows == 2 * 6 * 8                                # no extra network pass
    assert guide.evaluator_calls == 8 * len(CANDIDATES)         # one call per candidate per step


def test_gmm_class_posterior_greedy_equals_brute_force_argmax():
    """Evaluator log p(c | x0) of the exact GMM; at every recorded step an independent brute force over the
    candidates (x0 from the raw predictions, closed-form class posterior) picks the same scale."""
    gmm, *_ = gmm_problem()

    def log_posterior(x0, labels):
        flat = x0.reshape(x0.shape[0], -1).double()
        logp = torch.stack([gmm.mixture(k).log_prob(flat) for k in range(gmm.num_classes)], dim=1)
        return torch.log_softmax(logp, dim=1)[torch.arange(len(labels)), labels]

    guide = Recording(lambda images, step: log_posterior(images, step.cond), CANDIDATES, clip=False)
    out, _, _, labels = run(guide)
    for i, step in enumerate(guide.steps):
        scores = []
        for s in CANDIDATES:
            eps = step.pred_uncond + s * (step.pred_cond - step.pred_uncond)
            scores.append(log_posterior((step.x - step.sigma * eps) / step.alpha, labels))
        best = torch.tensor(CANDIDATES, dtype=F64)[torch.stack(scores).argmax(0)]
        assert torch.equal(guide.schedule[i], best), i
    assert len(set(guide.schedule.flatten().tolist())) > 1      # the schedule is really dynamic here
    # determinism: same seed, same schedule and samples
    again = Recording(lambda images, step: log_posterior(images, step.cond), CANDIDATES, clip=False)
    out2, *_ = run(again)
    assert torch.equal(again.schedule, guide.schedule) and torch.equal(out, out2)


def test_weights_normalisation_batch_choice_and_warmup():
    up = lambda images, step: guidance_direction(images, step)  # noqa: E731
    down = lambda images, step: -1000.0 * guidance_direction(images, step)  # noqa: E731
    # z-scored, the evaluators count by their weights only: 3 z(up) - z(up) -> the largest scale
    guide = Recording([up, down], CANDIDATES, weights=[3.0, 1.0], clip=False)
    run(guide)
    distinct = torch.stack([(s.x0(s.pred_cond) - s.x0(s.pred_uncond)).flatten(1).norm(dim=1)
                            for s in guide.steps]) > 1e-6
    assert (guide.schedule[distinct] == max(CANDIDATES)).all()
    # unnormalised, the large-magnitude evaluator wins
    guide = Recording([up, down], CANDIDATES, weights=[3.0, 1.0], normalize="none", clip=False)
    run(guide)
    assert (guide.schedule[distinct] == min(CANDIDATES)).all()
    # time-varying weights: the first half follows `up`, the second half `down`
    guide = DynamicCFG([up, down], CANDIDATES, weights=lambda i, n: [1.0, 0.0] if i < n // 2 else [0.0, 1.0],
                       clip=False)
    run(guide)
    assert (guide.schedule[:4] == 5.0).all() and (guide.schedule[4:][distinct[4:]] == 1.0).all()
    # per-batch choice and warm-up without evaluator calls
    rand = lambda images, step: torch.randn(images.shape[0], generator=torch.Generator().manual_seed(step.index))  # noqa
    guide = DynamicCFG(rand, CANDIDATES, per_sample=False, warmup_steps=3, warmup_scale=2.0)
    run(guide)
    assert (guide.schedule[:3] == 2.0).all() and guide.evaluator_calls == 5 * len(CANDIDATES)
    assert (guide.schedule == guide.schedule[:, :1]).all()


def test_classifier_confidence_matches_log_softmax(gen):
    weight = torch.randn(10, 16, generator=gen)
    classifier = lambda images: images.flatten(1) @ weight.T  # noqa: E731
    images = torch.rand(5, 1, 4, 4, generator=gen) * 2 - 1
    labels = torch.tensor([0, 3, 9, 2, 2])
    step = type("S", (), {"cond": labels})()
    ref = torch.log_softmax(images.flatten(1) @ weight.T / 2.0, dim=1)[torch.arange(5), labels]
    assert torch.allclose(ClassifierConfidence(classifier, temperature=2.0)(images, step), ref, atol=1e-6)
    assert torch.allclose(ClassifierConfidence(classifier, labels=labels, temperature=2.0)(images, None), ref,
                          atol=1e-6)
    with pytest.raises(ValueError, match="target labels"):
        ClassifierConfidence(classifier)(images, type("S", (), {"cond": torch.randn(5, 7)})())


def tiny_clip(tmp_path):
    from diffguide.tasks.clip import CONFIG, create

    path = tmp_path / "dyncfg-test-clip.json"
    path.write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    return create("dyncfg-test-clip", path)


def test_clip_alignment_matches_open_clip_preprocess(tmp_path, gen):
    from torchvision.transforms.functional import to_pil_image

    model, preprocess, tokenizer = tiny_clip(tmp_path)
    model.eval()
    prompts = ["a handwritten digit three", "the number 7"]
    images = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    score = ClipAlignment.from_prompts(model, tokenizer, prompts)(images)
    pil = [to_pil_image(((img.expand(3, -1, -1) + 1) / 2 * 255).round().byte()) for img in images]
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text = model.encode_text(tokenizer(prompts), normalize=True)
    assert torch.allclose(score, (emb * text).sum(-1), atol=1e-2)
    with pytest.raises(ValueError, match="prompts"):
        ClipAlignment.from_prompts(model, tokenizer, ["one"])(images)


def test_dynamic_cfg_on_latent_pipeline_with_vae_decode_and_clip(tmp_path):
    """Through guidance.apply on a latent SD pipeline: decode with the VAE, score with CLIP, no extra UNet rows."""
    model, _, tokenizer = tiny_clip(tmp_path)
    pipe = tiny_sd()
    prompts = ["a cat", "dog"]
    decodes = []
    decode = guidance.vae_decoder(pipe.vae)
    guide = DynamicCFG(ClipAlignment.from_prompts(model, tokenizer, prompts), (1.0, 3.0, 7.0),
                       decode=lambda z: decodes.append(z.shape[0]) or decode(z))
    with guidance.apply(pipe, guide) as stats:
        img = pipe(prompt=prompts, height=16, width=16, num_inference_steps=4, output_type="pt").images
    assert stats.rows == 2 * 2 * 4 and guide.schedule.shape == (4, 2)
    assert guide.evaluator_calls == 4 * 3 and decodes == [2] * 12 and torch.isfinite(img).all()
    assert set(guide.schedule.flatten().tolist()) <= {1.0, 3.0, 7.0}


def test_dynamic_cfg_bad_input():
    ok = lambda images, step: images.flatten(1).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="at least one scale"):
        DynamicCFG(ok, candidates=[])
    with pytest.raises(ValueError, match="at least one evaluator"):
        DynamicCFG([], CANDIDATES)
    with pytest.raises(TypeError, match="callables"):
        DynamicCFG([ok, "clip"], CANDIDATES)
    with pytest.raises(ValueError, match="distinct"):
        DynamicCFG(ok, [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        DynamicCFG(ok, [1.0, float("nan")])
    with pytest.raises(ValueError, match="one per evaluator"):
        DynamicCFG(ok, CANDIDATES, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="normalize"):
        DynamicCFG(ok, CANDIDATES, normalize="rank")
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        run(DynamicCFG(lambda images, step: images.flatten(1).sum(1, keepdim=True), CANDIDATES))
    with pytest.raises(ValueError, match="non-finite"):
        run(DynamicCFG(lambda images, step: torch.full((images.shape[0],), float("nan")), CANDIDATES))
    with pytest.raises(TypeError, match="tensor"):
        run(DynamicCFG(lambda images, step: [0.0] * images.shape[0], CANDIDATES))
