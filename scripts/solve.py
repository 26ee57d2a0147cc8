"""Solve an inverse problem with a diffusion prior: ``diffguide-solve``.

Takes a held-out test digit (``--index I``, one of the 360 of the scikit-learn digits' test split, or
``--digit-class D``, the first held-out digit of class D) or an image file (``--image PATH``, any size and mode,
resized to the prior's image size and converted to its channels), measures it with a task operator (``--task``,
noise ``--sigma-y`` on [-1, 1]), reconstructs it with a solver, and writes a captioned PNG
``measurement | reconstruction (PSNR) | truth`` plus a JSON file with PSNR / SSIM, the solver's call counts, the
settings, the prior and the digit's index and class.

    diffguide-solve --task inpaint_box --index 3 --solver mcg
    diffguide-solve --task sr4 --digit-class 7 --solver enkg --particles 16 --steps 50
    diffguide-solve --task inpaint_box --index 3 --solver p2l --model digits-t2i
    diffguide-solve --task heat --image my_digit.png --solver enkg --out heat.png
    diffguide-solve --task sr4 --image face.png --solver dps --model google/ddpm-celebahq-256   # needs the hub

Pixel solvers (``dps``, ``dps_likelihood``, ``mcg``, ``enkg``, ``ddrm``, ``ddnm``, ``diffpir``, ``pigdm``, ``daps``,
``reddiff``, ``pinv``) take a pixel prior: a pipeline over a
``UNet2DModel`` (``DDPMPipeline``, ``DDIMPipeline``, the class-conditional ``digits-class``, the default, run
unconditionally unless ``--label`` is given) or a bare ``UNet2DModel`` folder with its ``scheduler_config.json``.
Latent solvers (``latent_dps``, ``psld``, ``p2l``) take a latent pipeline: Stable Diffusion, SDXL, SD3 or Flux
conditioned on ``--prompt`` (default: the null prompt; default model ``digits-t2i``), or DiT (``--label``; not
``p2l``, which tunes a text embedding). ``--model`` is a shipped name, a folder or a hub id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from diffguide.scripts._cli import (HelpFormatter, PipelineInfo, check_device, check_image, check_pipeline,
                                    check_start, check_writable, device_name, number, one_line_warnings, set_threads)
from diffguide.tasks import problems   # names only: tasks.inverse (torch) is imported where it solves

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_SCALES = {"dps": 1.0, "dps_likelihood": 1.0, "mcg": 1.0, "enkg": 0.5, "latent_dps": 1.0, "psld": 1.0,
                  "p2l": 1.0}
SOLVERS = (*problems.PIXEL_SOLVERS, *problems.LATENT_SOLVERS)
NUM_HELD_OUT = 360


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-solve", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", default="inpaint_box", choices=sorted(problems.TASKS), help="measurement operator")
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
                   help="pixel solvers: " + ", ".join(problems.PIXEL_SOLVERS) + "; latent solvers: "
                        + ", ".join(problems.LATENT_SOLVERS))
    p.add_argument("--model", default=None, help="prior: shipped name, pipeline or UNet2DModel folder, or hub id "
                                                 "(default digits-class for pixel solvers, digits-t2i for latent ones)")
    p.add_argument("--prompt", default=None, help="prompt of a latent text-to-image prior (default: the null prompt)")
    p.add_argument("--label", type=number(int, 0), default=None,
                   help="class of a class-conditional prior (default: its null class, i.e. unconditional)")
    p.add_argument("--steps", type=number(int, 1), default=100, help="sampling steps")
    p.add_argument("--scale", type=number(float), default=None, help="solver step scale (default 1 for every solver)")
    p.add_argument("--particles", type=number(int, 1), default=None,
                   help="samples per measurement (EnKG: ensemble size >= 2, default 16; others default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the operator, the noise and the sampler")
    p.add_argument("--zoom", type=number(int, 1, 64), default=8, help="nearest-neighbour magnification of the PNG")
    p.add_argument("--out", type=Path, default=Path("solve.png"), help="output PNG; metrics go next to it (.json)")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads (default: 1 for the shipped models, fastest for them; torch's otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if "--digit" in (argv if argv is not None else sys.argv[1:]):
        print("diffguide-solve: --digit is deprecated: it is an index into the held-out digits; use --index "
              "(or --digit-class for a digit class)", file=sys.stderr)
    if args.index is None and args.digit_class is None and args.image is None:
        args.index = 0
    check_writable(p, "--out", args.out)
    check_writable(p, "--out", args.out.with_suffix(".json"))
    latent = args.solver in problems.LATENT_SOLVERS
    args.model = args.model or ("digits-t2i" if latent else "digits-class")
    if args.particles is not None and args.solver == "enkg" and args.particles < 2:
        p.error(f"argument --particles: EnKG needs an ensemble, got {args.particles}; give 2 or more")
    if args.image is not None:
        check_image(p, "--image", args.image)
    if args.prompt is not None and not latent:
        p.error(f"argument --prompt: a prompt conditions latent text-to-image priors; {args.solver} is a pixel "
                f"solver (latent solvers: {', '.join(problems.LATENT_SOLVERS)})")
    info = unet_folder_info(args.model) or check_pipeline(p, "--model", args.model)
    if info is not None:
        problem = prior_problem(args, info, latent)
        if problem:
            p.error(problem)
        try:
            check_problem(args, info.image_shape)
        except ValueError as err:
            p.error(str(err))
        if args.solver != "pinv":
            check_start(p, info.scheduler, args.steps, args.model)
    args.device = check_device(p, args.device)
    return args


# tasks.priors.LATENT_PIPELINES, repeated so that checking a command line imports no torch (a test keeps them equal)
LATENT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                    "DiTPipeline")
PIXEL_HINT = "a pixel prior (a UNet2DModel pipeline such as DDPMPipeline, or class-conditional such as digits-class)"
LATENT_HINT = "a latent prior (a latent text-to-image pipeline: SD, SDXL, SD3, Flux, e.g. digits-t2i; or DiT)"


def unet_folder_info(name: str) -> PipelineInfo | None:
    """What a local bare ``UNet2DModel`` folder's configs say (``None`` for anything else)."""
    folder = Path(name).expanduser()
    config = folder / "config.json"
    if (folder / "model_index.json").is_file() or not config.is_file():
        return None
    try:
        unet = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(unet, dict) or unet.get("_class_name") != "UNet2DModel":
        return None
    where = next((f for f in (folder, folder / "scheduler") if (f / "scheduler_config.json").is_file()), None)
    size = unet.get("sample_size", 0)
    height, width = (size, size) if isinstance(size, int) else size
    classes = unet.get("num_class_embeds")
    scheduler = json.loads((where / "scheduler_config.json").read_text()) if where else None
    return PipelineInfo(kind="unet", latent=False, num_classes=classes - 1 if classes else None,
                        image_shape=(unet.get("in_channels", 0), height, width), scheduler=scheduler)


def prior_problem(args: argparse.Namespace, info: PipelineInfo, latent: bool) -> str | None:
    """Why ``--model`` (its configs, ``info``) cannot serve ``--solver`` / ``--prompt`` / ``--label``, or ``None``."""
    model = f"--model {args.model} is " + (f"a {'latent' if info.latent else 'pixel'} {info.pipeline_class}"
                                           if info.pipeline_class else "a UNet2DModel folder")
    solvers = (f"pixel solvers: {', '.join(problems.PIXEL_SOLVERS)}; latent solvers: "
               f"{', '.join(problems.LATENT_SOLVERS)}")
    if latent and not (info.latent and info.pipeline_class in LATENT_PIPELINES):
        return f"argument --solver: {args.solver} needs {LATENT_HINT}; {model}; {solvers}"
    if not latent and info.latent:
        return f"argument --solver: {args.solver} needs {PIXEL_HINT}; {model}; {solvers}"
    if info.kind == "unet" and info.scheduler is None:
        return (f"argument --model: {args.model} holds a UNet2DModel but no scheduler_config.json (next to it or in "
                "scheduler/), so its noise schedule and prediction type are unknown")
    text = info.pipeline_class != "DiTPipeline"
    if latent and not text and args.solver == "p2l":
        return (f"argument --solver: p2l tunes a text embedding and {args.model} is class-conditional DiT; "
                "use latent_dps or psld")
    if latent and text and info.kind != "text":
        return (f"argument --model: {model} without a tokenizer and text encoder to encode the prompt; give one "
                "with them, or pass prompt_embeds to tasks.priors.LatentPrior.from_pipeline in Python")
    if latent and not text and args.prompt is not None:
        return f"argument --prompt: {args.model} is class-conditional DiT; give --label instead"
    if args.label is not None:
        if latent and text:
            return f"argument --label: {model}, conditioned on a prompt; give --prompt instead"
        if not latent and info.num_classes is None:
            return f"argument --label: {model} with an unconditional network (no class embeddings)"
        if not latent and args.label > info.num_classes:
            return f"argument --label: {args.label} is not a class of {args.model}, 0..{info.num_classes}"
    elif not latent and info.kind != "class" and info.num_classes is not None:
        return (f"argument --label: {model} with a class-conditional network and no known null class; give "
                f"--label 0..{info.num_classes}")
    return None


class UsageError(ValueError):
    """A command line the loaded prior cannot serve (found only after loading, e.g. for a hub id): exit 2."""


def check_problem(args: argparse.Namespace, shape: tuple[int, int, int]) -> None:
    """What depends on the model's image ``shape``: a held-out digit needs 1x16x16, an image file 1, 3 or 4
    channels; the solver, an operator it can use (gradient solvers no black box, mcg and pinv a linear one). Builds
    the operator, loads no weights."""
    from diffguide.tasks.inverse import make_task

    if args.image is not None and shape[0] not in IMAGE_MODES:
        raise ValueError(f"argument --image: --model {args.model} works on {shape[0]}-channel images; image files "
                         "convert to 1, 3 or 4 channels")
    if args.image is None and tuple(shape) != problems.DIGIT_SHAPE:
        raise ValueError(f"argument --index/--digit-class: held-out digits are 1x16x16 and --model {args.model} "
                         f"works on {'x'.join(map(str, shape))} images; pass --image")
    operator = make_task(args.task, args.sigma_y, shape=shape)
    if args.solver not in problems.DERIVATIVE_FREE_SOLVERS and getattr(operator, "is_blackbox", False):
        raise ValueError(f"argument --solver: {args.solver} differentiates through the forward model and --task "
                         f"{args.task} is a black box without gradients; use --solver enkg (derivative-free)")
    if args.solver in problems.LINEAR_SOLVERS and not getattr(operator, "is_linear", False):
        raise ValueError(f"argument --solver: {args.solver} needs a linear operator and --task {args.task} is not "
                         f"linear; use --solver dps or enkg")


def held_out(args: argparse.Namespace) -> tuple[torch.Tensor, int, int]:
    """``(image (1, 1, 16, 16), index, digit class)`` of the held-out digit asked for."""
    from diffguide.tasks.digits import load_digits_tensors

    images, labels = load_digits_tensors("test", size=16)
    index = args.index if args.digit_class is None else int((labels == args.digit_class).nonzero()[0])
    return images[index:index + 1], index, int(labels[index])


IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}   # channels of a prior -> the PIL mode an image is converted to
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")   # 16/32-bit integer and float gray images


def load_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file of any size and mode as ``(1, C, H, W)`` in [-1, 1]: converted to ``C`` channels by PIL
    (``L``: ITU-R 601 luma; ``RGB`` from gray repeats it; 16-bit and float images are scaled to 8 bits first), and
    resized (bilinear, anti-aliased) to ``H x W`` without keeping the aspect ratio."""
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    channels, height, width = shape
    if channels not in IMAGE_MODES:
        raise ValueError(f"the prior makes {channels}-channel images; image files convert to 1, 3 or 4 channels")
    with Image.open(path) as image:
        if image.mode in WIDE_MODES:
            image = eight_bit(image)
        image = image.convert(IMAGE_MODES[channels]).resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array)
    return (tensor[None, None] if channels == 1 else tensor.permute(2, 0, 1)[None]).contiguous()


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer image (full range 0..65535) or a float one (range 0..1) as 8-bit gray ``L``;
    PIL's own ``convert("L")`` clips such images at 255 instead of scaling them."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    full = 1.0 if image.mode == "F" else 65535.0
    return Image.fromarray((np.clip(array / full, 0, 1) * 255).round().astype(np.uint8), "L")


def measurement_preview(op, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A picture of the measurement at image size: ``y`` itself, ``A^+ y`` for linear resizing operators, or
    ``y`` min-max scaled and resized (nearest) otherwise."""
    import torch.nn.functional as F

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
    import torch
    from PIL import Image, ImageDraw

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


@one_line_warnings("diffguide-solve")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads, [args.model])
    latent = args.solver in problems.LATENT_SOLVERS
    try:
        report = solve(args, latent)
    except UsageError as err:
        print(f"diffguide-solve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError, FloatingPointError, OSError) as err:
        raise SystemExit(f"diffguide-solve: error: {err}") from None
    print(f"{args.solver} on {args.task} ({report['source']}, sigma_y={args.sigma_y}): PSNR {report['psnr']:.2f} dB, "
          f"SSIM {report['ssim']:.3f}" + (f" over {report['particles']} particles" if report['particles'] > 1 else ""))
    print(f"wrote {args.out} (measurement | reconstruction | truth) and {args.out.with_suffix('.json')}")


def solve(args: argparse.Namespace, latent: bool) -> dict:
    """Load the model, measure, reconstruct, write the PNG and the JSON; returns the JSON's content."""
    import torch

    from diffguide.tasks import inverse, priors

    try:
        pipe = priors.load_pipeline(args.model, device=args.device)
    except Exception as err:      # noqa: BLE001 - any loading failure is reported as one line
        raise ValueError(f"--model {args.model}: cannot load it: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    try:
        prior = inverse.latent_prior(pipe, args.prompt or "", args.label) if latent else \
            inverse.pixel_prior(pipe, args.label)
        if latent and not prior.text and args.solver == "p2l":
            raise ValueError(f"p2l tunes a text embedding and {args.model} is class-conditional; "
                             "use latent_dps or psld")
        shape = prior.image_shape
        check_problem(args, shape)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
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
        recon, stats = inverse.solve_latent(prior, op, y.expand(particles, *y.shape[1:]), args.solver,
                                            steps=args.steps, seed=args.seed, scale=scale, progress=progress)
    else:
        recon, stats = inverse.solve_pixel(prior, op, y, args.solver, steps=args.steps, seed=args.seed,
                                           scale=scale, particles=particles, progress=progress)
    recon = recon.float().cpu()
    per_particle = inverse.scores(recon, truth.expand_as(recon))
    report = {
        "source": source, **where, "task": args.task, "operator": repr(op), "sigma_y": args.sigma_y,
        "solver": args.solver, "model": args.model, "prior": repr(prior), "prompt": args.prompt, "label": args.label,
        "steps": args.steps, "scale": scale, "particles": particles,
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
             + (f", {args.steps} steps" if args.solver != "pinv" else "")
             + (f", scale {scale:g}" if args.solver != "pinv" and scale is not None else "")
             + (f", particle 1 of {particles} (mean PSNR {report['psnr']:.1f} dB)" if particles > 1 else ""))
    to_png([measurement_preview(op, y, shape)[0], recon[0], truth[0]], captions, args.zoom, args.out, title)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
