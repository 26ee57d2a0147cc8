"""Teach a text-to-image pipeline a new token from a few images: ``diffguide-personalize``.

    diffguide-personalize my_sevens/ --token "<s1>" --initializer-token digit --out runs/s1
    diffguide-personalize my_sevens/ --token "<s1>" --initializer-token digit --out runs/s1 --resume --steps 2000

Writes ``OUT/learned_embeds.safetensors`` (``{token: [1, d]}``), which any diffusers pipeline loads with
``pipe.load_textual_inversion(path, token="<s1>")``, and ``OUT/checkpoint/`` (optimizer state, subspace
history and generator state as safetensors + json) every ``--save-every`` steps; ``--resume`` continues from
it. ``--method zo`` (default) trains with forward passes only on int8 weights (ZOODiP); ``--method backprop``
is diffusers' textual inversion on float weights. ``--sample`` writes a grid of images of the learned token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DIGIT_TEMPLATES = ("a handwritten digit {}", "a drawing of the digit {}", "a handwritten {}", "the digit {}",
                   "the number {}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-personalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, help="folder of training images (png, jpg, ...)")
    p.add_argument("--token", required=True, help="the new placeholder token, e.g. '<s1>'")
    p.add_argument("--initializer-token", required=True, help="an existing single-token word to start from")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", default="digits-t2i", help="shipped model name, local folder or hub id")
    p.add_argument("--method", choices=("zo", "backprop"), default="zo")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-3 zo, 5e-4 backprop)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--directions", type=int, default=2, help="zo: random directions n per step")
    p.add_argument("--mu", type=float, default=1e-3, help="zo: finite-difference step")
    p.add_argument("--scaling", choices=("repo", "paper"), default="repo", help="zo: gradient normalisation")
    p.add_argument("--tau", type=int, default=128, help="zo: subspace history length and refresh period")
    p.add_argument("--nu", type=float, default=1e-3, help="zo: fraction of variance whose directions are removed")
    p.add_argument("--batch-directions", action="store_true",
                   help="zo: evaluate the n + 1 points in one batched forward pass (faster, more activation memory)")
    p.add_argument("--timesteps", default=None,
                   help="LOW:HIGH training timesteps, HIGH exclusive (default: 500:900 zo, all backprop)")
    p.add_argument("--quantize", choices=("int8", "none"), default=None,
                   help="weights (default: int8 for zo, none for backprop)")
    p.add_argument("--template", action="append", default=None,
                   help="caption template with '{}' for the token (repeatable; default: digit captions for "
                        "the digits model, photo captions otherwise)")
    p.add_argument("--flip-prob", type=float, default=None,
                   help="mirror-flip probability (default 0 for the digits model, 0.5 otherwise)")
    p.add_argument("--resize", action="store_true", help="resize and convert images of another size or mode")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=0, metavar="N", help="after training, write N samples to OUT/samples.png")
    p.add_argument("--prompt", default=None, help="prompt for --sample (default: the first template with the token)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "directions", "tau", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.timesteps is not None:
        try:
            low, high = (int(v) for v in args.timesteps.split(":"))
        except ValueError:
            p.error(f"--timesteps must be LOW:HIGH integers, got {args.timesteps!r}")
        args.timesteps = (low, high)
    return args


def run(args: argparse.Namespace) -> Path:
    import torch

    from diffguide.tasks import zoo
    from diffguide.tasks.personalize import (OBJECT_TEMPLATES, PersonalizeConfig, TextualInversion, expected_image_format,
                                   load_image_folder)

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = zoo.load(args.model, device=args.device)
    if not hasattr(pipe, "tokenizer"):
        raise ValueError(f"{args.model} is not a text-to-image pipeline")
    images = load_image_folder(args.images, *expected_image_format(pipe), resize=args.resize)
    digits = Path(str(args.model)).name == "digits-t2i"          # the shipped model or a copy of its folder
    config = PersonalizeConfig(
        method=args.method, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
        num_directions=args.directions, mu=args.mu, scaling=args.scaling, tau=args.tau, nu=args.nu,
        timestep_range=args.timesteps, seed=args.seed, save_every=args.save_every,
        flip_prob=args.flip_prob if args.flip_prob is not None else (0.0 if digits else 0.5),
        templates=tuple(args.template or (DIGIT_TEMPLATES if digits else OBJECT_TEMPLATES)),
        quantize=None if args.quantize is None else args.quantize == "int8", batch_directions=args.batch_directions)
    trainer = TextualInversion(pipe, images, args.token, args.initializer_token, config)
    path = trainer.train(args.out, resume=args.resume, progress=not args.no_progress)
    print(f"wrote {path} (token {args.token!r}, {trainer.step_count} steps, method {args.method}, "
          f"{len(images)} images)", file=sys.stderr)
    if args.sample:
        from diffguide.scripts.sample import make_grid

        prompt = args.prompt or config.templates[0].format(args.token)
        pipe.set_progress_bar_config(disable=True)
        samples = pipe([prompt] * args.sample, num_inference_steps=25, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(args.seed)).images
        grid = make_grid(samples, min(args.sample, 8))
        grid = grid.resize((grid.size[0] * 4, grid.size[1] * 4)) if grid.size[0] < 256 else grid
        grid.save(args.out / "samples.png")
        print(f"wrote {args.out / 'samples.png'} ({prompt!r})", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
