"""``apply(pipe, guide)``: make a classic diffusers pipeline run any guide, without copying its ``__call__``.

The pipeline computes CFG inline as ``u + w (c - u)`` on a batched ``[uncond; cond]`` network call. We
replace the network's ``forward`` on the instance: it evaluates only the rows the guide asks for, lets the
guide combine, and returns ``[g; g]``; the pipeline's ``g + w (g - g)`` is then ``g`` exactly. For guides
that renoise differently (CFG++), ``scheduler.step`` is wrapped too. Everything is restored on exit.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import check_prediction_type

from .base import Guidance, Step, guided_checked
from .scheduler_step import check_scheduler, renoise_step

SUPPORTED = "StableDiffusionPipeline, StableDiffusionXLPipeline, DiTPipeline, tasks.pipelines.ClassConditionalPipeline"


@dataclass
class HookStats:
    """What the hooked network did during the guided calls."""

    calls: int = 0
    rows: int = 0
    rows_per_step: list[int] = field(default_factory=list)
    uncond_rows_per_sample: Tensor | None = None   # (B,) unconditional rows each sample took (adaptive guides)


def _network(pipe) -> tuple[str, torch.nn.Module, bool]:
    """(attribute name, module, uncond_first) of the pipeline's denoising network.

    Only pipelines that batch CFG are accepted; their ``__call__`` takes ``guidance_scale``. Others (e.g. the
    unconditional ``DDPMPipeline``) would have independent samples taken for ``[uncond; cond]`` halves.
    """
    name = type(pipe).__name__
    call = getattr(type(pipe), "__call__", None)
    if not callable(call) or "guidance_scale" not in inspect.signature(call).parameters:
        raise TypeError(f"apply() supports pipelines that batch classifier-free guidance, whose __call__ takes "
                        f"guidance_scale ({SUPPORTED}); got {name}, which does not")
    if name == "DiTPipeline":
        return "transformer", pipe.transformer, False
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "scheduler"):
        raise TypeError(f"apply() supports pipelines with a CFG-batched unet ({SUPPORTED}); got {name}")
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise TypeError(f"{name} has a guidance-distilled unet (time_cond_proj_dim set): it never runs CFG batches")
    return "unet", unet, True


def _rows(value: Any, rows: Tensor, full: int) -> Any:
    """Select batch rows of every tensor (in nested dicts/lists) whose first dim is the CFG batch."""
    if isinstance(value, Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _rows(v, rows, full) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, rows, full) for v in value)
    return value


class _Session:
    def __init__(self, pipe, guide: Guidance) -> None:
        self.pipe, self.guide = pipe, guide
        self.attr, self.net, self.uncond_first = _network(pipe)
        self.scheduler = pipe.scheduler
        self.prediction_type = check_prediction_type(self.scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type == "flow_prediction":
            raise ValueError(f"apply() does not read flow-matching schedulers yet ({type(self.scheduler).__name__} "
                             "with prediction_type='flow_prediction'); supported prediction_type: epsilon, "
                             "v_prediction, sample")
        self.stats = HookStats()
        self.index = 0
        self.renoise: Tensor | None = None
        self.last_step: Step | None = None
        self.step_state: dict = {}
        self.step_rows = 0  # network rows of the current step, extra passes (step.evaluate) included
        self._saved: list[tuple[Any, str, bool, Any]] = []

    # -- installation -------------------------------------------------------------------------------
    def _patch(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._saved.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def install(self) -> None:
        self._orig_forward = self.net.forward
        self._forward_signature = inspect.signature(self._orig_forward)
        self._patch(self.net, "forward", self.forward)
        if self.guide.changes_renoise:
            self._orig_step = self.scheduler.step
            # keep the scheduler's signature visible: pipelines pass eta/generator only if inspect finds them
            self._patch(self.scheduler, "step", functools.wraps(self._orig_step)(
                lambda *args, **kwargs: self.step(*args, **kwargs)))
        base = type(self.pipe)
        session = self

        class Guided(base):  # a per-session subclass: forces CFG batching, resets the guide per call
            def __call__(self, *args, **kwargs):
                return session.call(super().__call__, *args, **kwargs)

        Guided.__name__ = Guided.__qualname__ = base.__name__
        self._orig_class = base
        self.pipe.__class__ = Guided

    def remove(self) -> None:
        self.pipe.__class__ = self._orig_class
        for obj, name, had, old in reversed(self._saved):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._saved.clear()

    # -- the pipeline call --------------------------------------------------------------------------
    def call(self, super_call, *args, **kwargs):
        sig = inspect.signature(self._orig_class.__call__)
        bound = sig.bind_partial(self.pipe, *args, **kwargs)
        params = bound.arguments
        if float(params.get("guidance_rescale", 0.0) or 0.0) != 0.0:
            raise ValueError("guidance_rescale must be 0 under guidance.apply; use guidance.CFGRescale instead")
        scale = params.get("guidance_scale", sig.parameters["guidance_scale"].default)
        if scale is None or float(scale) <= 1.0:
            params["guidance_scale"] = 2.0  # any value > 1 makes the pipeline batch [uncond; cond]
        self.guide.reset()
        self.index = 0
        self.renoise = None
        self.step_state.clear()
        # bound.args/kwargs re-expand **kwargs (e.g. SD's legacy callback=), so every argument arrives unchanged
        return super_call(*bound.args[1:], **bound.kwargs)

    # -- the network ----------------------------------------------------------------------------------
    def _level(self, t: Tensor, device, dtype) -> Level:
        sched = self.scheduler
        num_steps = len(sched.timesteps)
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None and len(sigmas) == num_steps + 1:
            ve = torch.as_tensor(sigmas[min(self.index, num_steps)], dtype=torch.float64)
            alpha_bar = 1 / (1 + ve**2)
        else:
            t_int = int(t.flatten()[0].item()) if isinstance(t, Tensor) else int(t)
            alpha_bar = sched.alphas_cumprod[t_int].to(torch.float64)
        t_scalar = t.flatten()[0] if isinstance(t, Tensor) else torch.tensor(t)
        return Level(t=t_scalar, alpha=alpha_bar.sqrt().to(device, dtype), sigma=(1 - alpha_bar).sqrt().to(device, dtype),
                     index=self.index, num_steps=num_steps)

    def forward(self, sample: Tensor, timestep: Any, *args, **kwargs):
        full = sample.shape[0]
        if full % 2:
            raise ValueError("guidance.apply expects the pipeline's CFG batch [uncond; cond]; got an odd batch")
        batch = full // 2
        cond_rows = torch.arange(batch, full) if self.uncond_first else torch.arange(batch)
        uncond_rows = torch.arange(batch) if self.uncond_first else torch.arange(batch, full)
        x = sample[cond_rows]
        level = self._level(timestep, sample.device, sample.dtype)
        mask = self.guide.needs_uncond(level, batch).to(torch.bool).cpu()
        counts = self.stats.uncond_rows_per_sample
        self.stats.uncond_rows_per_sample = mask.long() if counts is None or len(counts) != batch else counts + mask
        picked = uncond_rows[mask]
        n_u = len(picked)
        if n_u == batch and self.uncond_first:  # the pipeline's own batch: pass it through untouched
            rows = torch.arange(full)
            out = self._orig_forward(sample, timestep, *args, **kwargs)
        else:
            rows = torch.cat([picked, cond_rows]).to(sample.device)
            out = self._orig_forward(sample[rows], _rows(timestep, rows, full), *_rows(list(args), rows, full),
                                     **_rows(kwargs, rows, full))
        tensor = out[0] if isinstance(out, tuple) else out.sample
        channels = sample.shape[1]
        pred_all = tensor[:, :channels]
        pred_cond = pred_all[n_u:]
        if n_u == batch:
            pred_uncond = pred_all[:n_u]
        else:
            pred_uncond = pred_cond.clone()
            pred_uncond[mask.to(sample.device)] = pred_all[:n_u]
        cond, evaluate = self._cond_branch(sample, timestep, args, kwargs, cond_rows, full)
        step = Step(x, level.t, level.alpha, level.sigma, level.index, level.num_steps, pred_cond, pred_uncond,
                    self.prediction_type, uncond_mask=mask.to(sample.device), cond=cond, evaluate=evaluate)
        self.step_rows = len(rows)
        self.stats.calls += 1
        guided = guided_checked(self.guide, step)
        self.last_step, self.renoise = step, guided.renoise
        extra = tensor[n_u:, channels:]
        half = torch.cat([guided.denoise, extra], dim=1) if extra.shape[1] else guided.denoise
        new = torch.cat([half, half])
        self.stats.rows += self.step_rows
        self.stats.rows_per_step.append(self.step_rows)
        self.index += 1
        if isinstance(out, tuple):
            return (new,) + tuple(out[1:])
        out.sample = new
        return out

    def _cond_branch(self, sample: Tensor, timestep: Any, args: tuple, kwargs: dict, cond_rows: Tensor, full: int):
        """``step.cond`` (the conditional half's class labels or text embeddings, as ``diffusers_model_fn`` takes
        them) and ``step.evaluate(x, cond)``: one more counted network pass on the conditional rows' inputs,
        with ``x`` and the condition replaced (e.g. GFCG's reference class)."""
        signature = self._forward_signature
        arguments = signature.bind(sample, timestep, *args, **kwargs).arguments
        rows = cond_rows.to(sample.device)
        sample_name = next(iter(arguments))
        key = "class_labels" if arguments.get("class_labels") is not None else "encoder_hidden_states"
        cond = _rows(arguments.get(key), rows, full)
        if arguments.get("added_cond_kwargs") is not None:
            cond = {key: cond, "added_cond_kwargs": _rows(arguments["added_cond_kwargs"], rows, full)}
        shape = (len(cond_rows), *sample.shape[1:])

        def evaluate(x: Tensor, new_cond: Any) -> Tensor:
            if tuple(x.shape) != shape:
                raise ValueError(f"step.evaluate takes x of the step's shape {shape}, got {tuple(x.shape)}")
            replace = new_cond if isinstance(new_cond, dict) else {key: new_cond}
            unknown = set(replace) - set(signature.parameters)
            if unknown:
                raise ValueError(f"{type(self.net).__name__}.forward takes no {sorted(unknown)}")
            selected = {name: _rows(value, rows, full) for name, value in arguments.items()}
            call = inspect.BoundArguments(signature, dict(selected, **replace, **{sample_name: x}))
            out = self._orig_forward(*call.args, **call.kwargs)
            self.step_rows += x.shape[0]
            self.stats.calls += 1
            return (out[0] if isinstance(out, tuple) else out.sample)[:, : x.shape[1]]

        return cond, evaluate

    # -- the scheduler (guides that renoise differently) --------------------------------------------------
    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        if self.renoise is None or self.last_step is None:
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        batch = self.renoise.shape[0]
        if model_output.shape[0] != batch:  # DiT steps on the doubled batch
            raise TypeError("guides that change the renoise term need a pipeline that steps on one batch copy")
        return renoise_step(self.scheduler, self._orig_step, model_output[:, : self.renoise.shape[1]],
                            self.renoise, timestep, sample, self.prediction_type, self.step_state, *args, **kwargs)


@contextmanager
def apply(pipe, guide: Guidance) -> Iterator[HookStats]:
    """Context manager: inside it, ``pipe(...)`` runs ``guide`` instead of its own CFG.

    Whatever ``guidance_scale`` the caller passes (or none), the pipeline runs CFG-batched and the guide's
    own parameters rule. Yields :class:`HookStats` (network calls and rows). Restores the pipeline on exit.
    """
    if not isinstance(guide, Guidance):
        raise TypeError(f"guide must be a guidance.Guidance, got {type(guide).__name__}")
    if getattr(pipe, "_diffguide_session", None) is not None:
        raise ValueError("this pipeline is already inside guidance.apply; nested apply is not supported")
    session = _Session(pipe, guide)
    if guide.changes_renoise:
        if not session.uncond_first:
            raise TypeError(f"{type(guide).__name__} changes the renoise term; {type(pipe).__name__} steps its "
                            "scheduler on the doubled CFG batch, which apply() cannot split")
        check_scheduler(session.scheduler)
    session.install()
    pipe._diffguide_session = session
    try:
        yield session.stats
    finally:
        session.remove()
        pipe._diffguide_session = None
