"""Our inverse-problem solvers beside DeepInverse's on held-out digits, on the same denoiser and measurements.

Four tasks on 16x16 held-out digits with the shipped ``digits-class`` prior run unconditionally (null class),
``sigma_y = 0.05`` on [-1, 1]: 8x8 box inpainting, 4x average-pool super-resolution, Gaussian deblurring (9x9,
std 2, circular) and Fourier phase retrieval (nonlinear). Every solver of ours (``tasks.inverse.solve_pixel``) and
every DeepInverse 0.5 diffusion solver that applies (DPS, DDRM, DiffPIR, PiGDM through ``PosteriorDiffusion``) runs
at about 50 denoiser calls per image (to keep the run under 25 minutes on one thread). DeepInverse sees the same network through a denoiser wrapper (VE state and
level mapped to the network's VP state and continuous timestep) and our operators through its ``DecomposablePhysics``
(our SVD view) or ``Physics`` (phase retrieval). Each solver's main hyper-parameter is picked from a 3-point grid by
PSNR on train-split digits, then scored on the test digits: PSNR / SSIM mean ± standard error, denoiser calls per
image, and wall time relative to our DPS in the same run (one thread). DeepInverse is a benchmark-only dependency.

    python benchmarks/bench_inverse_peers.py                 # writes the inverse_peers section of BENCHMARKS.md
    python benchmarks/bench_inverse_peers.py --quick         # 2 images, no tuning, print only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import write_section
from diffguide.samplers.base import Level
from diffguide.tasks import inverse, zoo

CACHE = Path(__file__).resolve().parent.parent / "outputs" / "bench_inverse_peers.json"
TASKS = {"inpainting (8x8 box)": "inpaint_box", "4x SR (average pooling)": "sr4",
         "Gaussian deblurring": "deblur_gauss", "phase retrieval (nonlinear)": "phase_retrieval"}
# ours: label -> (solver, steps, scale grid, options, particles); None grid: the solver's default
STEPS = 50
OURS: dict[str, tuple] = {
    "DPS": ("dps", STEPS, [0.3, 1.0, 3.0], {}, 1),
    "MCG": ("mcg", STEPS, [1.0, 3.0, 10.0], {}, 1),
    "DDRM": ("ddrm", STEPS, [0.5, 0.85, 1.0], {}, 1),
    "DiffPIR": ("diffpir", STEPS, [0.3, 1.0, 3.5], {}, 1),
    "PiGDM": ("pigdm", STEPS, [0.3, 1.0, 3.0], {}, 1),
    "DAPS": ("daps", STEPS // 5, [1e-5, 3e-5, 1e-4], {"ode_steps": 5, "langevin_steps": 50}, 1),
    "RED-diff": ("reddiff", STEPS, [0.01, 0.05, 0.25], {}, 1),
    "EnKG (J = 8, defaults)": ("enkg", STEPS // 2, None, {}, 8),
}


# ------------------------------------------------------------------------------------------------- DeepInverse
class DenoiserWrapper(torch.nn.Module):
    """The digits network as a DeepInverse denoiser ``D(x, sigma)`` on VE states: ``range="pm1"`` for [-1, 1] data
    and levels, ``"unit"`` for [0, 1] ones (DeepInverse's convention, used by its DiffPIR). Counts network rows."""

    def __init__(self, pipe, value_range: str) -> None:
        super().__init__()
        self.base = inverse.class_denoiser(pipe)
        acp = pipe.scheduler.alphas_cumprod.double()
        self.log_sigmas = (((1 - acp) / acp).sqrt()).log().numpy()
        self.unit = value_range == "unit"
        self.rows = 0

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = float(torch.as_tensor(sigma).flatten()[0])
        if self.unit:
            x, sigma = 2 * x - 1, 2 * sigma
        if sigma <= 0:
            out = x
        else:
            alpha = 1 / math.sqrt(1 + sigma**2)
            t = float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.log_sigmas))))
            level = Level(torch.tensor(t), torch.tensor(alpha), torch.tensor(sigma * alpha), 0, 1)
            out = self.base((alpha * x).float(), level).to(x.dtype)
            self.rows += x.shape[0]
        return (out + 1) / 2 if self.unit else out


def deepinv_physics(op, unit: bool = False):
    """Our operator as DeepInverse physics: ``DecomposablePhysics`` from our SVD view (linear), ``Physics`` else."""
    import deepinv as dinv

    sigma = op.sigma_y / 2 if unit else op.sigma_y
    noise = dinv.physics.GaussianNoise(sigma)
    if getattr(op, "has_svd", False):
        return dinv.physics.DecomposablePhysics(U=op.U, U_adjoint=op.U_adjoint, V=op.V, V_adjoint=op.V_adjoint,
                                                mask=op.singular_values[None].float(), noise_model=noise)
    return dinv.physics.Physics(A=op.forward, noise_model=noise)


def run_deepinv(name: str, pipe, op, y: torch.Tensor, scale: float, seed: int) -> tuple[torch.Tensor, int]:
    """One DeepInverse solver at ``STEPS`` denoiser calls; returns (reconstructions in [-1, 1], network rows)."""
    import deepinv as dinv

    torch.manual_seed(seed)
    if name == "DiffPIR":
        den = DenoiserWrapper(pipe, "unit")
        ones = op.forward(torch.ones(1, *op.in_shape))
        solver = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(), sigma=op.sigma_y / 2, max_iter=STEPS,
                                       lambda_=scale)
        with torch.no_grad():
            out = solver((y + ones) / 2, deepinv_physics(op, unit=True)) * 2 - 1
        return out, den.rows
    den = DenoiserWrapper(pipe, "pm1")
    physics = deepinv_physics(op)
    if name == "DDRM":
        with torch.no_grad():
            out = dinv.sampling.DDRM(den, sigmas=np.linspace(1, 0, STEPS), eta=scale)(y, physics)
        return out, den.rows
    rng = torch.Generator().manual_seed(seed)
    if name == "DPS":
        solver = dinv.sampling.DPS(den, num_steps=STEPS + 1, weight=scale, rng=rng, minus_one_one=False, dtype=torch.float32)
    else:  # PiGDM: PiGDM's data fidelity in DeepInverse's posterior SDE, DDPM solver as for its DPS
        solver = dinv.sampling.PosteriorDiffusion(
            data_fidelity=dinv.sampling.PiGDMDataFidelity(weight=scale), denoiser=den,
            sde=dinv.sampling.VariancePreservingDiffusion(dtype=torch.float32),
            solver=dinv.sampling.DDPMSolver(timesteps=torch.linspace(1, 0, STEPS + 1), rng=rng), minus_one_one=False,
            dtype=torch.float32)
    out = solver(y, physics, x_init=(y.shape[0], *op.in_shape))   # a shape: drawn from the SDE (no A_dagger)
    return out.detach(), den.rows


DEEPINV: dict[str, tuple[list[float], bool]] = {    # name -> (grid of its weight / eta / lambda, linear only)
    "DPS": ([1.0, 3.0, 10.0], False),
    "DDRM": ([0.5, 0.85, 1.0], True),
    "DiffPIR": ([0.6, 2.0, 7.0], True),
    "PiGDM": ([0.01, 0.1, 1.0], True),
}


# ------------------------------------------------------------------------------------------------- runs
def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "se": se, "values": values.tolist()}


def _tune(run: Callable[[float], torch.Tensor], grid: list[float] | None, target: torch.Tensor) -> tuple:
    if not grid:
        return None, {}
    tuning = {}
    for scale in grid:
        try:
            psnr = float(inverse.scores(run(scale).clamp(-1, 1), target)["psnr"].mean())
            tuning[scale] = psnr if math.isfinite(psnr) else -math.inf
        except (FloatingPointError, RuntimeError, ValueError) as err:
            print(f"  scale {scale}: {type(err).__name__}", flush=True)
            tuning[scale] = -math.inf
    return max(tuning, key=tuning.__getitem__), tuning


def run(args) -> dict:
    import deepinv  # noqa: F401  (fail early: DeepInverse is needed for this benchmark)
    from bench_inverse import validation_digits

    torch.set_num_threads(1)
    pipe = zoo.load("digits-class")
    pipe.set_progress_bar_config(disable=True)
    truth = inverse.held_out_digits(list(range(args.images)))
    val = validation_digits(args.val_images)
    out: dict = {"images": args.images, "val_images": args.val_images, "sigma_y": args.sigma_y, "tasks": {}}
    for label, task in TASKS.items():
        if args.tasks and task not in args.tasks:
            continue
        op = inverse.make_task(task, args.sigma_y, seed=args.seed)
        y = op.measure(truth, torch.Generator().manual_seed(args.seed + 1))
        y_val = op.measure(val, torch.Generator().manual_seed(args.seed + 2))
        rows: dict = {}
        for name, (solver, steps, grid, options, particles) in OURS.items():
            if solver in ("mcg", "ddrm", "diffpir", "pigdm") and not op.is_linear or \
                    solver == "ddrm" and not getattr(op, "has_svd", False):
                continue
            n_test = min(args.enkg_images, len(truth)) if particles > 1 else len(truth)

            def ours(scale, yy, seed, solver=solver, steps=steps, options=options, particles=particles):
                return inverse.solve_pixel(pipe, op, yy, solver, steps=steps, seed=seed, scale=scale,
                                           particles=particles, **options)

            best, tuning = _tune(lambda s: ours(s, y_val, args.seed)[0], None if args.quick else grid, val)
            start = time.perf_counter()
            rec, stats = ours(best, y[:n_test], args.seed + 3)
            seconds = (time.perf_counter() - start) / n_test
            target = truth[:n_test].repeat_interleave(particles, 0)
            sc = inverse.scores(rec, target)
            rows[f"ours: {name}"] = {"scale": best, "tuning": tuning, "psnr": _summary(sc["psnr"]),
                                     "ssim": _summary(sc["ssim"]), "calls": stats.denoiser_calls / rec.shape[0],
                                     "seconds": seconds, "images": n_test, "particles": particles}
            print(f"{label} | ours {name}: {best} -> {rows[f'ours: {name}']['psnr']['mean']:.2f} dB", flush=True)
        for name, (grid, linear_only) in DEEPINV.items():
            if linear_only and not op.is_linear:
                continue
            best, tuning = _tune(lambda s: run_deepinv(name, pipe, op, y_val, s, args.seed)[0],
                                 None if args.quick else grid, val)
            best = grid[1] if best is None else best
            start = time.perf_counter()
            rec, calls = run_deepinv(name, pipe, op, y, best, args.seed + 3)
            seconds = (time.perf_counter() - start) / len(truth)
            sc = inverse.scores(rec.clamp(-1, 1), truth)
            rows[f"DeepInverse: {name}"] = {"scale": best, "tuning": tuning, "psnr": _summary(sc["psnr"]),
                                            "ssim": _summary(sc["ssim"]), "calls": calls / len(truth),
                                            "seconds": seconds, "images": len(truth), "particles": 1}
            print(f"{label} | DeepInverse {name}: {best} -> {rows[f'DeepInverse: {name}']['psnr']['mean']:.2f} dB",
                  flush=True)
        out["tasks"][label] = rows
        if not args.quick:                                   # keep finished tasks if a later one fails
            CACHE.parent.mkdir(exist_ok=True)
            CACHE.write_text(json.dumps({**out, "seconds": math.nan}, indent=1))
    return out


# ------------------------------------------------------------------------------------------------- report
def _paired(row: dict, other: dict) -> str:
    a, b = torch.tensor(row["psnr"]["values"]), torch.tensor(other["psnr"]["values"])
    n = min(len(a), len(b))
    gaps = (a[:n] - b[:n]).double()
    return f"{float(gaps.mean()):+.2f} ± {float(gaps.std() / math.sqrt(n)):.2f} dB"


def markdown(res: dict) -> str:
    lines = [
        f"### Our solvers beside DeepInverse 0.5 (`benchmarks/bench_inverse_peers.py`, {res['images']} held-out "
        f"digits, `sigma_y = {res['sigma_y']}`)",
        "",
        "`digits-class` prior run unconditionally; DeepInverse sees the same network (a VE denoiser wrapper mapping "
        "each level to the network's continuous timestep) and the same measurements of our operators (its "
        "`DecomposablePhysics` built from our SVD view). Each solver's main hyper-parameter (scale column: step / eta "
        "/ lambda / lr) is the best of a 3-point grid by PSNR on "
        f"{res['val_images']} train-split digits. PSNR (dB) / SSIM on [0, 1], mean ± standard error over images "
        "(EnKG: over the particles of its images); calls = denoiser evaluations per image (per particle for EnKG); "
        "time per image relative to our DPS in the same run (one thread). EnKG runs untuned at its defaults (scale "
        "0.5, at most 5 inner ODE steps: the values `bench_inverse.py` tuned) with 8 particles on one image. "
        "DeepInverse's DDRM and DiffPIR use their own level schedules (DDRM: `linspace(1, 0, 50)` with noise drawn at "
        "`sigma / sqrt(2)`), its DPS and PiGDM its VP SDE with the DDPM solver; ours use the network's own schedule.",
    ]
    for task, rows in res["tasks"].items():
        dps_time = rows["ours: DPS"]["seconds"]
        lines += ["", f"**{task}**", "", "| solver | scale | images | PSNR | SSIM | calls | time / our DPS |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row['scale'] if row['scale'] is not None else 'default'} | {row['images']} | "
                         f"{row['psnr']['mean']:.2f} ± {row['psnr']['se']:.2f} | "
                         f"{row['ssim']['mean']:.3f} ± {row['ssim']['se']:.3f} | {row['calls']:.0f} | "
                         f"{row['seconds'] / dps_time:.2f} |")
    lines += ["", "Reading (paired per-image PSNR differences, mean ± standard error):", "", *reading(res)]
    return "\n".join(lines)


def reading(res: dict) -> list[str]:
    out = []
    for task, rows in res["tasks"].items():
        ours = {k: v for k, v in rows.items() if k.startswith("ours") and v["particles"] == 1}
        theirs = {k: v for k, v in rows.items() if k.startswith("DeepInverse")}
        best_ours = max(ours, key=lambda k: ours[k]["psnr"]["mean"])
        best_theirs = max(theirs, key=lambda k: theirs[k]["psnr"]["mean"])
        a, b = torch.tensor(rows[best_ours]["psnr"]["values"]), torch.tensor(rows[best_theirs]["psnr"]["values"])
        gaps = (a[:len(b)] - b[:len(a)]).double()
        gap, se = float(gaps.mean()), float(gaps.std() / math.sqrt(len(gaps)))
        verdict = "at least as good" if gap >= 0 else \
            "behind by less than 2 standard errors: a tie" if gap > -2 * se else "worse"
        parts = [f"- {task}: our best ({best_ours[6:]}, {rows[best_ours]['calls']:.0f} calls) minus DeepInverse's "
                 f"best ({best_theirs[13:]}, {rows[best_theirs]['calls']:.0f} calls): "
                 f"{_paired(rows[best_ours], rows[best_theirs])} ({verdict})."]
        shared = [n[13:] for n in theirs if f"ours: {n[13:]}" in rows]
        if shared:
            parts.append(" Shared solvers, ours minus theirs: " + ", ".join(
                f"{n} {_paired(rows[f'ours: {n}'], rows[f'DeepInverse: {n}'])}" for n in shared) + ".")
        out.append("".join(parts))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="held-out digits per task")
    parser.add_argument("--val-images", type=int, default=3, help="train-split digits for tuning")
    parser.add_argument("--enkg-images", type=int, default=1, help="held-out digits for EnKG (8 particles each)")
    parser.add_argument("--sigma-y", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=None, choices=list(TASKS.values()))
    parser.add_argument("--quick", action="store_true", help="2 images, no tuning, print only")
    parser.add_argument("--no-write", action="store_true", help="print the markdown instead of writing it")
    parser.add_argument("--report", action="store_true", help="only rewrite the section from the cached results")
    args = parser.parse_args(argv)
    if args.report:
        res = json.loads(CACHE.read_text())
        write_section("inverse_peers", markdown(res) + f"\n\n({res['seconds'] / 60:.0f} min on one thread.)")
        return
    if args.quick:
        args.images, args.enkg_images = 2, 1
    start = time.time()
    res = run(args)
    res["seconds"] = time.time() - start
    text = markdown(res) + f"\n\n({res['seconds'] / 60:.0f} min on one thread.)"
    if args.quick or args.no_write:
        print(text)
        return
    CACHE.parent.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(res, indent=1))
    write_section("inverse_peers", text)


if __name__ == "__main__":
    main()
