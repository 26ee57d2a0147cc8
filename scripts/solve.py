"""Solve an inverse problem with a diffusion prior: ``diffguide-solve``.

Takes a held-out test digit (``--index I``, one of the 360 of the scikit-learn digits' test split, or
``--digit-class D``, the first held-out digit of class D) or an image file (``--image PATH``, converted to the
model's size and channels), measures it with a task operator (``--task``, noise ``--sigma-y`` on [-1, 1]),
reconstructs it with a solver, and writes a captioned PNG ``measurement | reconstruction (PSNR) | truth`` plus
a JSON file with PSNR / SSIM, the solver's call counts, the settings and the digit's index and class.

    diffguide-solve --task inpaint_box --index 3 --solver mcg
    diffguide-solve --task sr4 --digit-class 7 --solver enkg --particles 16 --steps 50
    diffguide-solve --task inpaint_box --index 3 --solver p2l --model digits-t2i
    diffguide-solve --task heat --image my_digit.png --solver enkg --out heat.png

Pixel solvers (``dps``, ``dps_likelihood``, ``mcg``, ``enkg``, ``ddrm``, ``ddnm``, ``diffpir``, ``pigdm``, ``daps``,
``reddiff``, ``pinv``) use a class-conditional pipeline run
unconditionally (default ``digits-class``); latent solvers (``latent_dps``, ``psld``, ``p2l``) use a latent
text-to-image pipeline (default ``digits-t2i``) with the null prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffguide.scripts._cli import (HelpFormatter, check_device, check_image, check_pipeline, check_start,
                                    check_writable, load_model, number, set_threads)
from diffguide.tasks import inverse
from diffguide.tasks.digits import load_digits_tensors

DEFAULT_SCALES = {"dps": 1.0, "dps_likelihood": 1.0, "mcg": 1.0, "enkg": 0.5, "latent_dps": 1.0, "psld": 1.0,
                  "p2l": 1.0}
SOLVERS = (*inverse.PIXEL_SOLVERS, *inverse.LATENT_SOLVERS)
NUM_HELD_OUT = 360


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-solve", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", default="inpaint_box", choices=sorted(inverse.TASKS), help="measurement operator")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--index", type=number(int, 0, NUM_HELD_OUT - 1), default=None,
                        help=f"index of a held-out test digit, 0..{NUM_HELD_OUT - 1} (default: 0)")
    source.add_argument("--digit", dest="index", type=number(int, 0, NUM_HELD_OUT - 1),
                        help="deprecated name of --index (an index into the held-out digits, not a digit class)")
    source.add_argument("--digit-class", type=number(int, 0, 9), default=None,
                        help="take the first held-out digit of this class, 0..9")
    source.add_argument("--image", type=Path, help="an image file to measure instead of a digit")
    p.add_argument("--sigma-y", type=number(float, 0), default=0.05, help="measurement noise std on the [-1, 1] scale")
    p.add_argument("--solver", default="dps", choices=SOLVERS,
                   help="pixel solvers: " + ", ".join(inverse.PIXEL_SOLVERS) + "; latent solvers: "
                        + ", ".join(inverse.LATENT_SOLVERS))
    p.add_argument("--model", default=None, help="zoo name or folder (default digits-class for pixel solvers, "
                                                 "digits-t2i for latent ones)")
    p.add_argument("--steps", type=number(int, 1), default=100, help="sampling steps")
    p.add_argument("--scale", type=number(float), default=None, help="solver step scale (default 1 for every solver)")
    p.add_argument("--particles", type=number(int, 1), default=None,
                   help="samples per measurement (EnKG: ensemble size >= 2, default 16; others default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the operator, the noise and the sampler")
    p.add_argument("--zoom", type=number(int, 1, 64), default=8, help="nearest-neighbour magnification of the PNG")
    p.add_argument("--out", type=Path, default=Path("solve.png"), help="output PNG; metrics go next to it (.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if "--digit" in (argv if argv is not None else sys.argv[1:]):
        print("diffguide-solve: --digit is deprecated: it is an index into the held-out digits; use --index "
              "(or --digit-class for a digit class)", file=sys.stderr)
    if args.index is None and args.digit_class is None and args.image is None:
        args.index = 0
    check_writable(p, "--out", args.out)
    check_writable(p, "--out", args.out.with_suffix(".json"))
    args.device = check_device(p, args.device)
    latent = args.solver in inverse.LATENT_SOLVERS
    args.model = args.model or ("digits-t2i" if latent else "digits-class")
    if args.particles is not None and args.solver == "enkg" and args.particles < 2:
        p.error(f"argument --particles: EnKG needs an ensemble, got {args.particles}; give 2 or more")
    if args.image is not None:
        check_image(p, "--image", args.image)
    info = check_pipeline(p, "--model", args.model)
    if info is not None:
        wanted = "text" if latent else "class"
        if info.kind != wanted or info.latent != latent:
            kind = ("a latent text-to-image" if info.latent else "a class-conditional pixel"
                    if info.kind == "class" else "an unsupported")
            p.error(f"argument --solver: {args.solver} needs a {'latent text-to-image (e.g. digits-t2i)' if latent else 'class-conditional pixel (e.g. digits-class)'} "
                    f"model; --model {args.model} is {kind} model; pixel solvers: "
                    f"{', '.join(inverse.PIXEL_SOLVERS)}; latent solvers: {', '.join(inverse.LATENT_SOLVERS)}")
        try:
            check_problem(args, info.image_shape)
        except ValueError as err:
            p.error(str(err))
        if args.solver != "pinv":
            check_start(p, info.scheduler, args.steps, args.model)
    return args


def check_problem(args: argparse.Namespace, shape: tuple[int, int, int]) -> None:
    """What depends on the model's image ``shape``: a held-out digit needs 1x16x16, pinv a linear operator."""
    if args.image is None and tuple(shape) != inverse.DIGIT_SHAPE:
        raise ValueError(f"argument --index/--digit-class: held-out digits are 1x16x16 and --model {args.model} "
                         f"works on {'x'.join(map(str, shape))} images; pass --image")
    if args.solver == "pinv" and not getattr(inverse.make_task(args.task, args.sigma_y, shape=shape),
                                             "is_linear", False):
        raise ValueError(f"argument --solver: pinv needs a linear operator and --task {args.task} is not linear")


def held_out(args: argparse.Namespace) -> tuple[torch.Tensor, int, int]:
    """``(image (1, 1, 16, 16), index, digit class)`` of the held-out digit asked for."""
    images, labels = load_digits_tensors("test", size=16)
    index = args.index if args.digit_class is None else int((labels == args.digit_class).nonzero()[0])
    return images[index:index + 1], index, int(labels[index])


def load_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as ``(1, C, H, W)`` in [-1, 1], resized (bilinear, anti-aliased) to ``shape``."""
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    channels, height, width = shape
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array)
    return (tensor[None, None] if channels == 1 else tensor.permute(2, 0, 1)[None]).contiguous()


def measurement_preview(op, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A picture of the measurement at image size: ``y`` itself, ``A^+ y`` for linear resizing operators, or
    ``y`` min-max scaled and resized (nearest) otherwise."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y.clamp(-1, 1)
    if getattr(op, "is_linear", False) and y.shape[1] == shape[0]:
        return op.pinv(y).clamp(-1, 1)
    first = y[:, :1]
    lo, hi = first.amin(dim=(1, 2, 3), keepdim=True), first.amax(dim=(1, 2, 3), keepdim=True)
    scaled = 2 * (first - lo) / (hi - lo).clamp_min(1e-12) - 1
    return F.interpolate(scaled, size=shape[1:], mode="nearest").expand(-1, shape[0], -1, -1)


def to_png(panels: list[torch.Tensor], captions: list[list[str]], zoom: int, path: Path, title: str = "") -> None:
    """``(C, H, W)`` panels in [-1, 1] side by side, magnified ``zoom`` times, each captioned underneath (lines
    of ``captions``), under a ``title``; saved as PNG."""
    from PIL import ImageDraw

    from diffguide.scripts._cli import font, wrap

    pictures = []
    for panel in panels:
        array = ((panel.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = array.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
        pixels = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
        pictures.append(Image.fromarray(pixels.numpy()).convert("RGB"))
    small, pad, line = font(11), 6, 13
    cell = max(pictures[0].size[0], 110)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = len(pictures) * (cell + pad) + pad
    title_lines = wrap(probe, title, font(12), width - 2 * pad, 3) if title else []
    lines = [[row for text in caption for row in wrap(probe, text, small, cell, 3)] for caption in captions]
    top = pad + len(title_lines) * line + (pad if title_lines else 0)
    height = top + pictures[0].size[1] + pad + line * max(len(c) for c in lines) + pad
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for k, text in enumerate(title_lines):
        draw.text((pad, pad + k * line), text, fill="black", font=font(12))
    for i, (picture, caption) in enumerate(zip(pictures, lines)):
        x = pad + i * (cell + pad)
        image.paste(picture, (x + (cell - picture.size[0]) // 2, top))
        for k, text in enumerate(caption):
            draw.text((x, top + picture.size[1] + pad // 2 + k * line), text, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    latent = args.solver in inverse.LATENT_SOLVERS
    try:
        report = solve(args, latent)
    except (ValueError, TypeError, FloatingPointError, OSError) as err:
        raise SystemExit(f"diffguide-solve: error: {err}") from None
    print(f"{args.solver} on {args.task} ({report['source']}, sigma_y={args.sigma_y}): PSNR {report['psnr']:.2f} dB, "
          f"SSIM {report['ssim']:.3f}" + (f" over {report['particles']} particles" if report['particles'] > 1 else ""))
    print(f"wrote {args.out} (measurement | reconstruction | truth) and {args.out.with_suffix('.json')}")


def solve(args: argparse.Namespace, latent: bool) -> dict:
    """Load the model, measure, reconstruct, write the PNG and the JSON; returns the JSON's content."""
    pipe = load_model("--model", args.model, args.device)
    pipe.set_progress_bar_config(disable=True)
    if latent:
        if getattr(pipe, "vae", None) is None:
            raise ValueError(f"{args.solver} needs a latent text-to-image model; {args.model} has no VAE")
        shape = (pipe.vae.config.in_channels, pipe.vae.config.sample_size, pipe.vae.config.sample_size)
    else:
        if not hasattr(pipe, "null_class_label"):
            raise ValueError(f"{args.solver} needs a class-conditional pixel model; {args.model} is not one")
        size = pipe.unet.config.sample_size
        shape = (pipe.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    check_problem(args, shape)
    where: dict = {}
    if args.image is not None:
        truth, source = load_image(args.image, shape), str(args.image)
        where["image"] = str(args.image)
    else:
        truth, index, digit = held_out(args)
        source = f"held-out digit #{index} (a {digit})"
        where.update(index=index, digit_class=digit)
    op = inverse.make_task(args.task, args.sigma_y, seed=args.seed, shape=shape)
    y = op.measure(truth, torch.Generator().manual_seed(args.seed))
    scale = DEFAULT_SCALES.get(args.solver) if args.scale is None else args.scale
    particles = args.particles or (16 if args.solver == "enkg" else 1)
    progress = not args.no_progress
    if latent:
        recon, stats = inverse.solve_latent(pipe, op, y.expand(particles, *y.shape[1:]), args.solver,
                                            steps=args.steps, seed=args.seed, scale=scale, progress=progress)
    else:
        recon, stats = inverse.solve_pixel(pipe, op, y, args.solver, steps=args.steps, seed=args.seed,
                                           scale=scale, particles=particles, progress=progress)
    recon = recon.float().cpu()
    per_particle = inverse.scores(recon, truth.expand_as(recon))
    report = {
        "source": source, **where, "task": args.task, "operator": repr(op), "sigma_y": args.sigma_y,
        "solver": args.solver, "model": args.model, "steps": args.steps, "scale": scale, "particles": particles,
        "seed": args.seed, "psnr": float(per_particle["psnr"].mean()), "ssim": float(per_particle["ssim"].mean()),
        "psnr_per_particle": per_particle["psnr"].tolist(), "ssim_per_particle": per_particle["ssim"].tolist(),
        "calls_per_sample": stats.per_sample(recon.shape[0]), "png": str(args.out),
    }
    if getattr(op, "is_linear", False):
        baseline = inverse.scores(op.pinv(y).clamp(-1, 1), truth)
        report["pinv_psnr"], report["pinv_ssim"] = float(baseline["psnr"][0]), float(baseline["ssim"][0])
    first = inverse.scores(recon[:1], truth)
    captions = [["measurement", f"{args.task}, sigma_y {args.sigma_y:g}"],
                [f"reconstruction ({args.solver})", f"PSNR {float(first['psnr'][0]):.1f} dB, "
                                                    f"SSIM {float(first['ssim'][0]):.2f}"],
                ["truth", source]]
    title = (f"{args.solver} on {args.task}, {args.model}"
             + (f", {args.steps} steps, scale {scale:g}" if args.solver != "pinv" else "")
             + (f", particle 1 of {particles} (mean PSNR {report['psnr']:.1f} dB)" if particles > 1 else ""))
    to_png([measurement_preview(op, y, shape)[0], recon[0], truth[0]], captions, args.zoom, args.out, title)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
