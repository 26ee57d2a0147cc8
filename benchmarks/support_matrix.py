"""Which guide runs on which diffusers pipeline under ``guidance.apply``: a generated support matrix.

Every cell is measured on a tiny random-weight pipeline (``tests/tiny_pipes.py``, 2 steps, batch 1):
``exact`` — the pipeline's native CFG is reproduced bit for bit (``~exact`` — to float32 rounding, where the
pipeline's own expression differs from CFG's); ``runs`` — the guided call finishes with finite latents of the
native shape; ``refused`` — apply raises up front, with its reason. Served classes without a tiny build (their row
read from the pipeline's source, argument names checked against the network's ``forward``) are listed as such.
Writes ``docs/support_matrix.md`` (every served class x guide) and the ``support-matrix`` block of README.md (a
summary by family, linking it); ``--check`` instead exits 1 if either is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from diffguide import guidance  # noqa: E402
from diffguide.guidance.families import family_of, native_guide  # noqa: E402
from common import write_section  # noqa: E402
import tiny_pipes  # noqa: E402
from zoo_harness import all_builds  # noqa: E402
from diffguide.guidance.families import FAMILIES, supported_pipelines  # noqa: E402

README = ROOT / "README.md"
MATRIX = ROOT / "docs" / "support_matrix.md"
SCALE = 4.0

GUIDES: dict[str, Callable[[], guidance.Guidance]] = {
    "APG": lambda: guidance.APG(SCALE, norm_threshold=5.0),
    "CFG-Zero*": lambda: guidance.CFGZeroStar(SCALE),
    "CFGRescale": lambda: guidance.CFGRescale(SCALE, 0.7),
    "AG": lambda: guidance.AdaptiveGuidance(SCALE, threshold=0.5),
    "Interval(CFG)": lambda: guidance.GuidanceInterval(guidance.CFG(SCALE), sigma_lo=0.5),
    "CFG++": lambda: guidance.CFGPlusPlus(0.6),
    "Rectified-CFG++": lambda: guidance.RectifiedCFGPlusPlus(1.5),
}


def _classic(make, **kw):
    return make, lambda s: dict(kw, guidance_scale=s)


def pipelines() -> dict[str, tuple[Callable, Callable[[float], dict]]]:
    """name -> (builder, call arguments for native CFG at scale s), batch 1, 2 steps, latents out."""
    rows = {
        "StableDiffusionPipeline": _classic(tiny_pipes.tiny_sd, prompt=["a cat"], height=16, width=16),
        "StableDiffusionXLPipeline": _classic(tiny_pipes.tiny_sdxl, prompt=["a cat"], height=16, width=16),
        "DiTPipeline": _classic(tiny_pipes.tiny_dit, class_labels=[1], output_type="np"),
        "ClassConditionalPipeline": _classic(tiny_pipes.tiny_class_pipe, class_labels=[3], output_type="np"),
    }
    for name, (make, _, native_kw) in tiny_pipes.PIPELINES.items():
        embeds = tiny_pipes.embeds(name, 1)
        rows[type(make()).__name__] = (make, lambda s, e=embeds, k=native_kw: dict(e, **k(s)))
    for key, (make, call) in all_builds().items():  # tests/tiny_zoo*.py: img2img, inpaint, ControlNet, ...
        rows[key if key[0].isupper() else type(make()).__name__] = (make, call)
    return rows


def _run(pipe, kw: dict) -> torch.Tensor:
    kw = dict({"output_type": "latent", "num_inference_steps": 2}, **kw)  # DiT and ClassConditionalPipeline
    return torch.as_tensor(pipe(**kw, generator=torch.Generator().manual_seed(0))[0])  # decode: numpy images


def _refusal(error: Exception) -> str:
    """apply's reason, its last clause (``...; got X`` -> ``got X``)."""
    return f"refused ({str(error).split('; ')[-1].split('. ')[0].replace('|', '/')})"


def cell(pipe, kw: dict, guide: guidance.Guidance, native: torch.Tensor) -> str:
    """``exact`` / ``~exact (max gap)`` against ``native``, ``fails`` (non-finite or misshapen), or the refusal."""
    try:
        with guidance.apply(pipe, guide):
            out = _run(pipe, kw)
    except (TypeError, ValueError) as error:
        return _refusal(error)
    if not bool(torch.isfinite(out).all()) or out.shape != native.shape:
        return "fails"
    return "exact" if torch.equal(out, native) else f"~exact ({float((out - native).abs().max()):.0e})"


def compute(only: set[str] | None = None) -> list[list[str]]:
    torch.set_num_threads(1)
    table = []
    for name, (make, native_kw) in pipelines().items():
        if only is not None and name not in only:
            continue
        pipe = make()
        native = _run(pipe, native_kw(SCALE))
        family = family_of(pipe)
        no_scale = {k: v for k, v in native_kw(SCALE).items() if k != family.scale_arg}
        row = [name, family.layout, f"`{family.native}`", cell(pipe, no_scale, native_guide(family, SCALE), native)]
        row += [_runs(pipe, no_scale, make_guide(), native) for make_guide in GUIDES.values()]
        table.append(row)
    return table


def _runs(pipe, kw: dict, guide: guidance.Guidance, native: torch.Tensor) -> str:
    """A guide other than the native one: ``runs`` when it finishes with finite latents of the native shape."""
    status = cell(pipe, kw, guide, native)
    return "runs" if status.startswith(("exact", "~exact")) or status == "runs" else status


def render(table: list[list[str]]) -> str:
    """The full matrix (docs/support_matrix.md): measured rows, then the served classes without a tiny build."""
    head = ["pipeline", "CFG layout", "native CFG as a guide", "native CFG", *GUIDES]
    lines = ["# Support matrix", "",
             f"Written by `benchmarks/support_matrix.py` (tiny random-weight pipelines, batch 1, 2 steps or 4 at "
             f"strength 0.6, scale {SCALE:g}; `exact`: bit-identical to the native call; `runs`: finite latents of the "
             "native shape). Any other pipeline class is refused up front with its reason and the served list. CFG++ "
             "needs a scheduler whose step it can split (`guidance.scheduler_step.SUPPORTED_SCHEDULERS`); "
             "Rectified-CFG++ a flow pipeline whose network time apply can move to the predicted level "
             "(`Family.flow_time`) and no ControlNet residuals.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    measured = {row[0] for row in table}
    unmeasured = [(name, family) for family in FAMILIES for name in family.pipelines if name not in measured]
    if not unmeasured:
        return "\n".join(lines) + "\n"
    lines += ["", "## Served without a tiny build", "",
              "Rows read from each pipeline's `__call__` in diffusers 0.42.1 (the network's `forward` takes the row's "
              "argument names: `tests/test_pipeline_zoo.py`), not yet run on a tiny build. Flow rows among them refuse "
              "passes at other levels (`flow_time` unset).", "",
              "| pipeline | CFG layout | native CFG as a guide | fields |", "|---|---|---|---|"]
    lines += [f"| {name} | {family.layout} | `{family.native}` | {_fields(family)} |" for name, family in unmeasured]
    return "\n".join(lines) + "\n"


def _fields(family) -> str:
    """What a zoo row declares beyond its layout."""
    parts = [f"conditioning {family.conditioning} (dim {family.conditioning_dim})" if family.conditioning else "",
             f"start {family.start}" if family.start != "begin_index" else "",
             f"repeated per frame: {', '.join(family.repeated)}" if family.repeated else "",
             "ControlNet residuals" if family.residuals else "", "learned variance" if family.variance else ""]
    return ", ".join(p for p in parts if p) or "-"


def summary(table: list[list[str]]) -> str:
    """README's block: one line per family row, how many of its classes were measured, and a link."""
    measured = {row[0]: row for row in table}
    served = len(supported_pipelines())
    lines = [f"`apply` serves {served} diffusers pipeline classes, one family row per CFG block "
             "(`guidance/families.py`); every other class is refused up front with its reason. "
             + ("Every one of them is measured on a tiny random-weight build (native CFG reproduced, every guide run "
                "or refused with its reason). " if served == len(measured) else
                f"{len(measured)} of them are measured on tiny random-weight builds; the other "
                f"{served - len(measured)} are served from a reading of their `__call__` in diffusers 0.42.1 and have "
                "not been run here. ")
             + "A network call whose batch is not the layout's multiple is refused at run time. The full matrix, "
             "every served class x guide: [docs/support_matrix.md](docs/support_matrix.md) (written by "
             "`benchmarks/support_matrix.py`).", "",
             "| family (first class) | classes | CFG layout | measured on a tiny build | native CFG there |",
             "|---|---|---|---|---|"]
    for family in FAMILIES:
        built = [name for name in family.pipelines if name in measured]
        native = sorted({measured[name][3] for name in built}) if built else ["-"]
        lines.append(f"| {family.pipelines[0]} | {len(family.pipelines)} | {family.layout} | {len(built)} | "
                     f"{', '.join(native)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README's matrix differs from a fresh one")
    parser.add_argument("--only", nargs="+", metavar="CLASS", help="measure these classes only and print their rows "
                        "(writes nothing)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only) - set(pipelines()))
        if unknown:
            parser.error(f"no tiny build of {', '.join(unknown)}")
        print("\n".join("| " + " | ".join(row) + " |" for row in compute(set(args.only))))
        return 0
    table = compute()
    text, short = render(table), summary(table)
    if args.check:
        stale = [str(path.relative_to(ROOT)) for path, part in ((MATRIX, text), (README, short))
                 if not path.exists() or part not in path.read_text()]
        if stale:
            print(f"{', '.join(stale)}: the support matrix is stale: run python benchmarks/support_matrix.py")
            return 1
        return 0
    MATRIX.write_text(text)
    write_section("support-matrix", short, path=README)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
