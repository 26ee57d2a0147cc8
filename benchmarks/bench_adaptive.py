"""Adaptive and feedback-driven guidance on the shipped digits models: quality against UNet rows.

    python benchmarks/bench_adaptive.py                                          # the committed numbers
    python benchmarks/bench_adaptive.py --num-images 100 --seeds 0 --no-write    # a quick look

For ``digits-class`` and ``digits-t2i``: CFG over a grid of scales, Adaptive Guidance (AG), LinearAG (+AG),
dynamic CFG, GFCG alone, with CFG and (class model) with autoguidance from ``digits-class-weak``. Every
configuration is sampled from the same noise for each seed in ``--seeds``; the spread between seeds is the
run-to-run spread reported. The classifier that *guides* (GFCG, dynamic CFG's evaluators) is trained here with
another seed than the shipped ``digits-classifier`` that *judges* (accuracy, FID-digits features).

Dynamic CFG maximises, greedily per step and sample, ``J = alignment + weight * fidelity`` on the predicted
x0: alignment is ``log p_guide(y | x)`` (class model) or ``CLIP cos`` from ``digits-clip`` scaled by
``--clip-weight`` (t2i); fidelity is a Gaussian feature score of the guide classifier (``FeatureFidelity``).
``J`` of the final images is reported for every method, so dynamic CFG is compared with every fixed scale on
its own objective. Writes the ``adaptive`` section of BENCHMARKS.md and ``docs/bench_adaptive.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import torch
from accelerate import PartialState
from torch import Tensor
from tqdm.auto import tqdm

from diffguide import guidance
from diffguide.samplers import diffusers_model_fn
from common import save_figure, write_section
from diffguide.tasks import zoo
from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.digits import NUM_CLASSES, caption, load_digits_tensors
from diffguide.tasks.evaluation import image_labels, image_prompts, pipeline_kind, prepare_real
from diffguide.tasks.metrics import DEFAULT_CACHE, DigitFeatures, ImageMetrics
from diffguide.tasks.run_folder import image_seed
from diffguide.tasks.training import train_classifier

PLOT = "docs/bench_adaptive.png"
REFERENCE = {"digits-class": "CFG w=2", "digits-t2i": "CFG w=3"}  # the CFG run AG/LinearAG accelerate
MakeGuide = Callable[[list[int], "list[str] | None"], guidance.Guidance]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=300, help="images per configuration and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds (spread = between them)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--calibration-images", type=int, default=100, help="LinearAG calibration samples (own seed)")
    p.add_argument("--fidelity-weight", type=float, default=1.0, help="weight of fidelity in dynamic CFG's J")
    p.add_argument("--clip-weight", type=float, default=10.0, help="weight of CLIP cos in dynamic CFG's J (t2i)")
    p.add_argument("--models", nargs="*", default=["digits-class", "digits-t2i"], choices=["digits-class", "digits-t2i"],
                   help="models to run (none: only rebuild the report from saved results)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_adaptive"), help="cache of the guiding classifier")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md and the plot alone")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ objective
class FeatureFidelity:
    """``-(f - mu_y)^T Sigma^-1 (f - mu_y) / D`` for the guide classifier's features ``f``, with per-class means and
    the pooled covariance of the real train digits: a Gaussian stand-in for dynamic CFG's fidelity discriminator
    (about -1 on real digits of class ``y``, lower off the data)."""

    def __init__(self, classifier: DigitClassifier, ridge: float = 1e-3) -> None:
        images, labels = load_digits_tensors("train", 16)
        self.classifier = classifier
        with torch.no_grad():
            feats = classifier.features(images).double()
        self.means = torch.stack([feats[labels == k].mean(0) for k in range(NUM_CLASSES)])
        centered = feats - self.means[labels]
        cov = centered.T @ centered / len(feats)
        self.precision = torch.linalg.inv(cov + ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype))

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: list[int]) -> Tensor:
        diff = self.classifier.features(images).double() - self.means[torch.as_tensor(labels)]
        return -((diff @ self.precision) * diff).sum(1) / diff.shape[1]


def classifier_alignment(clf: DigitClassifier):
    """Per batch: ``images -> log p_clf(y | image)`` for the batch's labels."""
    def per_batch(labels: list[int], prompts: list[str] | None) -> Callable[[Tensor], Tensor]:
        confidence = guidance.ClassifierConfidence(clf, torch.tensor(labels))
        return lambda images: confidence(images, None)
    return per_batch


@dataclass
class Objective:
    """Dynamic CFG's ``J = alignment_weight * alignment + fidelity_weight * fidelity`` (images in [-1, 1])."""

    alignment: Callable[[list[int], "list[str] | None"], Callable[[Tensor], Tensor]]  # per batch -> scorer
    fidelity: FeatureFidelity
    alignment_weight: float
    fidelity_weight: float

    def evaluators(self, labels: list[int], prompts: list[str] | None) -> list[guidance.feedback.Evaluator]:
        align = self.alignment(labels, prompts)
        return [lambda images, step: align(images), lambda images, step: self.fidelity(images, labels)]

    def scores(self, images: Tensor, labels: list[int], prompts: list[str] | None) -> dict[str, Tensor]:
        align, fid = self.alignment(labels, prompts)(images).double(), self.fidelity(images, labels)
        return {"J": self.alignment_weight * align + self.fidelity_weight * fid, "alignment": align, "fidelity": fid}

    def dynamic(self, candidates: tuple[float, ...], decode=None) -> MakeGuide:
        return lambda labels, prompts: guidance.DynamicCFG(
            self.evaluators(labels, prompts), candidates, weights=[self.alignment_weight, self.fidelity_weight],
            normalize="none", decode=decode)


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    """One configuration: ``make(labels, prompts)`` builds the guide for a batch."""

    name: str
    group: str
    make: MakeGuide
    results: list[dict] = field(default_factory=list)


def guide_model_rows(guide: guidance.Guidance) -> int:
    """Rows run by an autoguidance guiding model (alone or as GFCG's base)."""
    for g in (guide, getattr(guide, "base", None)):
        if isinstance(g, guidance.Autoguidance):
            return g.guide_rows
    return 0


@torch.no_grad()
def sample(pipe, make: MakeGuide, indices: list[int], steps: int, seed: int):
    """Images in [0, 1], network rows (main + guiding model) and the guide of one batch."""
    kind = pipeline_kind(pipe)
    labels = image_labels(indices)
    prompts = image_prompts(indices) if kind == "text" else None
    size = pipe.unet.config.sample_size
    latents = torch.stack([torch.randn(pipe.unet.config.in_channels, size, size,
                                       generator=torch.Generator().manual_seed(image_seed(seed, i))) for i in indices])
    guide = make(labels, prompts)
    call = dict(num_inference_steps=steps, latents=latents, output_type="pt")
    with guidance.apply(pipe, guide) as stats:
        if kind == "class":
            images = pipe(class_labels=labels, **call).images
        else:
            side = size * pipe.vae_scale_factor
            images = pipe(prompt=prompts, height=side, width=side, **call).images
    return images.float(), stats.rows + guide_model_rows(guide), guide


def calibrated_linear_ag(pipe, scale: float, threshold: float, space: str, args, sample_fn=None) -> guidance.LinearAG:
    """LinearAG fitted on full-CFG runs from a seed no benchmark run uses (``sample_fn``: this module's
    ``sample`` or another benchmark's, same signature)."""
    sample_fn = sample if sample_fn is None else sample_fn
    guide = guidance.LinearAG(scale, threshold=threshold, space=space)
    with guide.calibration():
        for start in range(0, args.calibration_images, args.batch_size):
            chunk = list(range(start, min(start + args.batch_size, args.calibration_images)))
            sample_fn(pipe, lambda labels, prompts: guide, chunk, args.steps, seed=10_000)
    guide.fit()
    return guide


CLASS_SCALES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
T2I_SCALES = (1.0, 2.0, 3.0, 4.0, 5.0)
THRESHOLDS = (0.99, 0.995, 0.998, 0.999)


def class_methods(pipe, weak, clf, objective: Objective, args) -> list[Method]:
    G = guidance  # noqa: N806
    w = 2.0
    weak_fn = diffusers_model_fn(weak.unet)
    lag = calibrated_linear_ag(pipe, w, 0.998, "x0", args)
    methods = [Method(f"CFG w={s:g}", "CFG", lambda l, p, s=s: G.CFG(s)) for s in CLASS_SCALES]
    methods += [Method(f"AG w={w:g} γ̄={t:g}", "AG", lambda l, p, t=t: G.AdaptiveGuidance(w, t)) for t in THRESHOLDS]
    methods.append(Method(f"LinearAG w={w:g} γ̄=0.998", "LinearAG", lambda l, p: lag))
    methods.append(Method("autoguidance w=2", "ATG", lambda l, p: G.Autoguidance(weak_fn, 2.0)))
    for s in (1.0, 2.0):
        methods.append(Method(f"GFCG s={s:g}", "GFCG", lambda l, p, s=s: G.GFCG(clf, s)))
        methods.append(Method(f"GFCG s={s:g} + CFG w={w:g}", "GFCG+CFG", lambda l, p, s=s: G.GFCG(clf, s, base=G.CFG(w))))
    methods.append(Method("GFCG s=1 + ATG w=2", "GFCG+ATG",
                          lambda l, p: G.GFCG(clf, 1.0, base=G.Autoguidance(weak_fn, 2.0))))
    methods.append(Method("dynamic CFG, S = CFG grid", "dynamic", objective.dynamic(CLASS_SCALES)))
    return methods


def t2i_methods(pipe, clf, objective: Objective, args) -> list[Method]:
    G = guidance  # noqa: N806
    w = 3.0
    decode = G.vae_decoder(pipe.vae)
    class_conds, _ = pipe.encode_prompt([caption(k) for k in range(NUM_CLASSES)], pipe.device, 1, False)
    lag = calibrated_linear_ag(pipe, w, 0.998, "x0", args)
    methods = [Method(f"CFG w={s:g}", "CFG", lambda l, p, s=s: G.CFG(s)) for s in T2I_SCALES]
    methods += [Method(f"AG w={w:g} γ̄={t:g}", "AG", lambda l, p, t=t: G.AdaptiveGuidance(w, t)) for t in THRESHOLDS]
    methods.append(Method(f"LinearAG w={w:g} γ̄=0.998", "LinearAG", lambda l, p: lag))
    for s in (1.0, 2.0):
        methods.append(Method(f"GFCG s={s:g}", "GFCG", lambda l, p, s=s: G.GFCG(
            clf, s, labels=torch.tensor(l), class_conds=class_conds, decode=decode)))
        methods.append(Method(f"GFCG s={s:g} + CFG w={w:g}", "GFCG+CFG", lambda l, p, s=s: G.GFCG(
            clf, s, base=G.CFG(w), labels=torch.tensor(l), class_conds=class_conds, decode=decode)))
    methods.append(Method("dynamic CFG, S = CFG grid", "dynamic", objective.dynamic(T2I_SCALES, decode)))
    return methods


# ------------------------------------------------------------------------------------------ running
def run_method(pipe, method: Method, args, make_metrics, objective: Objective, progress: bool) -> None:
    kind = pipeline_kind(pipe)
    for seed in args.seeds:
        metrics = make_metrics()
        rows, own, schedules = 0, {}, []
        indices = list(range(args.num_images))
        bar = tqdm(total=len(indices), desc=f"{method.name} seed {seed}", disable=not progress, unit="img")
        for start in range(0, len(indices), args.batch_size):
            chunk = indices[start:start + args.batch_size]
            images, batch_rows, guide = sample(pipe, method.make, chunk, args.steps, seed)
            rows += batch_rows
            labels = image_labels(chunk)
            prompts = image_prompts(chunk) if kind == "text" else None
            metrics.update(images, labels=labels, prompts=prompts)
            for key, value in objective.scores(images * 2 - 1, labels, prompts).items():
                own.setdefault(key, []).append(value)
            if isinstance(guide, guidance.DynamicCFG):
                schedules.append(guide.schedule)
            bar.update(len(chunk))
        bar.close()
        result = metrics.compute() | {key: float(torch.cat(v).mean()) for key, v in own.items()}
        result["J_per_image"] = torch.cat(own["J"])
        result["rows_per_image"] = rows / len(indices)
        if schedules:
            result["schedule"] = torch.cat(schedules, dim=1).mean(1).tolist()
        method.results.append(result)


# ------------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (the run-to-run spread)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def cell(method: Method, key: str, digits: int) -> str:
    values = [r[key] for r in method.results if key in r]
    if not values:
        return "–"
    mean, half = spread(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def rows_of(method: Method) -> float:
    return statistics.fmean(r["rows_per_image"] for r in method.results)


def table(methods: list[Method], reference: str, clip: bool) -> str:
    base = rows_of(next(m for m in methods if m.name == reference))
    head = ("| method | UNet rows / image | rows vs " + reference + " | FID-digits ↓ | accuracy ↑ | "
            + ("CLIP score ↑ | " if clip else "") + "J (dynamic CFG's objective) ↑ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        lines.append(f"| {m.name} | {rows_of(m):.1f} | {rows_of(m) / base:.2f} | {cell(m, 'fid', 2)} | "
                     f"{cell(m, 'accuracy', 3)} | " + (f"{cell(m, 'clip_score', 2)} | " if clip else "")
                     + f"{cell(m, 'J', 3)} |")
    return "\n".join(lines)


def dynamic_vs_fixed(methods: list[Method]) -> str:
    """Dynamic CFG against the best fixed CFG scale (by mean J) on J, paired over the same noises."""
    dynamic = next(m for m in methods if m.group == "dynamic")
    fixed = [m for m in methods if m.group == "CFG"]
    best = max(fixed, key=lambda m: statistics.fmean(r["J"] for r in m.results))
    diff = torch.cat([d["J_per_image"] - f["J_per_image"] for d, f in zip(dynamic.results, best.results)])
    se = float(diff.std() / len(diff) ** 0.5)
    wins = float((diff > 0).double().mean())
    return (f"Dynamic CFG vs the best fixed scale on its own objective ({best.name}): ΔJ = {float(diff.mean()):+.4f} "
            f"± {2 * se:.4f} (mean ± 2 s.e., paired over {len(diff)} images with the same noise; dynamic better on "
            f"{wins:.0%} of them), at the same UNet rows.")


STYLE = {"CFG": ("o", "C0"), "AG": ("s", "C1"), "LinearAG": ("D", "C2"), "ATG": ("^", "C3"), "GFCG": ("v", "C4"),
         "GFCG+CFG": ("P", "C5"), "GFCG+ATG": ("X", "C6"), "dynamic": ("*", "C7")}
LABELS = {"fid": "FID-digits", "accuracy": "classifier accuracy", "clip_score": "CLIP score"}


def plot(results: dict[str, list[Method]], path: Path) -> None:
    """One row per model (FID, accuracy, CLIP score against UNet rows) and the dynamic CFG schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 4, figsize=(16, 3.4 * len(results)), squeeze=False)
    for row, (model, methods) in zip(axes, results.items()):
        keys = [key for key in LABELS if key in methods[0].results[0]]
        for ax, key in zip(row, keys):
            for group in dict.fromkeys(m.group for m in methods):
                members = [m for m in methods if m.group == group]
                pts = [(rows_of(m), *spread([r[key] for r in m.results])) for m in members]
                marker, color = STYLE[group]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            color=color, linestyle="none", capsize=2, label=group)
                if group == "CFG":
                    for m, p in zip(members, pts):
                        ax.annotate(m.name.split()[-1], p[:2], fontsize=6, xytext=(3, 0), textcoords="offset points")
            ax.set_xlabel("UNet rows per image")
            ax.set_ylabel(LABELS[key])
            ax.set_title(model, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
        ax = row[-1]
        for m in methods:
            if m.group == "dynamic":
                sched = torch.tensor([r["schedule"] for r in m.results]).mean(0)
                ax.plot(range(len(sched)), sched, marker=".", color=STYLE["dynamic"][1])
        ax.set_xlabel("step")
        ax.set_ylabel("mean chosen CFG scale")
        ax.set_title(f"{model}: dynamic CFG schedule", fontsize=9)
        ax.grid(alpha=0.3)
        for extra in row[len(keys):-1]:
            extra.axis("off")
    save_figure(fig, path)


def findings(methods: list[Method], reference: str) -> str:
    """The paper goals, read off the table: AG's saving at its quality, GFCG against CFG at the nearest FID."""
    def mean(m: Method, key: str) -> float:
        return statistics.fmean(r[key] for r in m.results)

    ref = next(m for m in methods if m.name == reference)
    keys = [key for key in LABELS if key in ref.results[0]]
    lines = []
    for m in methods:
        if m.group in ("AG", "LinearAG"):
            diffs = ", ".join(f"{LABELS[k]} {mean(m, k) - mean(ref, k):+.3f} (spread ±{cell(ref, k, 3).split('± ')[-1]})"
                              for k in keys)
            lines.append(f"- {m.name}: {1 - rows_of(m) / rows_of(ref):.0%} fewer UNet rows than {reference}; {diffs}.")
    cfg = [m for m in methods if m.group == "CFG"]
    for m in methods:
        if m.group == "GFCG":
            near = min(cfg, key=lambda c: abs(mean(c, "fid") - mean(m, "fid")))
            lines.append(f"- {m.name} ({rows_of(m):.0f} rows): FID {mean(m, 'fid'):.2f}, accuracy "
                         f"{mean(m, 'accuracy'):.3f}; CFG at the nearest FID ({near.name}, {rows_of(near):.0f} rows): "
                         f"FID {mean(near, 'fid'):.2f}, accuracy {mean(near, 'accuracy'):.3f}.")
    return "\n".join(lines)


def guide_classifier(work: Path, progress: bool) -> DigitClassifier:
    """A digit classifier trained with another seed than the shipped judge; cached in ``work``."""
    folder = work / "guide-classifier-seed1"
    if not (folder / "config.json").exists():
        train_classifier(folder, seed=1, progress=progress)
    return DigitClassifier.from_pretrained(folder).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    progress = not args.no_progress
    judge = zoo.load("digits-classifier")
    feature = DigitFeatures(judge)
    clf = guide_classifier(Path(args.work), progress)
    fidelity = FeatureFidelity(clf)
    clip = tuple(zoo.load("digits-clip")) if "digits-t2i" in args.models else None
    state = PartialState()
    work = Path(args.work)
    for model in args.models:
        pipe = zoo.load(model)
        pipe.set_progress_bar_config(disable=True)
        kind = pipeline_kind(pipe)
        names = ["fid", "accuracy"] + (["clip_score"] if kind == "text" else [])

        def make_metrics(names=names):
            metrics = ImageMetrics(names, feature=feature, classifier=judge, clip=clip)
            prepare_real(metrics, "digits-train", 16, DEFAULT_CACHE, feature, state)
            return metrics

        model_start = time.perf_counter()
        if kind == "class":
            objective = Objective(classifier_alignment(clf), fidelity, 1.0, args.fidelity_weight)
            methods = class_methods(pipe, zoo.load("digits-class-weak"), clf, objective, args)
        else:
            objective = Objective(lambda labels, prompts: guidance.ClipAlignment.from_prompts(clip[0], clip[2], prompts),
                                  fidelity, args.clip_weight, args.fidelity_weight)
            methods = t2i_methods(pipe, clf, objective, args)
        for method in methods:
            run_method(pipe, method, args, make_metrics, objective, progress)
        print(f"\n{model}\n" + table(methods, REFERENCE[model], kind == "text") + "\n\n" + dynamic_vs_fixed(methods),
              flush=True)
        work.mkdir(parents=True, exist_ok=True)
        torch.save({"protocol": protocol_key(args), "minutes": (time.perf_counter() - model_start) / 60,
                    "methods": [(m.name, m.group, m.results) for m in methods]}, work / f"{model}.pt")
    if not args.no_write:
        report(args, work)


def protocol_key(args) -> dict:
    return {k: getattr(args, k) for k in ("num_images", "seeds", "steps", "calibration_images", "fidelity_weight",
                                          "clip_weight")}


def report(args, work: Path) -> None:
    """The ``adaptive`` section and plot from the saved results of every model run with this protocol."""
    results: dict[str, list[Method]] = {}
    minutes = 0.0
    for model in REFERENCE:
        path = work / f"{model}.pt"
        saved = torch.load(path, weights_only=True) if path.exists() else None  # tensors, numbers, strings
        if saved is None or saved["protocol"] != protocol_key(args):
            print(f"no results of {model} with this protocol in {work}; run it with --models {model}")
            continue
        results[model] = [Method(name, group, None, res) for name, group, res in saved["methods"]]
        minutes += saved["minutes"]
    if not results:
        return
    plot(results, ROOT / PLOT)
    protocol = (
        f"{args.num_images} images per configuration and seed, seeds {args.seeds} (cells: mean ± half the range over "
        f"seeds, the run-to-run spread), DDIM {args.steps} steps, labels i mod 10 (t2i: captions cycling the 6 "
        f"templates). FID-digits against the digits train split in `digits-classifier` features; accuracy by "
        f"`digits-classifier`; CLIP score (100·cos) by `digits-clip`. GFCG and dynamic CFG are guided by a second "
        f"digit classifier trained with another seed (not the judge). UNet rows per image include the weak model's "
        f"rows for autoguidance. AG: cosine of the x0 estimates. LinearAG: calibrated on "
        f"{args.calibration_images} full-CFG samples of another seed; replaces every other unconditional pass in "
        f"the first half, AG (γ̄ 0.998) after. Dynamic CFG: greedy per step and sample over S (the CFG grid), "
        f"maximising J = alignment + {args.fidelity_weight:g}·fidelity (alignment = log p_guide(y∣x0) for "
        f"digits-class, {args.clip_weight:g}·CLIP cos for digits-t2i; fidelity = Gaussian feature score of the guide "
        f"classifier, ≈ -1 on real digits); the J column is that objective on the final images of every method.")
    parts = ["## Adaptive and feedback-driven guidance (`benchmarks/bench_adaptive.py`)", protocol]
    for model, methods in results.items():
        parts += [f"### {model}", table(methods, REFERENCE[model], model == "digits-t2i"),
                  findings(methods, REFERENCE[model]), dynamic_vs_fixed(methods)]
    parts += [f"![quality vs UNet rows]({PLOT})", f"Wall time: {minutes:.1f} min (2 shared CPU cores)."]
    write_section("adaptive", "\n\n".join(parts))


if __name__ == "__main__":
    main()
