"""Teach a text-to-image pipeline a new token from a few images: ``diffguide-personalize``.

    diffguide-personalize my_sevens/ --token "<s1>" --initializer-token digit --out runs/s1
    diffguide-personalize my_sevens/ --token "<s1>" --initializer-token digit --out runs/s1 --resume --steps 2000

Writes ``OUT/learned_embeds.safetensors`` (``{token: [1, d]}``), which any diffusers pipeline loads with
``pipe.load_textual_inversion(path, token="<s1>")``, and ``OUT/checkpoint/`` (optimizer state, subspace
history and generator state as safetensors + json) every ``--save-every`` steps; ``--resume`` continues from
it. ``--method zo`` (default) trains with forward passes only on int8 weights (ZOODiP); ``--method backprop``
is diffusers' textual inversion on float weights. ``--sample`` writes a grid of images of the learned token.
``--save-quantized DIR`` also writes the int8 pipeline (before the token is added) to DIR; later runs train
from it with ``--quantized DIR`` instead of ``--model``, with no float weights loaded at all.

    diffguide-personalize my_sevens/ --model sd15/ --save-quantized sd15-int8/ --token "<s1>" ... --out runs/s1
    diffguide-personalize my_sevens/ --quantized sd15-int8/ --token "<s2>" ... --out runs/s2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from diffguide.scripts._cli import HelpFormatter, one_line_warnings, pipeline_image_format, wrong_images

SAMPLE_STEPS, SAMPLE_SCALE = 25, 2.0           # how --sample draws its images
DIGIT_TEMPLATES = ("a handwritten digit {}", "a drawing of the digit {}", "a handwritten {}", "the digit {}",
                   "the number {}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-personalize", description=__doc__,
                                formatter_class=HelpFormatter)       # keeps the example lines, one default each
    p.add_argument("images", type=Path, help="folder of training images (png, jpg, ...)")
    p.add_argument("--token", required=True, help="the new placeholder token, e.g. '<s1>'")
    p.add_argument("--initializer-token", required=True, help="an existing single-token word to start from")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", default=None,
                   help="shipped model name, local float checkpoint folder or hub id (int8 runs load it layer by "
                        "layer); default digits-t2i, or with --quantized the model it must have been made from")
    p.add_argument("--quantized", type=Path, default=None, metavar="DIR",
                   help="zo: train from an int8 pipeline folder written by --save-quantized (no float weights)")
    p.add_argument("--save-quantized", type=Path, default=None, metavar="DIR",
                   help="zo: also write the int8 pipeline loaded from --model to the new folder DIR")
    p.add_argument("--method", choices=("zo", "backprop"), default="zo",
                   help="zo: forward passes only, int8 weights (ZOODiP); backprop: diffusers' textual inversion")
    p.add_argument("--steps", type=int, default=1000, help="steps in all (with --resume, including those done)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-3 zo, 5e-4 backprop)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per step, at most images x mirrors x templates")
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
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (starts afresh if none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every draw: images, flips, templates, noise, timesteps, directions, --sample")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="after training, write N samples to OUT/samples.png")
    p.add_argument("--prompt", default=None, help="prompt for --sample (default: the first template with the token)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the shipped model, the fastest for it; torch's otherwise)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every usage mistake, before any model is loaded (``ValueError`` with one line naming the option). The
    checks of arguments and configs run before torch is imported."""
    from diffguide.tasks.zoo import resolve_model

    for name in ("steps", "batch_size", "directions", "tau", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.sample < 0:
        raise ValueError(f"--sample must be >= 0 (number of images), got {args.sample}")
    if args.prompt is not None and (args.sample == 0 or not args.prompt.strip()):
        raise ValueError("--prompt needs --sample N > 0 and a non-empty prompt")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    for name in ("token", "initializer_token"):
        value = getattr(args, name)
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"--{name.replace('_', '-')} must be one word without spaces, got {value!r}")
    if args.timesteps is not None:
        try:
            low, high = (int(v) for v in str(args.timesteps).split(":"))
        except ValueError:
            raise ValueError(f"--timesteps must be LOW:HIGH integers, got {args.timesteps!r}") from None
        if not 0 <= low < high:
            raise ValueError(f"--timesteps must satisfy 0 <= LOW < HIGH, got {args.timesteps!r}")
        args.timesteps = (low, high)
    source = _check_quantized_options(args)
    try:
        args.model_folder = resolve_model(args.quantized or args.model or "digits-t2i")
    except Exception as err:                       # unknown name, missing folder, hub error
        raise ValueError(f"--model: {err}") from None
    option = f"--quantized {args.quantized}" if args.quantized else f"--model {args.model or 'digits-t2i'}"
    index = args.model_folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{option}: not a diffusers pipeline folder (no model_index.json)")
    components = json.loads(index.read_text())
    if not (components.get("tokenizer") or [None])[0] or not (components.get("text_encoder") or [None])[0]:
        raise ValueError(f"{option}: not a text-to-image pipeline (no tokenizer/text encoder)")
    num_train = json.loads((args.model_folder / "scheduler" / "scheduler_config.json").read_text()).get(
        "num_train_timesteps", 1000) if (args.model_folder / "scheduler" / "scheduler_config.json").is_file() else 1000
    args.num_train_timesteps = num_train
    if args.timesteps is not None and args.timesteps[1] > num_train:
        raise ValueError(f"--timesteps HIGH must be <= the model's {num_train} training timesteps, got {args.timesteps[1]}")
    import torch

    from diffguide.tasks.personalize import (IMAGE_EXTENSIONS, OBJECT_TEMPLATES, PersonalizeConfig, check_batch_size,
                                             checkpoint_exists)

    digits = Path(source).name == "digits-t2i"          # the shipped model or a copy of its folder
    args.config = PersonalizeConfig(
        method=args.method, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
        num_directions=args.directions, mu=args.mu, scaling=args.scaling, tau=args.tau, nu=args.nu,
        timestep_range=args.timesteps, seed=args.seed, save_every=args.save_every,
        flip_prob=args.flip_prob if args.flip_prob is not None else (0.0 if digits else 0.5),
        templates=tuple(args.template or (DIGIT_TEMPLATES if digits else OBJECT_TEMPLATES)),
        quantize=None if args.quantize is None else args.quantize == "int8", batch_directions=args.batch_directions)
    try:
        resolved = args.config.resolved(num_train)
    except ValueError as err:                      # names the config field; map it to the option
        raise ValueError(f"{err} ({_option_names(str(err))})") from None
    if not args.images.is_dir():
        raise ValueError(f"image folder {str(args.images)!r} does not exist or is not a folder")
    num_images = sum(1 for f in args.images.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if num_images == 0:
        raise ValueError(f"no images in {str(args.images)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    image_format = None if args.resize else pipeline_image_format(args.model_folder)
    if image_format is not None:
        size, mode = image_format
        wrong = wrong_images(args.images, size, mode, IMAGE_EXTENSIONS)
        if wrong:
            raise ValueError(f"images must be {size}x{size} in mode {mode!r} for {option.split()[-1]}; got "
                             f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; pass --resize to resize "
                             "and convert them")
    try:
        check_batch_size(resolved, num_images)
    except ValueError as err:
        raise ValueError(f"--batch-size: {err}") from None
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} exists and is not a folder")
    existing = next((p for p in (args.out, *args.out.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(args.out)!r} cannot be written ({str(existing)!r} is not writable)")
    _check_tokens(args, option)
    if checkpoint_exists(args.out) and not args.resume:
        raise ValueError(f"--out {str(args.out)!r} already holds a checkpoint; pass --resume to continue it or "
                         "choose another output folder")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: MPS is not available here; use --device cpu")


def _check_tokens(args: argparse.Namespace, option: str) -> None:
    """``--token`` is new to the model's tokenizer and ``--initializer-token`` one of its tokens, read from the
    tokenizer's files in ``args.model_folder`` (no weights are read)."""
    from diffguide.tasks.personalize import check_placeholder_token, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model_folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{option}: cannot read its tokenizer ({type(err).__name__}: {err})") from None
    try:
        check_placeholder_token(tokenizer, args.token, args.initializer_token)
    except ValueError as err:
        name = "--initializer-token" if str(err).startswith("initializer_token") else "--token"
        raise ValueError(f"{name}: {err}") from None


def _check_quantized_options(args: argparse.Namespace) -> str:
    """``--quantized`` / ``--save-quantized`` against the method and each other; returns the source model's name."""
    float_weights = args.method == "backprop" or args.quantize == "none"
    float_option = "--method backprop" if args.method == "backprop" else "--quantize none"
    for option, value in (("--quantized", args.quantized), ("--save-quantized", args.save_quantized)):
        if value is not None and float_weights:
            raise ValueError(f"{option} is for int8 weights, and {float_option} trains on float weights: pass the "
                             "float checkpoint with --model")
    if args.quantized is not None and args.save_quantized is not None:
        raise ValueError("--save-quantized writes the int8 pipeline loaded from --model; --quantized already is one")
    if args.save_quantized is not None and args.save_quantized.exists() and (
            not args.save_quantized.is_dir() or any(args.save_quantized.iterdir())):
        raise ValueError(f"--save-quantized {str(args.save_quantized)!r} exists and is not an empty folder")
    if args.quantized is None:
        return str(args.model or "digits-t2i")
    from diffguide.tasks.quantize import read_int8_manifest

    try:
        manifest = read_int8_manifest(args.quantized)
    except ValueError as err:
        raise ValueError(f"--quantized: {err}") from None
    if args.model is not None:                      # checked against the folder's manifest when loading
        from diffguide.tasks.zoo import resolve_model

        try:
            resolve_model(args.model)
        except Exception as err:
            raise ValueError(f"--model: {err}") from None
    return str(args.model or manifest.get("source") or args.quantized)


def _option_names(message: str) -> str:
    options = {"learning_rate": "--lr", "num_directions": "--directions", "timestep_range": "--timesteps",
               "flip_prob": "--flip-prob", "templates": "--template", "mu": "--mu", "nu": "--nu"}
    return ", ".join(option for field, option in options.items() if message.startswith(field)) or "options"


def run(args: argparse.Namespace) -> Path:
    import torch

    from diffguide.tasks.personalize import (TextualInversion, check_checkpoint_fits, checkpoint_exists,
                                             expected_image_format, load_image_folder, load_pipeline,
                                             read_checkpoint_meta)

    from diffguide.scripts._cli import set_threads

    set_threads(args.threads, [] if args.quantized else [args.model or "digits-t2i"])
    config = args.config
    if args.resume and not checkpoint_exists(args.out):
        print(f"--resume: no checkpoint in {args.out}, starting afresh from step 0", file=sys.stderr)
    elif args.resume:
        meta = read_checkpoint_meta(args.out)                 # a damaged checkpoint is named before loading
        check_checkpoint_fits(meta, config.resolved(args.num_train_timesteps), token=args.token,
                              initializer_token=args.initializer_token)       # before any weight is read
        if meta["step"] > config.steps:
            raise ValueError(f"the checkpoint in {args.out} is at step {meta['step']}, past --steps {config.steps}; "
                             f"pass --steps {meta['step']} or more")
        print(f"--resume: continuing {args.out} from step {meta['step']}", file=sys.stderr)
    if args.quantized is not None:                           # no float weights at all
        from diffguide.tasks.quantize import load_saved_int8_pipeline

        pipe = load_saved_int8_pipeline(args.quantized, model=args.model, device=args.device)
    else:
        pipe = load_pipeline(args.model_folder, config.resolved().quantize, device=args.device)
    if args.save_quantized is not None:
        from diffguide.tasks.quantize import save_int8_pipeline

        save_int8_pipeline(pipe, args.save_quantized)
        print(f"wrote the int8 pipeline to {args.save_quantized} (train from it with --quantized)", file=sys.stderr)
    images = load_image_folder(args.images, *expected_image_format(pipe), resize=args.resize)
    trainer = TextualInversion(pipe, images, args.token, args.initializer_token, config)
    import gc

    from diffguide.tasks.quantize import release_freed_memory

    gc.collect()                     # the loading's and the token's freed buffers go back to the OS before training
    release_freed_memory()
    path = trainer.train(args.out, resume=args.resume, progress=not args.no_progress)
    print(f"wrote {path} (token {args.token!r}, {trainer.step_count} steps, method {args.method}, "
          f"{len(images)} images)", file=sys.stderr)
    if args.sample:
        from diffguide.scripts.sample import labelled_grid

        prompt = args.prompt or config.templates[0].format(args.token)
        pipe.set_progress_bar_config(disable=True)
        samples = pipe([prompt] * args.sample, num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_SCALE,
                       generator=torch.Generator().manual_seed(args.seed)).images
        grid = labelled_grid(samples, [prompt] * args.sample, args.sample, sample_title(args, trainer.step_count),
                             columns=8)
        grid.save(args.out / "samples.png")
        print(f"wrote {args.out / 'samples.png'} ({prompt!r})", file=sys.stderr)
    return path


def sample_title(args: argparse.Namespace, step: int) -> str:
    """The caption of ``samples.png``: what was learned, from which model, after how many steps, how sampled."""
    model = args.quantized or args.model or "digits-t2i"
    return (f"{args.token} learned from {args.images} after {step} steps ({args.method}) | {model} | "
            f"{SAMPLE_STEPS} steps, guidance {SAMPLE_SCALE:g}, seed {args.seed}")


@one_line_warnings("diffguide-personalize")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError) as err:                 # runtime failures: one line, exit 1
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
