"""Accuracy of each sampler on exact 1-D and 2-D Gaussian mixtures vs the number of steps, on VP and flow plans.

The network is the exact MMSE denoiser of the mixture (``tasks.gmm``), so every error is the sampler's
discretisation error plus Monte-Carlo noise. VP rows: DDPM linear betas, Euler linspace sigmas; flow rows:
FlowMatchEuler sigmas (shift 1 and 3, first level pure noise) with the mixture's exact velocity network
(``tasks.gmm.FlowMatchingGMM``) read through ``guidance.GuidedDenoiser`` as a flow transformer is.
Reported per plan, sampler and step count: sliced W2 to the exact mixture (exact quantiles, 128 directions),
mean error, largest variance error, covariance error (Frobenius), and mode-mass error (total variation between
``E[r_k(x)]`` and the weights); the first row gives the same numbers for exact draws of the same size (the
Monte-Carlo floor). Writes the ``samplers`` section of BENCHMARKS.md.

The ``nfe`` part compares every loop in ``samplers.SAMPLERS`` (the k-diffusion set included) by network
evaluations: sliced W2 to the exact 1-D and 8-D mixtures vs the number of denoiser calls, on a Karras VP plan and
a flow plan (shift 3, from pure noise), with the fewest evaluations each sampler needs to reach a given W2. Writes
the ``samplers-nfe`` section and ``docs/bench_samplers_nfe.png``.

    python benchmarks/bench_samplers.py                      # 2e4 (1-D) / 4e3 (2-D) particles, 10 to 100 steps (< 5 min)
    python benchmarks/bench_samplers.py --particles 2000 --no-write
    python benchmarks/bench_samplers.py --part nfe           # evaluations vs W2 (< 10 min)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffguide.guidance import GuidedDenoiser
from diffguide.samplers import SAMPLERS, GaussianNoise, karras_plan, plan_from_scheduler
from common import save_figure, write_section
from diffguide.tasks.gmm import ClassConditionalGMM, FlowMatchingGMM, GaussianMixture, SlicedWasserstein

F64 = torch.float64


def bench_mixture(dim: int) -> GaussianMixture:
    """The mixtures of ``tests/test_samplers.py``: 1-D two modes, 2-D three unequal correlated modes."""
    if dim == 1:
        return GaussianMixture.isotropic(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[-2.0], [2.0]], dtype=F64),
                                         torch.tensor([0.25, 0.5], dtype=F64))
    covs = torch.tensor([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]],
                        dtype=F64)
    return GaussianMixture(torch.tensor([0.3, 0.5, 0.2], dtype=F64),
                           torch.tensor([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]], dtype=F64), covs)


def errors(samples: torch.Tensor, mixture: GaussianMixture, sliced: SlicedWasserstein) -> dict[str, float]:
    centred = samples - samples.mean(0)
    cov = centred.T @ centred / len(samples)
    masses = mixture.responsibilities(samples).mean(0)
    return {
        "sw2": float(sliced(samples)),
        "mean": float((samples.mean(0) - mixture.mean()).norm()),
        "var": float((torch.diagonal(cov) - torch.diagonal(mixture.cov())).abs().max()),
        "cov": float((cov - mixture.cov()).norm()),
        "mass": float(0.5 * (masses - mixture.weights).abs().sum()),
    }


SETTINGS = {  # name -> (sampler, extra kwargs)
    "ddim (eta=0)": ("ddim", {"eta": 0.0}),
    "ddim (eta=1)": ("ddim", {"eta": 1.0}),
    "euler": ("euler", {}),
    "euler_ancestral": ("euler_ancestral", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "renoise": ("renoise", {}),
}
STOCHASTIC = ("ddim", "euler_ancestral", "renoise")
SCHEDULES = {  # name -> scheduler whose levels the plan reads
    "VP": EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "flow, shift 1": FlowMatchEulerDiscreteScheduler(shift=1.0),
    "flow, shift 3": FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=4_000, help="particles per run in 2-D")
    parser.add_argument("--particles-1d", type=int, default=20_000, help="particles per run in 1-D (cheap)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="independent runs (seeds) averaged in every row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    parser.add_argument("--part", choices=["accuracy", "nfe", "all"], default="all",
                        help="accuracy: the steps table (section samplers); nfe: W2 vs evaluations (samplers-nfe)")
    parser.add_argument("--nfe-steps", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--nfe-particles", type=int, default=4_000, help="particles per run in 8-D (nfe part)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part in ("nfe", "all"):
        nfe_part(args)
    if args.part == "nfe":
        return

    vp_scheduler = SCHEDULES["VP"]
    start, cpu_start = time.perf_counter(), time.process_time()
    tables = []
    for dim in args.dims:
        mixture = bench_mixture(dim)
        vp_denoise = ClassConditionalGMM([mixture], vp_scheduler.alphas_cumprod).denoiser(None)
        flow_net = FlowMatchingGMM([mixture])
        flow_denoise = GuidedDenoiser(lambda x, t, c: flow_net.velocity(x, t), None, None, prediction_type="flow")
        particles = args.particles_1d if dim == 1 else args.particles
        # in 1-D every direction is +-1 and gives the same W2
        sliced = SlicedWasserstein(mixture, 128 if dim > 1 else 1, torch.Generator().manual_seed(args.seed))

        def averaged(draw) -> dict[str, float]:
            runs = [errors(draw(args.seed + 10 * r), mixture, sliced) for r in range(args.repeats)]
            return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}

        rows = [("-", "exact draws (Monte-Carlo floor)", "-",
                 averaged(lambda seed: mixture.sample(particles, torch.Generator().manual_seed(seed + 1))))]
        for schedule, scheduler in SCHEDULES.items():
            denoise = vp_denoise if schedule == "VP" else flow_denoise
            for name, (key, kwargs) in SETTINGS.items():
                for steps in args.steps:
                    plan = plan_from_scheduler(scheduler, steps)

                    def run(seed: int) -> torch.Tensor:
                        x = torch.randn(particles, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
                        extra = dict(kwargs)
                        if key in STOCHASTIC:
                            extra["generator"] = torch.Generator().manual_seed(seed + 3)
                        return SAMPLERS[key](denoise, x, plan, disable=True, **extra)

                    rows.append((schedule, name, str(steps), averaged(run)))
                    print(dim, schedule, name, steps, rows[-1][3], flush=True)

        # VP: the same sampler started from exact draws of p_T instead of N(0, I) isolates the start's bias
        # (a flow plan starts at pure noise, where N(0, I) is exact)
        plan = plan_from_scheduler(vp_scheduler, max(args.steps))
        alpha_T, sigma_T = plan.alpha(0).item(), plan.sigma_vp(0).item()

        def run_exact_start(seed: int) -> torch.Tensor:
            z = torch.randn(particles, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
            x0 = mixture.sample(particles, torch.Generator().manual_seed(seed + 4))
            return SAMPLERS["dpmpp_2m"](vp_denoise, alpha_T * x0 + sigma_T * z, plan, disable=True)

        rows.append(("VP", "dpmpp_2m, started from exact p_T", str(max(args.steps)), averaged(run_exact_start)))
        lines = [f"**{dim}-D** ({mixture.num_components} components, {particles} particles per run)", "",
                 "| plan | sampler | steps | sliced W2 | mean | max var | covariance (F) | mode mass (TV) |",
                 "|---|---|---|---|---|---|---|---|"]
        for schedule, name, steps, err in rows:
            lines.append(f"| {schedule} | {name} | {steps} | {err['sw2']:.4f} | {err['mean']:.4f} | {err['var']:.4f} | "
                         f"{err['cov']:.4f} | {err['mass']:.4f} |")
        tables.append("\n".join(lines))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    intro = (
        "Written by `benchmarks/bench_samplers.py`: each sampler driven by the exact denoiser of a Gaussian mixture "
        "(`tasks.gmm`), particles from `torch.randn`, float64, one torch thread, every row the mean over "
        f"{args.repeats} seeds ({cpu:.0f} s of CPU time, {elapsed:.0f} s wall on a shared machine). Plans: "
        "**VP** = DDPM linear betas (1e-4 to 0.02, T = 1000), `EulerDiscreteScheduler` linspace sigmas ending at 0; "
        "**flow, shift 1 / 3** = `FlowMatchEulerDiscreteScheduler` sigmas (first level s = 1, pure noise; VE sigma "
        "s / (1 - s)) with the mixture's exact velocity network (`tasks.gmm.FlowMatchingGMM`) read through "
        "`guidance.GuidedDenoiser` (flow-scaled input, velocity -> x0). Errors to the exact mixture: sliced W2 "
        "(128 directions in 2-D, exact quantiles), |mean error|, largest per-coordinate variance error, Frobenius "
        "covariance error, total variation of the mode masses E[r_k(x)]. The first row of each table is the "
        "Monte-Carlo floor (exact draws of the same size); rows near it are within sampling noise (every plan starts "
        "from the same N(0, I) draws, so deterministic samplers share one Monte-Carlo error at many steps). DDIM "
        "with eta = 0 is Euler and DDIM with eta = 1 is Euler-ancestral in VE form, so those rows coincide (same "
        "initial noise and noise generator); `renoise` is x' = alpha' x0 + sigma' z (FlowMatchEuler's "
        "`stochastic_sampling`): with an MMSE denoiser it does not converge (each step replaces the state by "
        "alpha' E[x0 | x] + sigma' z, whose law is narrower than p_t'; its error grows with the steps), it suits "
        "networks whose x0 is a sample (consistency-type models). On the VP plan, starting from N(0, I) rather "
        "than p_T (alpha_T = 0.0064, sigma_VE = 157) leaves a step-independent bias, about 0.01 in the 1-D mean "
        "(Gaussian estimate |mean(x0)| std(x0) / sigma_VE); the last row of each table starts from exact p_T "
        "draws instead. A flow plan starts at pure noise, where N(0, I) is exact.")
    text = intro + "\n\n" + "\n\n".join(tables)
    print(text)
    if not args.no_write:
        write_section("samplers", "## Samplers on an exact Gaussian mixture\n\n" + text)


# ------------------------------------------------------------------------------------------------------------
# network evaluations vs sliced W2, every sampler
# ------------------------------------------------------------------------------------------------------------
NFE_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "heun", "dpm_2", "dpm_2_ancestral", "lms", "unipc",
                "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
NFE_STOCHASTIC = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                  "dpmpp_3m_sde"}


def mixture_8d() -> GaussianMixture:
    """Four correlated 8-D Gaussians with unequal weights (fixed draw, seed 0)."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(4, 8, generator=g, dtype=F64)
    factors = torch.randn(4, 8, 8, generator=g, dtype=F64) / math.sqrt(8)
    covs = 0.3 * factors @ factors.transpose(1, 2) + 0.05 * torch.eye(8, dtype=F64)
    return GaussianMixture(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64), means, covs)


class Counted:
    """A denoiser that counts its calls (network evaluations)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x, level):
        self.calls += 1
        return self.fn(x, level)


def nfe_to_reach(points: list[tuple[int, float]], target: float) -> float:
    """Fewest evaluations with W2 <= target, log-log interpolated between measured points (inf if never)."""
    points = sorted(points)
    for k, (nfe, w2) in enumerate(points):
        if w2 <= target:
            if k == 0:
                return float(nfe)
            (n0, w0), (n1, w1) = points[k - 1], (nfe, w2)
            frac = (math.log(w0) - math.log(target)) / (math.log(w0) - math.log(w1))
            return math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    return math.inf


def nfe_part(args) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    vp = SCHEDULES["VP"]
    abar = vp.alphas_cumprod.to(F64)
    table = ((1 - abar) / abar).sqrt()
    plans = {  # name -> steps -> plan
        "VP, Karras": lambda n: karras_plan(n, sigma_min=float(table.min()), sigma_max=float(table.max()),
                                            scheduler=vp),
        "flow, shift 3": lambda n: plan_from_scheduler(SCHEDULES["flow, shift 3"], n),
    }
    results = {}  # (dim, plan, sampler) -> [(nfe, w2)]
    floors = {}
    for dim, mixture, particles in ((1, bench_mixture(1), args.particles_1d), (8, mixture_8d(), args.nfe_particles)):
        sliced = SlicedWasserstein(mixture, 1 if dim == 1 else 128, torch.Generator().manual_seed(args.seed))
        floors[dim] = sum(float(sliced(mixture.sample(particles, torch.Generator().manual_seed(args.seed + 10 * r))))
                          for r in range(args.repeats)) / args.repeats
        exact = ClassConditionalGMM([mixture], vp.alphas_cumprod).denoiser()  # reads the level's alpha, sigma
        for plan_name, make_plan in plans.items():
            for name in NFE_SAMPLERS:
                points = []
                for steps in args.nfe_steps[: -1 if name == "dpmpp_sde" and len(args.nfe_steps) > 1 else None]:
                    plan, w2s, calls = make_plan(steps), [], 0
                    for r in range(args.repeats):
                        seed = args.seed + 10 * r
                        x = torch.randn(particles, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
                        model = Counted(exact)
                        # one normal draw per step: fresh normals have the law of the Brownian tree's increments
                        # (whose queries would dominate the run time); DPM++ SDE's two draws per step are nested
                        # increments of one path, so it keeps its default Brownian tree
                        extra = {"noise_sampler": GaussianNoise(x, torch.Generator().manual_seed(seed + 3))} \
                            if name in NFE_STOCHASTIC - {"euler_ancestral", "dpmpp_sde"} else \
                            {"generator": torch.Generator().manual_seed(seed + 3)} if name in NFE_STOCHASTIC else {}
                        out = SAMPLERS[name](model, x, plan, disable=True, **extra)
                        w2s.append(float(sliced(out)))
                        calls = model.calls
                    points.append((calls, sum(w2s) / len(w2s)))
                    print(dim, plan_name, name, steps, points[-1], flush=True)
                results[(dim, plan_name, name)] = points
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    text = nfe_report(results, floors, plans, args, cpu, elapsed)
    print(text)
    if not args.no_write:
        plot_nfe(results, floors, plans, Path(__file__).resolve().parent.parent / "docs" / "bench_samplers_nfe.png")
        write_section("samplers-nfe", "## Samplers: sliced W2 vs network evaluations\n\n" + text)


def nfe_report(results, floors, plans, args, cpu, elapsed) -> str:
    lines = [
        "Written by `benchmarks/bench_samplers.py --part nfe`: every loop of `samplers.SAMPLERS` on the exact "
        "denoiser of a 1-D two-mode mixture and an 8-D four-component correlated mixture (float64, one torch "
        f"thread, {args.particles_1d} / {args.nfe_particles} particles, mean over {args.repeats} seeds; {cpu:.0f} s "
        f"CPU, {elapsed:.0f} s wall). Plans: **VP, Karras** = `karras_plan(n)` over the DDPM linear-beta sigmas "
        "(0.01 to 157, started from N(0, I)); **flow, shift 3** = `FlowMatchEulerDiscreteScheduler(shift=3)` levels "
        f"from pure noise. Steps {args.nfe_steps}; evaluations = denoiser calls counted in the run (Heun, DPM-2, "
        "DPM++ 2S-a / SDE: two per step, one less where a step goes to sigma 0 or starts at pure noise). Sliced W2 to "
        "the exact mixture (128 directions in 8-D); the Monte-Carlo floor is W2 of exact draws of the same size. "
        "Stochastic samplers draw fresh normals per step from a fixed seed (the 2M / 3M SDE loops too: one "
        "increment per step, the law of their default Brownian-tree noise, whose queries would dominate the run "
        "time); DPM++ SDE keeps its Brownian tree (its two draws per step are nested increments of one path) and "
        "skips the largest step count to bound the run time.",
        "", "![sliced W2 vs evaluations](docs/bench_samplers_nfe.png)", ""]
    for dim in sorted(floors):
        target = 2 * floors[dim]
        lines += [f"**{dim}-D** (Monte-Carlo floor {floors[dim]:.4f}; evaluations to reach W2 <= {target:.4f}, "
                  "twice the floor, log-log interpolated)", "",
                  "| sampler | " + " | ".join(f"{p}: W2 at each step count (evaluations)" for p in plans) +
                  " | " + " | ".join(f"{p}: evals to target" for p in plans) + " |",
                  "|---|" + "---|" * (2 * len(plans))]
        for name in NFE_SAMPLERS:
            cells = [", ".join(f"{w2:.4f} ({nfe})" for nfe, w2 in results[(dim, p, name)]) for p in plans]
            reach = [nfe_to_reach(results[(dim, p, name)], target) for p in plans]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " +
                         " | ".join("not reached" if math.isinf(v) else f"{v:.0f}" for v in reach) + " |")
        lines.append("")
    lines.append("**Reading.** " + nfe_reading(results, floors, plans))
    return "\n".join(lines)


def nfe_reading(results, floors, plans) -> str:
    sentences = []
    for dim in sorted(floors):
        target = 2 * floors[dim]
        for p in plans:
            ranked = sorted((nfe_to_reach(results[(dim, p, n)], target), n) for n in NFE_SAMPLERS)
            reached = [(v, n) for v, n in ranked if math.isfinite(v)]
            if not reached:
                sentences.append(f"{dim}-D, {p}: no sampler reaches W2 {target:.4f} within the measured budget.")
                continue
            best = ", ".join(f"{n} ({v:.0f})" for v, n in reached[:3])
            missed = [n for v, n in ranked if math.isinf(v)]
            sentences.append(f"{dim}-D, {p}: fewest evaluations to W2 <= {target:.4f}: {best}" +
                             (f"; not reached: {', '.join(missed)}" if missed else "") + ".")
    return " ".join(sentences)


def plot_nfe(results, floors, plans, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted(floors)
    fig, axes = plt.subplots(len(dims), len(plans), figsize=(6 * len(plans), 4.5 * len(dims)), squeeze=False)
    for row, dim in enumerate(dims):
        for col, p in enumerate(plans):
            ax = axes[row, col]
            for k, name in enumerate(NFE_SAMPLERS):
                nfe, w2 = zip(*results[(dim, p, name)])
                ax.plot(nfe, w2, marker="o", markersize=3, label=name,
                        linestyle="--" if name in NFE_STOCHASTIC else "-", color=plt.cm.tab20(k / len(NFE_SAMPLERS)))
            ax.axhline(floors[dim], color="k", linewidth=0.8, linestyle=":", label="Monte-Carlo floor")
            ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="sliced W2",
                   title=f"{dim}-D mixture, {p}")
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7, ncol=2)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
