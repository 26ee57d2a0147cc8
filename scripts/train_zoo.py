"""Retrain the embedded model zoo (``tasks/zoo/``) reproducibly.

    python scripts/train_zoo.py --model all                 # everything, into a new folder ./zoo-DATE-XXXX/
    python scripts/train_zoo.py --model digits-class --out /tmp/zoo --steps 500
    python scripts/train_zoo.py --quick                     # a few steps of each, into a temp dir
    python scripts/train_zoo.py --model all --overwrite-shipped     # replace the shipped models in tasks/zoo/

Each model directory also gets a ``training.json`` with the seed, steps, wall time and the numbers
measured right after training.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parents[1] / "tasks" / "zoo"
MODELS = ("digits-classifier", "digits-class", "digits-class-weak", "digits-t2i", "digits-clip", "digits-flow")
STEPS = {"digits-classifier": 800, "digits-class": 2500, "digits-class-weak": 300,
         "digits-t2i": 3500, "digits-clip": 2000, "digits-flow": 6000}
VAE_STEPS = 800
QUICK_STEPS = {**dict.fromkeys(MODELS, 3), "digits-class-weak": 2}
QUICK_BATCH = 8


def train_one(name: str, out: Path, steps: int, *, quick: bool, batch_size: int | None, seed: int,
              progress: bool) -> dict:
    """Train model ``name`` into ``out / name``; returns its measured numbers."""
    from diffguide.tasks import training

    kwargs = {"seed": seed, "progress": progress, **({"batch_size": batch_size} if batch_size else {})}
    target = out / name
    plan = QUICK_STEPS if quick else STEPS
    class_steps, weak_steps = plan["digits-class"], plan["digits-class-weak"]
    if name == "digits-classifier":
        return training.train_classifier(target, steps=steps, **kwargs)
    if name == "digits-class":             # also writes digits-class-weak, its early EMA snapshot
        snapshots = {weak_steps: out / "digits-class-weak"} if weak_steps < steps else None
        return training.train_class_diffusion(target, steps=steps, snapshots=snapshots, **kwargs)
    if name == "digits-class-weak":        # alone: the first `steps` steps of the digits-class run
        return training.train_class_diffusion(target, steps=class_steps, stop_after=steps, **kwargs)
    if name == "digits-t2i":
        return training.train_t2i(target, steps=steps, vae_steps=plan["digits-t2i"] if quick else VAE_STEPS, **kwargs)
    if name == "digits-clip":
        return training.train_clip(target, steps=steps, **kwargs)
    if name == "digits-flow":              # on digits-t2i's VAE and tokenizer: this run's if trained, else shipped
        from diffguide.tasks.training_flow import train_flow

        base = out / "digits-t2i" if (out / "digits-t2i" / "model_index.json").is_file() else ZOO_DIR / "digits-t2i"
        return train_flow(target, base, steps=steps, **kwargs)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def shipped_zoo_folders() -> set[Path]:
    """The zoo folders whose files are shipped: this script's ``tasks/zoo`` and the importable package's."""
    folders = {ZOO_DIR.resolve()}
    try:
        from diffguide.tasks import zoo

        folders.add(zoo.ZOO_DIR.resolve())
    except ImportError:                       # run from a checkout without the package importable
        pass
    return folders


def output_folder(out: Path | None, names: list[str], quick: bool, overwrite_shipped: bool) -> Path:
    """Where to write: ``out``; by default a new folder (a temp dir with ``quick``; ``./zoo-DATE-XXXX`` otherwise;
    the shipped zoo with ``overwrite_shipped``). ``ValueError`` if a model folder would land inside a shipped zoo
    folder without ``overwrite_shipped``."""
    if out is None:
        if overwrite_shipped:
            return ZOO_DIR
        prefix = "zoo-quick-" if quick else time.strftime("zoo-%Y%m%d-")
        return Path(tempfile.mkdtemp(prefix=prefix, dir=None if quick else Path.cwd()))
    shipped = shipped_zoo_folders()
    targets = [out.expanduser().resolve() / name for name in names]
    hit = next((t for t in targets if any(t == z or z in t.parents for z in shipped)), None)
    if hit is not None and not overwrite_shipped:
        raise ValueError(f"--out {str(out)!r} would overwrite the shipped model in {str(hit)!r}; pass "
                         "--overwrite-shipped to replace it, or choose another folder")
    return out


def write_record(folder: Path, record: dict) -> None:
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", choices=(*MODELS, "all"), help="model to train")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: a new folder ./zoo-DATE-XXXX, a temp dir with --quick, "
                             "tasks/zoo with --overwrite-shipped)")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help="allow replacing the models shipped in the package's tasks/zoo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: per model)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a few steps of each model, small batches")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    names = list(MODELS) if args.model == "all" else [args.model]
    if "digits-class" in names and "digits-class-weak" in names:
        names.remove("digits-class-weak")             # the digits-class run writes it
    written = names + (["digits-class-weak"] if "digits-class" in names else [])
    try:
        args.out = output_folder(args.out, written, args.quick, args.overwrite_shipped)
    except ValueError as err:
        parser.error(str(err))

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    for name in names:
        steps = args.steps or (QUICK_STEPS if args.quick else STEPS)[name]
        batch_size = args.batch_size or (QUICK_BATCH if args.quick else None)
        start = time.perf_counter()
        print(f"== {name}: {steps} steps -> {args.out / name}", flush=True)
        result = train_one(name, args.out, steps, quick=args.quick, batch_size=batch_size, seed=args.seed,
                           progress=not args.no_progress)
        common = {"seed": args.seed, "threads": args.threads}
        write_record(args.out / name, {"model": name, **common, **result,
                                       "wall_seconds": round(time.perf_counter() - start, 1)})
        for key, seconds in result.items():
            if key.startswith("snapshot_"):                # snapshot_<step>_seconds: digits-class-weak
                write_record(args.out / "digits-class-weak",
                             {"model": "digits-class-weak", **common, "steps": int(key.split("_")[1]),
                              "schedule_steps": steps, "batch_size": result["batch_size"],
                              "snapshot_of": "digits-class", "train_seconds": seconds})
        print(json.dumps({"model": name, **result}), flush=True)
    print(f"done: {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
