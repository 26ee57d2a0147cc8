"""CFG vs APG vs CFG++ on the shipped digits models: FID-digits, classifier accuracy, CLIP score, NFE.

    python benchmarks/bench_guidance.py                        # the committed numbers (resumable)
    python benchmarks/bench_guidance.py --num-images 100 --out /tmp/bench   # a quick look

Runs ``diffguide-evaluate`` on ``digits-class``, ``digits-class-weak`` (an early checkpoint of it) and
``digits-t2i`` over a grid of scales per method,
then writes the ``guidance`` section of BENCHMARKS.md with one table and ``docs/bench_guidance.png``,
and the ``zoo-metrics`` section (FID-digits of every shipped generator, next to real held-out digits).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from diffguide.scripts import evaluate
from common import save_figure, write_section
from diffguide.tasks.run_folder import write_json

GUIDES = {
    "digits-class": ["cfg@1,1.5,2,3,5", "apg@1.5,2,3,5:eta=0,norm_threshold=1,momentum=-0.5", "cfgpp@0.2,0.4,0.6,0.8"],
    "digits-class-weak": ["cfg@1,1.5,2,3,5", "apg@1.5,2,3,5:eta=0,norm_threshold=1,momentum=-0.5",
                          "cfgpp@0.2,0.4,0.6,0.8"],
    "digits-t2i": ["cfg@1,2,3,5", "apg@2,3,5:eta=0,norm_threshold=1,momentum=-0.5", "cfgpp@0.2,0.4,0.6"],
}
# KID is left out: with a few hundred samples its subset spread (about 0.3 in these features) hides the differences.
METRICS = {"digits-class": ["fid", "accuracy"], "digits-class-weak": ["fid", "accuracy"],
           "digits-t2i": ["fid", "accuracy", "clip_score"]}
PLOT = "docs/bench_guidance.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=300, help="images per grid point")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_guidance"), help="run folders (resumable)")
    p.add_argument("--models", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--zoo", default=None, help="folder with the models instead of the shipped zoo "
                                             "(e.g. a fresh scripts/train_zoo.py output)")
    p.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def model(args, name: str) -> str:
    return str(Path(args.zoo) / name) if args.zoo else name


def common(args) -> list[str]:
    return ["--classifier", model(args, "digits-classifier"), "--clip", model(args, "digits-clip"),
            "--num-images", str(args.num_images), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--out", args.out] + \
           (["--no-progress"] if args.no_progress else [])


def clip_available(args) -> bool:
    """Whether ``digits-clip`` loads (the CLIP-score column is left empty otherwise)."""
    from diffguide.tasks import zoo

    try:
        zoo.load(model(args, "digits-clip"))
    except (ValueError, OSError, RuntimeError) as err:
        print(f"digits-clip does not load ({err}); CLIP score left out", file=sys.stderr)
        return False
    return True


def fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def real_floor(args, with_clip: bool) -> dict[str, float]:
    """The metrics of the held-out real digits (test split, captions as for samples) against the train split."""
    from diffguide.tasks import zoo
    from diffguide.tasks.digits import CAPTION_TEMPLATES, caption, load_digits_tensors
    from diffguide.tasks.evaluation import real_images
    from diffguide.tasks.metrics import DEFAULT_CACHE, DigitFeatures, ImageMetrics, extractor_id, real_stats_file

    feature = DigitFeatures(zoo.load(model(args, "digits-classifier")))
    names = ["fid", "accuracy"] + (["clip_score"] if with_clip else [])
    metrics = ImageMetrics(names, feature=feature, classifier=feature.classifier,
                           clip=zoo.load(model(args, "digits-clip")) if with_clip else None)
    metrics.load_real(real_stats_file("digits-train-16px", extractor_id(feature), DEFAULT_CACHE))
    images, labels = real_images("digits-test", 16), load_digits_tensors("test")[1].tolist()
    prompts = [caption(label, (i // 10) % len(CAPTION_TEMPLATES)) for i, label in enumerate(labels)]
    metrics.update(images, labels=labels, prompts=prompts)
    return metrics.compute() | {"num_images": len(images)}


def guidance_table(rows: list[dict]) -> str:
    lines = ["| model | method | scale | NFE | FID-digits ↓ | accuracy ↑ | CLIP score ↑ |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['guide']} | {r['scale']:g} | {r['nfe']:g} | {fmt(r['fid'], 3)} | "
                     f"{fmt(r['accuracy'])} | {fmt(r.get('clip_score'), 2)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = [("scale", "fid"), ("scale", "accuracy"), ("accuracy", "fid")]
    fig, axes = plt.subplots(len(models), 3, figsize=(12, 3.3 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        for ax, (x, y) in zip(row_axes, panels):
            for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
                pts = sorted((r[x], r[y]) for r in rows if r["model"] == model and r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method.split("(")[0])
            ax.set_xlabel({"scale": "scale (CFG w, APG w, CFG++ λ)", "accuracy": "classifier accuracy"}[x])
            ax.set_ylabel({"fid": "FID-digits", "accuracy": "classifier accuracy"}[y])
            ax.set_title(model, fontsize=9)
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[dict] = []
    with_clip = clip_available(args)
    for name in args.models:
        guides = [x for spec in GUIDES[name] for x in ("--guide", spec)]
        metrics = [m for m in METRICS[name] if with_clip or m != "clip_score"]
        rows += evaluate.run(["--model", model(args, name), *guides, "--metrics", *metrics, *common(args)])
    zoo_rows = [r for r in rows if r["method"] == "cfg" and r["scale"] in (1.0, 2.0)]
    floor = real_floor(args, with_clip)
    write_json(Path(args.out) / "bench_results.json", {"grid": rows, "zoo": zoo_rows, "real_floor": floor})

    protocol = (f"{args.num_images} images per point (labels i mod 10; t2i captions cycle the 6 templates), "
                f"DDIM {args.steps} steps (eta 0), seed {args.seed}, real statistics = digits train split "
                f"(1,437 images, 16×16, 8-bit) in the penultimate 64-d features of `digits-classifier` "
                f"(FID-digits); accuracy = `digits-classifier` on the samples; "
                f"CLIP score = torchmetrics `CLIPScore` (100·cos) with `digits-clip`. NFE = network rows per "
                f"image (CFG at w=1 skips the unconditional branch). APG: eta 0, norm threshold 1, momentum -0.5.")
    floor_line = (f"Floor: real held-out digits (test split, {floor['num_images']} images) vs train: "
                  f"FID-digits {floor['fid']:.3f}, accuracy {floor['accuracy']:.3f}, "
                  f"CLIP score {fmt(floor.get('clip_score'), 2)}.")
    guidance_md = "\n\n".join([
        "## Guidance methods on the digits models (`benchmarks/bench_guidance.py`)",
        protocol, floor_line, guidance_table(rows), f"![FID-digits and accuracy vs scale]({PLOT})",
    ])
    zoo_lines = ["| model | guidance | NFE | FID-digits ↓ | accuracy ↑ | CLIP score ↑ |",
                 "|---|---|---:|---:|---:|---:|",
                 f"| real test split | – | – | {floor['fid']:.3f} | {floor['accuracy']:.3f} | "
                 f"{fmt(floor.get('clip_score'), 2)} |"]
    for r in zoo_rows:
        zoo_lines.append(f"| {r['model']} | CFG {r['scale']:g} | {r['nfe']:g} | {fmt(r['fid'], 3)} | "
                         f"{fmt(r['accuracy'])} | {fmt(r.get('clip_score'), 2)} |")
    zoo_md = "\n\n".join(["## FID-digits of the shipped generators (`benchmarks/bench_guidance.py`)",
                          protocol.split(" APG:")[0], "\n".join(zoo_lines)])
    print(guidance_md + "\n\n" + zoo_md)
    if not args.no_write:
        plot(rows, ROOT / PLOT)
        write_section("guidance", guidance_md)
        write_section("zoo-metrics", zoo_md)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
