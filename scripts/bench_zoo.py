"""Measure the shipped model zoo and write the ``zoo`` section of BENCHMARKS.md.

    python scripts/bench_zoo.py                        # 50 samples per digit and scale, 25 DDIM steps
    python scripts/bench_zoo.py --per-class 10 --no-write --grid-dir /tmp/grids

Per sampling model and CFG scale: accuracy of the digits classifier on the samples, FID-digits
(classifier features) against the train split, and for digits-t2i the CLIP score under digits-clip.
Also the classifier's test accuracy and digits-clip's zero-shot test accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffguide.scripts._bench_md import write_section
from diffguide.tasks import zoo
from diffguide.tasks.digits import CAPTION_TEMPLATES, NUM_CLASSES, load_digits_tensors, to_unit
from diffguide.tasks.evaluation import image_labels, image_prompts
from diffguide.tasks.metrics import FID, CLIPScore, DigitFeatures

CLASS_SCALES = (1.0, 2.0, 3.0, 5.0)
T2I_SCALES = (1.0, 3.0, 5.0, 7.5)


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
        out.append(pipe(**kwargs, guidance_scale=scale, num_inference_steps=steps, generator=gen,
                        output_type="pt").images)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, nrow: int = NUM_CLASSES) -> None:
    from torchvision.utils import save_image
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=1, pad_value=0.5)


def folder_mb(name: str) -> float:
    return sum(f.stat().st_size for f in zoo.model_path(name).rglob("*") if f.is_file()) / 2**20


def training_record(name: str) -> dict:
    path = zoo.model_path(name) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit and scale")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid-dir", type=Path, default=None, help="save a sample grid per model and scale here")
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
    rows = []
    runs = [(name, scale) for name in ("digits-class", "digits-class-weak") for scale in CLASS_SCALES]
    runs += [("digits-t2i", scale) for scale in T2I_SCALES]
    pipes = {}
    for name, scale in tqdm(runs, desc="zoo bench"):
        if name not in pipes:
            pipes[name] = zoo.load(name)
            pipes[name].set_progress_bar_config(disable=True)
        images = sample(pipes[name], labels, prompts, scale, args.steps, args.seed, args.batch_size)
        accuracy = classifier.accuracy(images * 2 - 1, torch.tensor(labels))
        score = ""
        if name == "digits-t2i":
            clip_score.reset()
            clip_score.update(images, prompts)
            score = f"{float(clip_score.compute()):.1f}"
        rows.append(f"| {name} | {scale:g} | {accuracy:.3f} | {fid_value(fid_held_out, images):.1f} | "
                    f"{fid_value(fid, images):.1f} | {score or '–'} |")
        if args.grid_dir is not None:
            order = torch.arange(len(images)).reshape(-1, NUM_CLASSES).T.reshape(-1)[: NUM_CLASSES * 8]
            save_grid(images[order], args.grid_dir / f"{name}-cfg{scale:g}.png", nrow=8)

    sizes = "\n".join(
        f"| {name} | {folder_mb(name):.2f} | {training_record(name).get('steps', '?')} | "
        f"{training_record(name).get('train_seconds', float('nan')) / 60:.1f} |" for name in zoo.list_models())
    n = args.per_class * NUM_CLASSES
    section = f"""## Model zoo (`scripts/bench_zoo.py`)

Samples: {n} per row ({args.per_class} per digit; for digits-t2i the prompts cycle through the
{len(CAPTION_TEMPLATES)} caption templates), DDIM {args.steps} steps, seed {args.seed}. Accuracy: the shipped
digits-classifier on the samples. FID-digits: Fréchet distance of the classifier's 64-d features against
the 360 held-out test images (the 1,437 real train images score {fid_train_vs_test:.1f}), and against the train
images (the real test images score {fid_test:.1f}). CLIP score: `tasks.metrics.CLIPScore` under digits-clip.

| model | CFG scale | accuracy | FID-digits vs test split | FID-digits vs train split | CLIP score |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- digits-classifier test accuracy (360 held-out digits): **{test_accuracy:.3f}**
- digits-clip zero-shot test accuracy (10 classes, caption templates averaged): **{zero_shot:.3f}**

| model | size (MB) | training steps | training time (min) |
|---|---|---|---|
{sizes}

Training times are from each model's `training.json` (1 CPU thread on a shared 2-core machine; digits-t2i
includes its VAE). This run took
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
