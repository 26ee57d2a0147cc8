"""Measure the shipped model zoo and write the ``zoo`` section of BENCHMARKS.md.

    python benchmarks/bench_zoo.py                        # 50 samples per digit and scale, 25 DDIM steps
    python benchmarks/bench_zoo.py --per-class 10 --no-write --grid-dir /tmp/grids

Per sampling model and CFG scale: accuracy of the digits classifier on the samples, FID-digits
(classifier features) against the train split, and for digits-t2i and digits-flow the CLIP score under
digits-clip. digits-flow runs its native call with its 256 zero T5 tokens counted in one
(``counted_t5_zeros``, exact to float rounding, ~6x faster).
Also the classifier's test accuracy and digits-clip's zero-shot test accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from tqdm.auto import tqdm

from common import BENCHMARKS, write_section
from diffguide.tasks import zoo
from diffguide.tasks.digits import CAPTION_TEMPLATES, NUM_CLASSES, load_digits_tensors, to_unit
from diffguide.tasks.evaluation import image_labels, image_prompts
from diffguide.tasks.metrics import FID, CLIPScore, DigitFeatures
from diffguide.tasks.training_flow import counted_t5_zeros

CLASS_SCALES = (1.0, 2.0, 3.0, 5.0)
T2I_SCALES = (1.0, 3.0, 5.0, 7.5)
FLOW_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)
TEXT_MODELS = ("digits-t2i", "digits-flow")
SCALES = {"digits-class": CLASS_SCALES, "digits-class-weak": CLASS_SCALES, "digits-t2i": T2I_SCALES,
          "digits-flow": FLOW_SCALES}
SAMPLING_MODELS = tuple(SCALES)
ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def sample(pipe, labels: list[int], prompts: list[str], scale: float, steps: int, seed: int,
           batch_size: int) -> torch.Tensor:
    """Samples in [0, 1], ``(N, 1, 16, 16)``; one generator for the whole run."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        if hasattr(pipe, "tokenizer"):
            kwargs = {"prompt": prompts[start:start + batch_size]}
        else:
            kwargs = {"class_labels": labels[start:start + batch_size]}
        if isinstance(pipe, StableDiffusion3Pipeline):
            with counted_t5_zeros(pipe.transformer):
                out.append(pipe(**kwargs, guidance_scale=scale, num_inference_steps=steps, generator=gen,
                                output_type="pt", max_sequence_length=1).images)
            continue
        out.append(pipe(**kwargs, guidance_scale=scale, num_inference_steps=steps, generator=gen,
                        output_type="pt").images)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, nrow: int = NUM_CLASSES) -> None:
    from torchvision.utils import save_image
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=1, pad_value=0.5)


def folder_mb(name: str) -> float:
    return sum(f.stat().st_size for f in zoo.model_path(name).rglob("*") if f.is_file()) / 2**20


def folder_fingerprint(name: str) -> str:
    """SHA-256 (12 hex digits) of every file of a shipped model: names and bytes."""
    digest = hashlib.sha256()
    for path in sorted(f for f in zoo.model_path(name).rglob("*") if f.is_file() and f.name != "training.json"):
        digest.update(str(path.relative_to(zoo.model_path(name))).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def previous_rows(per_class: int, steps: int, seed: int) -> dict[str, dict]:
    """Rows of the zoo section this script last wrote, if it used the same protocol: ``"model|scale" -> row``."""
    found = re.search(r"<!-- zoo:start -->(.*?)<!-- zoo:end -->", BENCHMARKS.read_text(), re.S)
    if not found or not all(f in found[1] for f in (f"Samples: {per_class * NUM_CLASSES} per row",
                                                      f"{steps} steps", f"seed {seed}.")):
        return {}
    rows = {}
    for line in found[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in SAMPLING_MODELS:
            rows[f"{cells[0]}|{float(cells[1]):g}"] = {
                "accuracy": float(cells[2]), "fid_test": float(cells[3]), "fid_train": float(cells[4]),
                **({"clip_score": float(cells[5])} if cells[5] != "–" else {})}
    return rows


def training_record(name: str) -> dict:
    path = zoo.model_path(name) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit and scale")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM; Euler for digits-flow)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid-dir", type=Path, default=None, help="save a sample grid per model and scale here")
    parser.add_argument("--models", nargs="+", default=None, choices=SAMPLING_MODELS,
                        help="sample only these; the other rows come from --cache (same protocol and weights), "
                             "else from the zoo section this script last wrote with the same protocol")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_zoo" / "rows.json",
                        help="measured rows, keyed by model, scale, protocol and a hash of the model's files")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    classifier = zoo.load("digits-classifier")
    x_test, y_test = load_digits_tensors("test", 16)
    test_accuracy = classifier.accuracy(x_test, y_test)
    clip = zoo.load("digits-clip")
    zero_shot = (clip.zero_shot_predict(x_test) == y_test).float().mean().item()
    x_train = load_digits_tensors("train", 16)[0]
    fid = FID(DigitFeatures(classifier))                  # real statistics: the train split
    fid.update(to_unit(x_train), real=True)
    fid_test = fid_value(fid, to_unit(x_test))
    fid_held_out = FID(DigitFeatures(classifier))         # real statistics: the held-out test split
    fid_held_out.update(to_unit(x_test), real=True)
    fid_train_vs_test = fid_value(fid_held_out, to_unit(x_train))
    clip_score = CLIPScore(*clip)

    indices = range(args.per_class * NUM_CLASSES)      # image i: digit i % 10, caption template (i // 10) % T
    labels, prompts = image_labels(indices), image_prompts(indices)
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    fingerprints = {name: folder_fingerprint(name) for name in SAMPLING_MODELS}
    judges = "+".join(folder_fingerprint(name) for name in ("digits-classifier", "digits-clip"))
    key = lambda name, scale: (f"{name}|{scale:g}|{args.per_class}|{args.steps}|{args.seed}|{fingerprints[name]}"
                               f"|{judges}")
    runs = [(name, scale) for name in SAMPLING_MODELS for scale in SCALES[name]
            if args.models is None or name in args.models]
    pipes = {}
    for name, scale in tqdm(runs, desc="zoo bench"):
        if name not in pipes:
            pipes[name] = zoo.load(name)
            pipes[name].set_progress_bar_config(disable=True)
        images = sample(pipes[name], labels, prompts, scale, args.steps, args.seed, args.batch_size)
        row = {"accuracy": classifier.accuracy(images * 2 - 1, torch.tensor(labels)),
               "fid_test": fid_value(fid_held_out, images), "fid_train": fid_value(fid, images)}
        if name in TEXT_MODELS:
            clip_score.reset()
            clip_score.update(images, prompts)
            row["clip_score"] = float(clip_score.compute())
        cache[key(name, scale)] = row
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(cache, indent=1) + "\n")
        if args.grid_dir is not None:
            order = torch.arange(len(images)).reshape(-1, NUM_CLASSES).T.reshape(-1)[: NUM_CLASSES * 8]
            save_grid(images[order], args.grid_dir / f"{name}-cfg{scale:g}.png", nrow=8)
    previous = previous_rows(args.per_class, args.steps, args.seed)
    carried = sorted({name for name in SAMPLING_MODELS for scale in SCALES[name]
                      if key(name, scale) not in cache and f"{name}|{scale:g}" in previous})
    missing = [f"{name} {scale:g}" for name in SAMPLING_MODELS for scale in SCALES[name]
               if key(name, scale) not in cache and f"{name}|{scale:g}" not in previous]
    if missing:
        print(f"not measured with this protocol and these weights: {', '.join(missing)}; run with --models")
        return

    rows, best, lowest = [], {}, {}
    for name in SAMPLING_MODELS:
        for scale in SCALES[name]:
            row = cache.get(key(name, scale)) or previous[f"{name}|{scale:g}"]
            if row["accuracy"] >= 0.95 and row["fid_test"] < best.get(name, (0, float("inf")))[1]:
                best[name] = (scale, row["fid_test"])
            if row["fid_test"] < lowest.get(name, (0, float("inf")))[1]:
                lowest[name] = (scale, row["fid_test"])
            score = f"{row['clip_score']:.1f}" if "clip_score" in row else "–"
            rows.append(f"| {name} | {scale:g} | {row['accuracy']:.3f} | {row['fid_test']:.1f} | "
                        f"{row['fid_train']:.1f} | {score} |")

    sizes = "\n".join(
        f"| {name} | {folder_mb(name):.2f} | {training_record(name).get('steps', '?')} | "
        f"{training_record(name).get('train_seconds', float('nan')) / 60:.1f} |" for name in zoo.list_models())
    n = args.per_class * NUM_CLASSES
    best_lines = "\n".join(f"- {name}: lowest FID-digits vs test among scales with accuracy >= 0.95: "
                           + (f"**{best[name][1]:.1f}** at CFG {best[name][0]:g}" if name in best else "none")
                           + f"; at any scale: {lowest[name][1]:.1f} at CFG {lowest[name][0]:g}"
                           for name in TEXT_MODELS)
    if "digits-flow" in best and "digits-t2i" in best:
        flow_fid = best["digits-flow"][1]
        best_lines += (f"\n- digits-flow's best (accuracy >= 0.95) is {flow_fid / best['digits-t2i'][1]:.2f}x "
                       f"digits-t2i's best by the same rule and {flow_fid / lowest['digits-t2i'][1]:.2f}x its lowest "
                       f"FID-digits at any scale (goal: accuracy >= 0.95 and FID within 2x of digits-t2i's best)")
    carried_note = (f" Rows of {', '.join(carried)} are carried over from this script's previous run (same "
                    "protocol; their model files are unchanged)." if carried else "")
    section = f"""## Model zoo (`benchmarks/bench_zoo.py`)

Samples: {n} per row ({args.per_class} per digit; for digits-t2i and digits-flow the prompts cycle
through the {len(CAPTION_TEMPLATES)} caption templates), {args.steps} steps (DDIM; flow-matching Euler for
digits-flow, its native `StableDiffusion3Pipeline` call and `guidance_scale`), seed {args.seed}. Accuracy: the shipped
digits-classifier on the samples. FID-digits: Fréchet distance of the classifier's 64-d features against
the 360 held-out test images (the 1,437 real train images score {fid_train_vs_test:.1f}), and against the train
images (the real test images score {fid_test:.1f}). CLIP score: `tasks.metrics.CLIPScore` under digits-clip.

| model | CFG scale | accuracy | FID-digits vs test split | FID-digits vs train split | CLIP score |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{best_lines}
- digits-classifier test accuracy (360 held-out digits): **{test_accuracy:.3f}**
- digits-clip zero-shot test accuracy (10 classes, caption templates averaged): **{zero_shot:.3f}**

| model | size (MB) | training steps | training time (min) |
|---|---|---|---|
{sizes}

Training times are from each model's `training.json` (1 CPU thread on a shared 2-core machine; digits-t2i
includes its VAE; digits-flow reuses that VAE, frozen).{carried_note} This run took
{(time.perf_counter() - start) / 60:.1f} min.
"""
    if args.no_write:
        print(section)
    else:
        write_section("zoo", section)
        print(section)


def fid_value(fid: FID, images: torch.Tensor) -> float:
    """FID of ``images`` against the real statistics already in ``fid``."""
    fid.reset()
    fid.update(images, real=False)
    return float(fid.compute())


if __name__ == "__main__":
    main()
