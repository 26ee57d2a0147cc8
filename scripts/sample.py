"""Sample a grid of images from a diffusion pipeline with any guide: ``diffguide-sample``.

With no arguments it samples one image per digit from the shipped ``digits-class`` model with CFG and writes
``samples.png``. ``--model`` takes a shipped model name, a local folder or a hub id; ``--prompt`` drives
text-to-image models, ``--class-labels`` class-conditional ones; ``--guidance`` is a guide spec such as
``cfg``, ``apg:eta=0,norm_threshold=2`` or ``cfgpp`` with ``--scale`` its main scale.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from PIL import Image

from diffguide import guidance
from diffguide.tasks import zoo

SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, clip_sample=False),
    "euler": EulerDiscreteScheduler.from_config,
    "euler_ancestral": EulerAncestralDiscreteScheduler.from_config,
    "dpmpp_2m": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
}


DEFAULT_SCALES = {"cfgpp": 0.4}  # others: 2.0, good for the shipped digits models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-class", help="shipped model name, local folder or hub id")
    p.add_argument("--prompt", nargs="+", help="prompts (text-to-image models)")
    p.add_argument("--class-labels", nargs="+", type=int, help="class labels (class-conditional models)")
    p.add_argument("--guidance", default="cfg", help="guide spec NAME[:KEY=VALUE,...]; 'none' for no guidance")
    p.add_argument("--scale", type=float, default=None, help="the guide's main scale (lam for cfgpp; default 2, 0.4 for cfgpp)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / label")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--out", default="samples.png", help="output PNG (a grid)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error(f"--steps must be positive, got {args.steps}")
    if args.num_images <= 0:
        p.error(f"--num-images must be positive, got {args.num_images}")
    if args.prompt is not None and (not args.prompt or any(not s.strip() for s in args.prompt)):
        p.error("--prompt needs at least one non-empty prompt")
    return args


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile PIL images row-major into one picture."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def sample(args: argparse.Namespace) -> list[Image.Image]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = zoo.load(args.model, device=device)
    pipe.scheduler = SCHEDULERS[args.scheduler](pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.no_progress, desc="sampling")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    text_to_image = hasattr(pipe, "tokenizer")
    if text_to_image:
        if args.class_labels:
            raise SystemExit(f"{args.model} is a text-to-image model: use --prompt, not --class-labels")
        prompts = args.prompt or ["a handwritten digit " + w for w in ("zero", "one", "two", "three", "four")]
        call = dict(prompt=prompts, num_images_per_prompt=args.num_images)
    else:
        if args.prompt:
            raise SystemExit(f"{args.model} is class-conditional: use --class-labels, not --prompt")
        labels = args.class_labels if args.class_labels is not None else list(range(pipe.num_classes))
        call = dict(class_labels=labels, num_images_per_label=args.num_images)
    call.update(num_inference_steps=args.steps, generator=generator, output_type="pil")
    if args.guidance == "none":
        return pipe(guidance_scale=1.0, **call).images
    name, scales, params = guidance.parse_guide_spec(args.guidance)
    if scales:
        raise SystemExit("give one scale with --scale, not NAME@scales")
    scale = args.scale
    if scale is None and not {"scale", "lam"} & set(params):
        scale = DEFAULT_SCALES.get(name, 2.0)
    guide = guidance.build_guide(name, scale, **params)
    with guidance.apply(pipe, guide):
        return pipe(**call).images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        images = sample(args)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    cols = args.num_images if args.num_images > 1 else min(len(images), 10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, cols)
    factor = max(1, 64 // images[0].size[0])  # small digits: upscale so a person can see them
    if factor > 1:
        grid = grid.resize((grid.size[0] * factor, grid.size[1] * factor), Image.NEAREST)
    grid.save(out)
    print(f"wrote {out} ({len(images)} images, model {args.model}, guidance {args.guidance}, seed {args.seed})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
