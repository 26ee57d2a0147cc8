"""Sample and score a model x guide x scale grid, or score an image folder: ``diffguide-evaluate``.

    diffguide-evaluate --model digits-class --guide cfg@1,2,3 --guide apg@2,4:eta=0 --guide cfgpp@0.2,0.6 \\
        --num-images 500 --steps 20 --out runs/digits-class
    diffguide-evaluate --images path/to/pngs --metrics fid kid --real digits-train --out runs/folder
    torchrun --nproc_per_node 2 -m diffguide.scripts.evaluate ...          # data-parallel (CPU: gloo)
    accelerate launch --multi_gpu --num_processes 2 -m diffguide.scripts.evaluate ...

Each grid point is a resumable folder ``OUT/<model>/<method>/scale-<s>/`` (images written as they are
produced; rerun the same command after an interruption). Writes ``OUT/results.json``, ``results.csv``
and ``plot.png`` (each metric against ``--plot-x``: the guidance scale, the NFE or another metric).
Metrics: fid, kid (features of ``--feature``: the digits classifier, or inception), accuracy (the
digits classifier), clip_score (an open_clip model), psnr/ssim/lpips only make sense with references.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_SCALES = {"cfgpp": [0.2, 0.4, 0.6, 0.8]}
SAMPLE_METRICS = ("fid", "kid", "accuracy", "clip_score")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from diffguide.scripts._cli import (HelpFormatter, check_device, check_writable, device_name, guides_epilog,
                                        number)
    from diffguide.scripts.sample import SCHEDULERS, SCHEDULES

    p = argparse.ArgumentParser(prog="diffguide-evaluate", description=__doc__, formatter_class=HelpFormatter,
                                epilog=guides_epilog())
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", nargs="+", help="shipped model name(s) or local pipeline folder(s)")
    src.add_argument("--images", help="score this image folder instead of sampling (labels/prompts from "
                                      "its metadata.jsonl: file_name, label, text)")
    p.add_argument("--guide", action="append", default=None,
                   help="guide spec NAME[@S1,S2,...][:KEY=VALUE,...], repeatable (names and keys below; "
                        "default: cfg)")
    p.add_argument("--scales", type=number(float), nargs="+", default=[1.0, 2.0, 3.0, 5.0],
                   help="scales for guides given without @scales; cfgpp (lam) uses 0.2 0.4 0.6 0.8")
    p.add_argument("--num-images", type=number(int, 1), default=500, help="images per grid point")
    p.add_argument("--steps", type=number(int, 1), default=25, help="DDIM sampling steps")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed hash(seed, i)")
    p.add_argument("--eta", type=number(float, 0), default=0.0, help="DDIM eta (0: deterministic, 1: DDPM-like)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="sampler (diffusers scheduler, as diffguide-sample's); default: the model's own")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="default",
                   help="noise levels: the scheduler's own, or Karras / exponential / beta spaced sigmas")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="images sampled / scored at once")
    p.add_argument("--metrics", nargs="+", default=None,
                   help=f"metrics to compute (default: fid kid accuracy, + clip_score for text models); "
                        f"known: {', '.join(SAMPLE_METRICS)}")
    p.add_argument("--feature", default="auto", choices=("auto", "digits", "inception"),
                   help="FID/KID features: the digits classifier (offline) or Inception-v3 (needs its weights); "
                        "auto: digits for a digits-* real set, else inception")
    p.add_argument("--inception-weights", default=None, help="local weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--real", default="digits-train", help="real set: digits-train, digits-test, digits-all or a folder")
    p.add_argument("--stats-dir", default=None, help="cache of real statistics (default ~/.cache/diffguide/real_stats)")
    p.add_argument("--kid-subset-size", type=number(int, 1), default=1000, help="KID subset size")
    p.add_argument("--classifier", default="digits-classifier", help="shipped name or folder of the classifier")
    p.add_argument("--clip", default="digits-clip", help="shipped name, or an open_clip model name")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or local weights file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--plot-x", default="scale", help="x axis of the plot: scale, nfe or a metric name")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, ... (default: the process's accelerate device)")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads per process (default: 1 when every model is a shipped one, the fastest "
                        "for them; torch's otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = set(args.metrics or []) - set(SAMPLE_METRICS) - {"psnr", "ssim", "lpips"}
    if unknown:
        p.error(f"argument --metrics: unknown metric(s) {sorted(unknown)}; known: {', '.join(SAMPLE_METRICS)}")
    if args.plot_x not in ("scale", "nfe", *SAMPLE_METRICS):
        p.error(f"argument --plot-x: must be scale, nfe or one of {', '.join(SAMPLE_METRICS)}, got {args.plot_x!r}")
    if set(args.metrics or []) & {"psnr", "ssim", "lpips"}:
        p.error("argument --metrics: psnr, ssim and lpips compare against reference images; use tasks.metrics "
                "directly")
    check_writable(p, "--out", args.out, folder=True)
    if args.device is not None:
        check_device(p, args.device)
    if args.model:
        check_models(p, args)
    else:
        check_image_folder(p, args)
    from diffguide.tasks.evaluation import REAL_SETS
    if args.real not in REAL_SETS and not Path(args.real).is_dir():
        p.error(f"argument --real: {args.real!r} is neither {', '.join(REAL_SETS)} nor a folder")
    return args


def check_models(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every ``--model`` is a class-conditional or text-to-image pipeline; every guide builds at its scales."""
    from diffguide.scripts._cli import check_guide, check_guide_fits, check_guide_name, check_pipeline, check_start
    from diffguide.scripts.sample import check_schedule

    for spec in args.guide or []:
        check_guide_name(p, "--guide", spec)
    infos = {}
    for name in args.model:
        info = infos[name] = check_pipeline(p, "--model", name)
        if info is not None and info.kind == "other":
            p.error(f"argument --model: {name} is neither class-conditional nor text-to-image")
        if info is not None and info.kind == "class" and "clip_score" in (args.metrics or []):
            p.error(f"argument --metrics: clip_score scores images against their prompts and {name} is "
                    "class-conditional (no prompts); use it with a text-to-image model")
    check_metric_counts(p, "--num-images", args.metrics or ["fid", "kid"], args.num_images)
    for name, info in infos.items():
        if info is not None:
            check_start(p, info.scheduler, args.steps, name)
            try:
                check_schedule(args.scheduler, args.schedule, info.scheduler)
            except ValueError as err:
                p.error(str(err))
    for spec in args.guide or ["cfg"]:
        check_guide(p, "--guide", spec, lambda name: DEFAULT_SCALES.get(name, args.scales))
        for name, info in infos.items():
            check_guide_fits(p, "--guide", spec, info, name)


def check_metric_counts(p: argparse.ArgumentParser, option: str, metrics: list[str], count: int) -> None:
    """FID and KID compare two distributions: each needs at least 2 images."""
    needing = [m for m in ("fid", "kid") if m in metrics]
    if needing and count < 2:
        p.error(f"argument {option}: {' and '.join(needing)} need at least 2 images, got {count}; "
                f"give 2 or more images or other --metrics")


def check_image_folder(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The ``--images`` folder holds images, all complete, readable and of one size (each file is decoded), and
    what the metrics need: labels for accuracy, prompts for clip_score, 2 images for fid / kid."""
    from diffguide.scripts._cli import check_image
    from diffguide.tasks.evaluation import folder_images

    folder = args.images
    try:
        paths, labels, prompts = folder_images(folder)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        p.error(f"argument --images: {err}")
    for metric, has, key in (("accuracy", labels, "label"), ("clip_score", prompts, "text")):
        if metric in (args.metrics or []) and has is None:
            p.error(f"argument --metrics: {metric} needs a {key!r} for every image of {folder} "
                    f"(its metadata.jsonl: file_name, {key}) and it has none")
    check_metric_counts(p, "--images", args.metrics or ["fid", "kid"], len(paths))
    first = check_image(p, "--images", paths[0])
    for path in paths[1:]:
        size = check_image(p, "--images", path)
        if size != first:
            p.error(f"argument --images: {path} is {size[0]}x{size[1]} but {paths[0].name} is "
                    f"{first[0]}x{first[1]}; all images of a folder must have one size")


# ------------------------------------------------------------------------------------------- loading
def load_model(name: str, device):
    """A shipped model name or a local folder laid out like one (see ``tasks.zoo.load``)."""
    from diffguide.tasks import zoo

    return zoo.load(name, device=device)


def load_clip(name: str, pretrained: str | None, device) -> tuple:
    """``(model, preprocess, tokenizer)``: a shipped model or folder, else an open_clip model name + weights."""
    import open_clip

    from diffguide.tasks import zoo

    if name in zoo.list_models() or Path(name).is_dir():
        model, preprocess, tokenizer = load_model(name, device)
        return model, preprocess, tokenizer
    if name not in open_clip.list_models():
        raise ValueError(f"--clip {name!r} is neither a shipped model, a folder nor an open_clip model name")
    if pretrained is None:
        raise ValueError(f"--clip {name}: give its weights with --clip-pretrained (a tag or a local file); "
                         "a randomly initialised CLIP cannot score images")
    from diffguide.tasks.metrics import load_open_clip
    model, preprocess, tokenizer = load_open_clip(name, pretrained)
    return model.to(device), preprocess, tokenizer


def build_metrics(args, names: list[str], device):
    """The metrics, their feature extractor, and a key naming everything their values depend on."""
    from diffguide.tasks.evaluation import REAL_SETS
    from diffguide.tasks.metrics import DigitFeatures, ImageMetrics, InceptionFeatures, extractor_id, weights_fingerprint

    wants_features = bool({"fid", "kid"} & set(names))
    kind = args.feature if args.feature != "auto" else ("digits" if args.real in REAL_SETS else "inception")
    needs_classifier = "accuracy" in names or (wants_features and kind == "digits")
    classifier = load_model(args.classifier, device) if needs_classifier else None
    feature = None
    if wants_features:
        feature = (DigitFeatures(classifier) if kind == "digits"
                   else InceptionFeatures(weights_path=args.inception_weights, antialias=False).to(device))
    clip = load_clip(args.clip, args.clip_pretrained, device) if "clip_score" in names else None
    metrics = ImageMetrics(names, feature=feature, classifier=classifier, clip=clip,
                           kid_subset_size=args.kid_subset_size).to(device)
    key = {"metrics": sorted(names), "real": args.real, "kid_subset_size": args.kid_subset_size,
           "feature": extractor_id(feature) if feature is not None else None,
           "classifier": weights_fingerprint(classifier) if "accuracy" in names else None,
           "clip": weights_fingerprint(clip[0]) if clip is not None else None}
    return metrics, feature, key


# ------------------------------------------------------------------------------------------ the runs
def grid_points(args) -> list[tuple[str, list[float], dict]]:
    from diffguide import guidance

    specs = args.guide or ["cfg"]
    points = []
    for spec in specs:
        name, scales, params = guidance.parse_guide_spec(spec)
        points.append((name, scales or DEFAULT_SCALES.get(name, args.scales), params))
    return points


def run_grid(args, state, device, progress: bool) -> list[dict[str, Any]]:
    import torch

    from diffguide.tasks.evaluation import (SamplingConfig, config_dict, image_labels, image_prompts, pipeline_kind,
                                  prepare_real, sample_run, scheduler_config, score_images, write_metadata)
    from diffguide.tasks.metrics import DEFAULT_CACHE, weights_fingerprint
    from diffguide.tasks.pipelines import latent_shape
    from diffguide.tasks.run_folder import RunFolder, config_hash
    from diffguide.scripts.sample import check_schedule, make_scheduler

    rows = []
    points = grid_points(args)
    for model_name in args.model:
        pipe = load_model(model_name, device)
        if args.scheduler is not None or args.schedule != "default":
            check_schedule(args.scheduler, args.schedule, pipe.scheduler.config)
            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, None, args.schedule)
        pipe.set_progress_bar_config(disable=True)
        kind = pipeline_kind(pipe)
        names = args.metrics or (["fid", "kid", "accuracy"] + (["clip_score"] if kind == "text" else []))
        metrics, feature, metrics_key = build_metrics(args, names, device)
        size = latent_shape(pipe)[-1] * (getattr(pipe, "vae_scale_factor", 1) if kind == "text" else 1)
        if feature is not None:
            prepare_real(metrics, args.real, size, args.stats_dir or DEFAULT_CACHE, feature, state)
        networks = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
        fingerprint = weights_fingerprint(torch.nn.ModuleDict(networks))      # unet, vae, text encoder
        model_tag = Path(model_name).name
        for guide, scales, params in points:
            for scale in scales:
                cfg = SamplingConfig(model=model_tag, guide=guide, scale=float(scale), params=params,
                                     num_images=args.num_images, steps=args.steps, seed=args.seed, eta=args.eta)
                folder = RunFolder(Path(args.out) / model_tag / cfg.label() / f"scale-{scale:g}",
                                   config_dict(cfg, fingerprint, scheduler_config(pipe.scheduler)))
                start = time.perf_counter()
                written = sample_run(pipe, cfg, folder, state, args.batch_size, progress)
                if state.is_main_process:
                    write_metadata(folder, cfg, kind)
                sample_seconds = time.perf_counter() - start
                files = folder.files_state(range(cfg.num_images))             # metrics of exactly these files
                key = config_hash({"run": folder.hash, "files": files, **metrics_key})
                cached = folder.read_json("metrics.json")
                if cached is not None and cached.get("key") == key:
                    results = cached["results"]
                else:
                    metrics.reset()
                    indices = range(cfg.num_images)
                    results = score_images(metrics, [folder.image_path(i) for i in indices], state,
                                           labels=image_labels(indices, getattr(pipe, "num_classes", 10)),
                                           prompts=image_prompts(indices) if kind == "text" else None,
                                           progress=progress, device=device)
                    if state.is_main_process:
                        folder.write_json("metrics.json", {"key": key, "results": results})
                nfe = (folder.read_json("nfe.json") or {}).get("network_rows_per_image")
                row = {"model": model_tag, "method": cfg.label(), "guide": guide, "params": params,
                       "scale": float(scale), "nfe": nfe, "num_images": cfg.num_images, "steps": cfg.steps,
                       "seed": cfg.seed, **results, "sampled_now": written,
                       "sample_seconds": round(sample_seconds, 2), "folder": str(folder.root)}
                rows.append(row)
                if state.is_main_process and progress:
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
                    print(f"{model_tag} {cfg.label()} @ {scale:g}: {shown}", file=sys.stderr, flush=True)
    return rows


def run_images(args, state, device, progress: bool) -> list[dict[str, Any]]:
    from diffguide.tasks.evaluation import folder_images, prepare_real, score_images
    from diffguide.tasks.metrics import DEFAULT_CACHE

    paths, labels, prompts = folder_images(args.images)
    names = args.metrics or (["fid", "kid"] + (["accuracy"] if labels else []) + (["clip_score"] if prompts else []))
    metrics, feature, _ = build_metrics(args, names, device)
    if feature is not None:
        from diffguide.tasks.run_folder import load_image
        size = load_image(paths[0]).shape[-1]
        prepare_real(metrics, args.real, size, args.stats_dir or DEFAULT_CACHE, feature, state)
    results = score_images(metrics, paths, state, labels=labels, prompts=prompts, progress=progress, device=device)
    return [{"images": str(args.images), "num_images": len(paths), **results}]


# ------------------------------------------------------------------------------------------- outputs
def write_outputs(rows: list[dict[str, Any]], out: Path, plot_x: str) -> None:
    from diffguide.tasks.run_folder import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows)

    atomic_write(out / "results.csv", write_csv)
    if rows and "method" in rows[0]:
        atomic_write(out / "plot.png", lambda tmp: plot_rows(rows, tmp, plot_x))
    elif rows:
        atomic_write(out / "plot.png", lambda tmp: plot_folder(rows[0], tmp))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
KID_NOTE = "KID < 0 here: the unbiased estimator is noisy\nat small N; read such values as about 0"


def _plot_title(rows: list[dict[str, Any]]) -> str:
    models = ", ".join(dict.fromkeys(str(r["model"]) for r in rows))
    counts = sorted({r["num_images"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    return (f"{models}: {'/'.join(map(str, counts))} images per point, {'/'.join(map(str, steps))} sampling steps "
            f"(the model's own scheduler), seed {rows[0]['seed']}")


def plot_rows(rows: list[dict[str, Any]], path: Path, x: str = "scale", metrics: list[str] | None = None,
              title: str | None = None) -> None:
    """Save :func:`rows_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = rows_figure(rows, x, metrics, title)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def rows_figure(rows: list[dict[str, Any]], x: str = "scale", metrics: list[str] | None = None,
                title: str | None = None):
    """One panel per metric, one line per model/method against ``x`` (scale, nfe or a metric), each method with
    its own marker, one legend for all panels, the title naming the models, N and the steps; the scale of
    each point is written beside it when ``x`` is not the scale; negative KID values are flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or [m for m in ("fid", "kid", "accuracy", "clip_score") if m in rows[0] and m != x]
    if x not in rows[0]:
        raise ValueError(f"--plot-x {x!r} is not a column; choose from {', '.join(k for k in rows[0] if k != 'params')}")
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [(model, method) for model in models
             for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, (model, method) in enumerate(lines):
            points = sorted((r[x], r[metric], r["scale"]) for r in rows if r["model"] == model
                            and r["method"] == method and r.get(metric) is not None and r.get(x) is not None)
            label = method if len(models) == 1 else f"{model}: {method}"
            ax.plot([q[0] for q in points], [q[1] for q in points], marker=MARKERS[k % len(MARKERS)],
                    linestyle=("-", "--", ":", "-.")[k // len(MARKERS) % 4], color=f"C{k % 10}", label=label)
            if x != "scale":
                for px, py, scale in points:
                    ax.annotate(f"{scale:g}", (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7,
                                color=f"C{k % 10}")
        if metric == "kid" and any((r.get("kid") or 0) < 0 for r in rows):
            ax.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
            ax.set_title(KID_NOTE, fontsize=7, color="dimgray")
        ax.set_xlabel({"scale": "guidance scale (lam for cfgpp)", "nfe": "NFE per image"}.get(x, x)
                      + ("" if x == "scale" else "  (labels: scale)"))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title or _plot_title(rows), fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
    return fig


def plot_folder(row: dict[str, Any], path: Path) -> None:
    """The scores of one ``--images`` folder: one bar per metric with its value, the folder and N as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in SAMPLE_METRICS if row.get(m) is not None]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.bar([0], [row[metric]], color="C0", width=0.5)
        ax.set_xticks([])
        ax.set_title(f"{metric} = {row[metric]:.4g}", fontsize=9)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        if metric == "kid" and row[metric] < 0:
            ax.set_xlabel(KID_NOTE, fontsize=6)
    fig.suptitle(f"{row['images']}: {row['num_images']} images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the command line ``argv``; returns the result rows (every process gets them)."""
    args = parse_args(argv)
    import torch
    from accelerate import PartialState

    from diffguide.scripts._cli import set_threads
    from diffguide.tasks.evaluation import REAL_SETS

    inception = args.feature == "inception" or (args.feature == "auto" and args.real not in REAL_SETS)
    set_threads(args.threads, [] if inception else [*(args.model or []), args.classifier, args.clip])
    state = PartialState(cpu=not torch.cuda.is_available())
    device = torch.device(args.device) if args.device else state.device
    progress = not args.no_progress
    from diffguide.tasks.metrics import MissingWeightsError

    try:
        rows = run_grid(args, state, device, progress) if args.model else run_images(args, state, device, progress)
    except (ValueError, TypeError, OSError, ImportError, MissingWeightsError, FloatingPointError) as err:
        raise SystemExit(f"diffguide-evaluate: error: {err}") from None
    if state.is_main_process:
        write_outputs(rows, Path(args.out), args.plot_x)
        print(f"wrote {Path(args.out) / 'results.json'}, results.csv and plot.png ({len(rows)} rows)",
              file=sys.stderr, flush=True)
    state.wait_for_everyone()
    if state.use_distributed:
        state.destroy_process_group()
    return rows


def main(argv: list[str] | None = None) -> None:
    from diffguide.scripts._cli import one_line_warnings

    one_line_warnings("diffguide-evaluate")(run)(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
