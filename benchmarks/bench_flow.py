"""Every CFG-family guide on the rectified-flow ``digits-flow`` (``StableDiffusion3Pipeline``) model.

    python benchmarks/bench_flow.py                                   # 300 images x 2 seeds, 20 steps
    python benchmarks/bench_flow.py --num-images 200 --batch-size 100 --calibration-images 100          # committed
    python benchmarks/bench_flow.py --num-images 100 --seeds 0 --no-write --guides CFG APG

Per guide, a grid of scales at the same steps and noises (flow-matching Euler, the model's own scheduler):
accuracy of the shipped ``digits-classifier`` on the samples, FID-digits against the 360 held-out test
digits, CLIP score under ``digits-clip`` and transformer rows per image (counted by ``guidance.apply``).
Cells are mean ± standard error over ``--seeds`` (each seed: other noises for the same prompts). AG, LinearAG,
dynamic CFG and GFCG follow ``benchmarks/bench_adaptive.py`` (its dynamic-CFG objective and guide classifier).
The pipeline's 256 zero T5 tokens are counted in one (``counted_t5_zeros``, exact to float rounding).
Writes the ``flow`` section of BENCHMARKS.md and ``docs/bench_flow.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from diffguide import guidance
from common import save_figure, write_section
from bench_adaptive import (FeatureFidelity, MakeGuide, Method, Objective, calibrated_linear_ag,
                                              guide_classifier)
from diffguide.tasks import zoo
from diffguide.tasks.digits import NUM_CLASSES, caption
from diffguide.tasks.evaluation import image_labels, image_prompts, prepare_real
from diffguide.tasks.metrics import DEFAULT_CACHE, DigitFeatures, ImageMetrics
from diffguide.tasks.run_folder import image_seed
from diffguide.tasks.training_flow import counted_t5_zeros

ROOT = Path(__file__).resolve().parents[1]
PLOT = "docs/bench_flow.png"
MODEL = "digits-flow"
CFG_SCALES = (1.0, 2.0, 3.0, 4.0, 5.0)
REFERENCE_SCALE = 3.0                     # the CFG scale AG / LinearAG / GFCG build on
THRESHOLDS = (0.99, 0.995, 0.998)
GUIDES = ("CFG", "CFG++", "APG", "CFG-Zero*", "Rectified-CFG++", "CFGRescale", "AG", "LinearAG", "dynamic CFG", "GFCG")
LABELS = {"accuracy": "classifier accuracy", "fid": "FID-digits (vs test split)", "clip_score": "CLIP score"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=300, help="images per configuration and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=20, help="flow-matching Euler steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--calibration-images", type=int, default=100, help="LinearAG calibration samples (own seed)")
    p.add_argument("--fidelity-weight", type=float, default=1.0, help="weight of fidelity in dynamic CFG's J")
    p.add_argument("--clip-weight", type=float, default=10.0, help="weight of CLIP cos in dynamic CFG's J")
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_adaptive"), help="cache of the guiding classifier")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md and the plot alone")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_images <= 0 or args.steps <= 0 or args.batch_size <= 0:
        p.error("--num-images, --steps and --batch-size must be positive")
    return args


@torch.no_grad()
def sample(pipe, make: MakeGuide, indices: list[int], steps: int, seed: int):
    """Images in [0, 1], transformer rows and the guide of one batch; noise of image i from ``image_seed``."""
    labels, prompts = image_labels(indices), image_prompts(indices)
    config = pipe.transformer.config
    latents = torch.stack([torch.randn(config.in_channels, config.sample_size, config.sample_size,
                                       generator=torch.Generator().manual_seed(image_seed(seed, i))) for i in indices])
    guide = make(labels, prompts)
    with counted_t5_zeros(pipe.transformer), guidance.apply(pipe, guide) as stats:
        images = pipe(prompt=prompts, num_inference_steps=steps, latents=latents, output_type="pt",
                      max_sequence_length=1).images
    return images.float(), stats.rows, guide


def methods_for(pipe, names: list[str], clf, objective: Objective, args) -> list[Method]:
    """The grid: (label, group, scale, guide factory); ``scale`` is the x of the scale plot."""
    G = guidance  # noqa: N806
    w = REFERENCE_SCALE
    grid: list[Method] = []

    def add(group: str, scale: float, label: str, make: MakeGuide) -> None:
        method = Method(label, group, make)
        method.scale = scale
        grid.append(method)

    for s in CFG_SCALES if "CFG" in names else ():
        add("CFG", s, f"CFG w={s:g}", lambda l, p, s=s: G.CFG(s))
    for lam in (0.2, 0.4, 0.6, 0.8) if "CFG++" in names else ():
        add("CFG++", lam, f"CFG++ λ={lam:g}", lambda l, p, lam=lam: G.CFGPlusPlus(lam))
    for s in (2.0, 3.0, 5.0, 7.0) if "APG" in names else ():
        add("APG", s, f"APG w={s:g}", lambda l, p, s=s: G.APG(s))
    for s in (2.0, 3.0, 5.0) if "CFG-Zero*" in names else ():
        add("CFG-Zero*", s, f"CFG-Zero* w={s:g}", lambda l, p, s=s: G.CFGZeroStar(s))
    for lam in (1.0, 2.0, 4.0) if "Rectified-CFG++" in names else ():  # lambda ~ CFG's w - 1
        add("Rectified-CFG++", lam + 1, f"Rectified-CFG++ λ={lam:g}", lambda l, p, lam=lam: G.RectifiedCFGPlusPlus(lam))
    for s in (3.0, 5.0, 7.0) if "CFGRescale" in names else ():
        add("CFGRescale", s, f"CFGRescale w={s:g} φ=0.7", lambda l, p, s=s: G.CFGRescale(s))
    for t in THRESHOLDS if "AG" in names else ():
        add("AG", w, f"AG w={w:g} γ̄={t:g}", lambda l, p, t=t: G.AdaptiveGuidance(w, t))
    if "LinearAG" in names:
        lag = calibrated_linear_ag(pipe, REFERENCE_SCALE, 0.998, "x0", args, sample)
        add("LinearAG", w, f"LinearAG w={w:g} γ̄=0.998", lambda l, p: lag)
    if "dynamic CFG" in names:
        add("dynamic CFG", w, "dynamic CFG, S = CFG grid", objective.dynamic(CFG_SCALES, G.vae_decoder(pipe.vae)))
    if "GFCG" in names:
        decode = G.vae_decoder(pipe.vae)
        with counted_t5_zeros(pipe.transformer):
            class_conds = pipe.encode_prompt([caption(k) for k in range(NUM_CLASSES)], None, None,
                                             do_classifier_free_guidance=False, max_sequence_length=1)[0]
        for s in (1.0, 2.0):
            add("GFCG", w, f"GFCG s={s:g} + CFG w={w:g}", lambda l, p, s=s: G.GFCG(
                clf, s, base=G.CFG(w), labels=torch.tensor(l), class_conds=class_conds, decode=decode))
    return grid


def run(pipe, method: Method, args, make_metrics, progress: bool) -> None:
    for seed in args.seeds:
        metrics, rows = make_metrics(), 0
        indices = list(range(args.num_images))
        bar = tqdm(total=len(indices), desc=f"{method.name} seed {seed}", disable=not progress, unit="img")
        for start in range(0, len(indices), args.batch_size):
            chunk = indices[start:start + args.batch_size]
            images, batch_rows, _ = sample(pipe, method.make, chunk, args.steps, seed)
            rows += batch_rows
            metrics.update(images, labels=image_labels(chunk), prompts=image_prompts(chunk))
            bar.update(len(chunk))
        bar.close()
        method.results.append(metrics.compute() | {"rows_per_image": rows / len(indices)})


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (0 for one seed)."""
    if len(values) < 2:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def cell(method: Method, key: str, digits: int) -> str:
    mean, se = mean_se([r[key] for r in method.results])
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def value(method: Method, key: str) -> float:
    return statistics.fmean(r[key] for r in method.results)


def table(methods: list[Method]) -> str:
    lines = ["| guide | scale | rows / image | accuracy ↑ | FID-digits ↓ | CLIP score ↑ |", "|---|---|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m.name} | {m.scale:g} | {value(m, 'rows_per_image'):.1f} | {cell(m, 'accuracy', 3)} | "
                     f"{cell(m, 'fid', 2)} | {cell(m, 'clip_score', 2)} |")
    return "\n".join(lines)


def findings(methods: list[Method]) -> str:
    """Each paper's claim against the table (CFG at the same scale, or the reference CFG run)."""
    cfg = {m.scale: m for m in methods if m.group == "CFG"}
    lines = []

    def versus(m: Method, ref: Method) -> str:
        return (f"accuracy {value(m, 'accuracy'):.3f} vs {value(ref, 'accuracy'):.3f}, FID {value(m, 'fid'):.2f} vs "
                f"{value(ref, 'fid'):.2f}, CLIP {value(m, 'clip_score'):.2f} vs {value(ref, 'clip_score'):.2f}")

    for group in ("CFG-Zero*", "APG", "CFGRescale"):
        for m in (m for m in methods if m.group == group and m.scale in cfg):
            lines.append(f"- {m.name} vs CFG w={m.scale:g}: {versus(m, cfg[m.scale])}.")
    if REFERENCE_SCALE in cfg:
        ref = cfg[REFERENCE_SCALE]
        for m in (m for m in methods if m.group in ("AG", "LinearAG", "GFCG", "dynamic CFG")):
            saving = 1 - value(m, "rows_per_image") / value(ref, "rows_per_image")
            lines.append(f"- {m.name}: {saving:+.0%} rows saved vs {ref.name}; {versus(m, ref)}.")
    for m in (m for m in methods if m.group == "Rectified-CFG++" and m.scale in cfg):
        lines.append(f"- {m.name} vs CFG w={m.scale:g} (its small-step limit): {versus(m, cfg[m.scale])}; rows "
                     f"{value(m, 'rows_per_image'):.0f} vs {value(cfg[m.scale], 'rows_per_image'):.0f}.")
    for m in (m for m in methods if m.group == "CFG++"):
        near = min(cfg.values(), key=lambda c: abs(value(c, "clip_score") - value(m, "clip_score")), default=None)
        if near is not None:
            lines.append(f"- {m.name}: CLIP {value(m, 'clip_score'):.2f} ≈ {near.name}'s {value(near, 'clip_score'):.2f}; "
                         f"FID {value(m, 'fid'):.2f} vs {value(near, 'fid'):.2f}.")
    return "\n".join(lines)


def plot(methods: list[Method], path: Path) -> None:
    """Metric vs scale and vs rows per image, one line per guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(LABELS), figsize=(5 * len(LABELS), 7.5))
    for col, key in enumerate(LABELS):
        for group in dict.fromkeys(m.group for m in methods):
            members = [m for m in methods if m.group == group]
            ys = [mean_se([r[key] for r in m.results]) for m in members]
            for row, xs in ((0, [m.scale for m in members]), (1, [value(m, "rows_per_image") for m in members])):
                axes[row, col].errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", capsize=2,
                                        label=group, linestyle="-" if row == 0 else "none")
        axes[0, col].set_xlabel("scale (AG, LinearAG, GFCG, dynamic: their base CFG)", fontsize=8)
        axes[1, col].set_xlabel("transformer rows per image")
        for row in (0, 1):
            axes[row, col].set_ylabel(LABELS[key])
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{MODEL}: guides on a rectified-flow SD3 pipeline (mean ± s.e. over seeds)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    start = time.perf_counter()
    judge = zoo.load("digits-classifier")
    feature = DigitFeatures(judge)
    clip = tuple(zoo.load("digits-clip"))
    clf = objective = None
    if {"dynamic CFG", "GFCG"} & set(args.guides):
        clf = guide_classifier(Path(args.work), progress)
        objective = Objective(lambda labels, prompts: guidance.ClipAlignment.from_prompts(clip[0], clip[2], prompts),
                              FeatureFidelity(clf), args.clip_weight, args.fidelity_weight)
    state = PartialState()

    def make_metrics():
        metrics = ImageMetrics(["fid", "accuracy", "clip_score"], feature=feature, classifier=judge, clip=clip)
        prepare_real(metrics, "digits-test", 16, DEFAULT_CACHE, feature, state)
        return metrics

    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    methods, refused = [], {}
    for method in methods_for(pipe, args.guides, clf, objective, args):
        try:
            run(pipe, method, args, make_metrics, progress)
        except ValueError as err:              # a guide apply refuses on this pipeline / scheduler
            refused.setdefault(method.group, str(err))
            print(f"{method.name}: refused: {err}", flush=True)
            continue
        methods.append(method)
        print(f"{method.name}: accuracy {cell(method, 'accuracy', 3)}, FID {cell(method, 'fid', 2)}, "
              f"CLIP {cell(method, 'clip_score', 2)}, rows {value(method, 'rows_per_image'):.1f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    section = "\n\n".join([
        "## Guides on a rectified-flow model (`benchmarks/bench_flow.py`)",
        f"`{MODEL}` (`StableDiffusion3Pipeline`, flow-matching Euler {args.steps} steps), {args.num_images} images "
        f"per configuration and seed, seeds {args.seeds} (the same noises for every guide; cells: mean ± standard "
        f"error over seeds). Prompts cycle through the caption templates, digit i mod 10. Accuracy: "
        f"`digits-classifier`; FID-digits: its 64-d features against the 360 held-out test digits; CLIP score "
        f"(100·cos): `digits-clip`. Rows: transformer rows per image as counted by `guidance.apply`. AG / LinearAG / "
        f"GFCG / dynamic CFG build on CFG w={REFERENCE_SCALE:g}; LinearAG calibrated on {args.calibration_images} "
        f"full-CFG samples of another seed; dynamic CFG maximises J = {args.clip_weight:g}·CLIP cos + "
        f"{args.fidelity_weight:g}·fidelity over the CFG grid (as in `bench_adaptive`); GFCG is guided by a "
        f"classifier trained with another seed than the judge. Rectified-CFG++: predictor to the step's midpoint, "
        f"its scale column is CFG's w = λ + 1 (the small-step limit)."
        + (" Not measured: " + "; ".join(f"{group} ({why})" for group, why in refused.items()) + "."
           if refused else ""),
        table(methods), "Against the papers' claims:\n\n" + findings(methods),
        f"![metrics vs scale and vs rows]({PLOT})", f"Wall time: {minutes:.1f} min (1 thread, shared 2-core CPU)."])
    print(section)
    if not args.no_write:
        plot(methods, ROOT / PLOT)
        write_section("flow", section)


if __name__ == "__main__":
    main()
