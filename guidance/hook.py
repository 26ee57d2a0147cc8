"""``apply(pipe, guide)``: make a diffusers pipeline run any guide, without copying its ``__call__``.

The pipeline's family (:mod:`.families`) says how it runs CFG; the control flow is written once per layout:

* batched (``[uncond; cond]``, ``[cond; uncond]``): the network's ``forward`` is replaced on the instance. It
  evaluates only the rows the guide asks for, lets the guide combine, and returns ``[g; g]``; the pipeline's
  ``g + w (g - g)`` is then ``g`` exactly. ``scheduler.step`` is wrapped only for guides that renoise
  differently (CFG++).
* two calls per step (cond, then uncond: Flux, Qwen-Image, Wan, CogView4, Lumina 2): the forward records each
  branch as it passes (and skips the unconditional call when the guide does not need it); the guided
  prediction replaces the pipeline's own combination where it is handed to ``scheduler.step``. The pipeline's
  code runs unchanged, and whatever it does between the calls and the step is superseded by the guide.

``Step.x`` is the pipeline's own latent (flow scale for flow pipelines; the converters hold for any scale) and
``step.evaluate(x, cond)`` takes ``x`` in that same scale, at the step's own level; on flow pipelines also at
another ``Level`` (``step.next_level`` is the scheduler's next one), as Rectified-CFG++ needs. Everything is
restored on exit.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from diffguide.samplers.base import BLOWUP_RATIO, Level, norm_ratio
from diffguide.samplers.schedule import check_prediction_type

from .base import Guidance, Step, guided_checked
from .families import Family, family_of, other_level_pipelines
from .scheduler_step import check_scheduler, renoise_step


class Branch:
    """The network arguments of one CFG branch's rows (``step.uncond`` under apply): ``step.evaluate(x, branch)``
    runs the network on all of them (the latent and, at another level, the time replaced). Selected from the
    call's batch only when first read, so steps whose guide takes no extra pass copy nothing."""

    def __init__(self, select: Callable[[], dict]) -> None:
        self._select, self._arguments = select, None

    @property
    def arguments(self) -> dict:
        if self._arguments is None:
            self._arguments = self._select()
        return self._arguments

    def __repr__(self) -> str:
        return "Branch(...)"


@dataclass
class HookStats:
    """What the hooked network did during the guided calls."""

    calls: int = 0
    rows: int = 0
    rows_per_step: list[int] = field(default_factory=list)
    uncond_rows_per_sample: Tensor | None = None   # (B,) unconditional rows each sample took (adaptive guides)
    cond_only_steps: int = 0  # steps the pipeline itself ran without CFG (a callback turned it off)


def is_flow_scheduler(scheduler) -> bool:
    """Rectified-flow schedules: FlowMatch* schedulers, or DPM/UniPC with flow sigmas / ``flow_prediction``."""
    cfg = scheduler.config
    return (type(scheduler).__name__.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas", False))
            or cfg.get("prediction_type") == "flow_prediction")


def _rows(value: Any, rows: Tensor, full: int, lists: bool = False) -> Any:
    """Select batch rows of every tensor (in nested dicts/lists) whose first dim is the CFG batch; with ``lists``,
    also the items of lists of ``full`` per-sample entries (Z-Image's list batches)."""
    if isinstance(value, Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _rows(v, rows, full, lists) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if lists and len(value) == full:
            return type(value)(value[i] for i in rows.tolist())
        return type(value)(_rows(v, rows, full, lists) for v in value)
    return value


def _tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _with_tensor(out: Any, tensor: Tensor) -> Any:
    """The network output ``out`` with its prediction replaced (tuple or output object alike)."""
    if isinstance(out, tuple):
        return (tensor,) + tuple(out[1:])
    out = copy.copy(out)
    out.sample = tensor
    return out


class _Network:
    """One hooked network: its original forward, the signature it binds calls to, and a counted call."""

    def __init__(self, module: torch.nn.Module, session: "_Session") -> None:
        self.module, self.session = module, session
        self.orig_forward = module.forward
        # a torch.compile'd module's forward takes (*args, **kwargs): bind to the wrapped module's own signature
        self.signature = inspect.signature(getattr(module, "_orig_mod", module).forward)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return dict(self.signature.bind(*args, **kwargs).arguments)

    def run(self, arguments: dict[str, Any], rows: int) -> Any:
        call = inspect.BoundArguments(self.signature, arguments)
        self.session.step_rows += rows
        self.session.stats.calls += 1
        return self.orig_forward(*call.args, **call.kwargs)

    def forward(self, *args, **kwargs):
        return self.session.forward(self, args, kwargs)


class _Session:
    def __init__(self, pipe, guide: Guidance) -> None:
        self.pipe, self.guide = pipe, guide
        self.family: Family = family_of(pipe)
        self.scheduler = pipe.scheduler
        self.flow = is_flow_scheduler(self.scheduler)
        name, sched = type(pipe).__name__, type(self.scheduler).__name__
        if self.flow != (self.family.scheduler == "flow"):
            kind = "a rectified-flow" if self.flow else "a diffusion (epsilon / v / sample)"
            raise ValueError(f"{name} runs a {self.family.scheduler} network; its scheduler {sched} is {kind} "
                             "scheduler, which apply() would misread")
        if self.flow:
            self.prediction_type = "flow_prediction"
        else:
            self.prediction_type = check_prediction_type(self.scheduler.config.get("prediction_type", "epsilon"))
        if not self.flow and not hasattr(self.scheduler, "alphas_cumprod"):
            raise ValueError(f"apply() reads noise levels from alphas_cumprod or flow sigmas; {sched} has neither")
        self.stats = HookStats()
        self.step_rows = 0  # network rows of the current step, extra passes (step.evaluate) included
        self._saved: list[tuple[Any, str, bool, Any]] = []
        self._reset_run()

    def _reset_run(self) -> None:
        self.index = 0
        self.full: int | None = None        # the CFG batch of the first batched call
        self.pending: dict[str, Any] | None = None  # two-call layout: the branches of the current step
        self.renoise: Tensor | None = None
        self.last_step: Step | None = None
        self.step_state: dict = {}
        self.blowup_warned = False

    # -- installation -------------------------------------------------------------------------------
    def _patch(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._saved.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def install(self) -> None:
        for attr in self.family.networks:
            module = getattr(self.pipe, attr, None)
            if module is not None:
                self._patch(module, "forward", _Network(module, self).forward)
        if self.guide.changes_renoise or self.family.layout == "two_calls":
            self._orig_step = self.scheduler.step
            # keep the scheduler's signature visible: pipelines pass eta/generator only if inspect finds them
            self._patch(self.scheduler, "step", functools.wraps(self._orig_step)(
                lambda *args, **kwargs: self.step(*args, **kwargs)))
        base = type(self.pipe)
        session = self

        class Guided(base):  # a per-session subclass: forces CFG on, resets the guide per call
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
        family, name = self.family, self._orig_class.__name__
        sig = inspect.signature(self._orig_class.__call__)
        bound = sig.bind_partial(self.pipe, *args, **kwargs)
        params = bound.arguments

        def given(arg: str) -> Any:
            return params.get(arg, sig.parameters[arg].default if arg in sig.parameters else None)

        for arg, (neutral, hint) in family.neutral.items():
            value = given(arg)
            if value != neutral and not (neutral == 0.0 and value is None):
                raise ValueError(f"{arg} must be {neutral!r} under guidance.apply ({hint}); got {value!r}")
        scale = given(family.scale_arg)
        if scale is None or float(scale) <= family.cfg_threshold:
            params[family.scale_arg] = family.cfg_threshold + 1.0  # any value that makes the pipeline run CFG
        if family.negative and all(given(arg) is None for arg in family.negative):
            if getattr(self.pipe, "tokenizer", None) is None:
                raise ValueError(f"{name} runs CFG only with a negative prompt; pass {family.negative[1]} (and its "
                                 "pooled/mask companions): the pipeline has no tokenizer to encode an empty one")
            params["negative_prompt"] = ""  # the empty prompt: what the unconditional branch means elsewhere
        self.guide.reset()
        self._reset_run()
        # bound.args/kwargs re-expand **kwargs (e.g. SD's legacy callback=), so every argument arrives unchanged
        return super_call(*bound.args[1:], **bound.kwargs)

    # -- the scheduler side: noise level of the current step ----------------------------------------------
    def _level(self, t: Any, device, dtype) -> Level:
        sched = self.scheduler
        num_steps = len(sched.timesteps)
        index = min(self.index, num_steps)
        sigmas = getattr(sched, "sigmas", None)
        if self.flow:  # x_s = (1 - s) x0 + s eps, read from the scheduler's own flow sigmas
            s = torch.as_tensor(sigmas[index], dtype=torch.float64)
            alpha, sigma = 1 - s, s
        else:
            if sigmas is not None and len(sigmas) == num_steps + 1:
                ve = torch.as_tensor(sigmas[index], dtype=torch.float64)
                alpha_bar = 1 / (1 + ve**2)
            else:
                t_int = int(t.flatten()[0].item()) if isinstance(t, Tensor) else int(t)
                alpha_bar = sched.alphas_cumprod[t_int].to(torch.float64)
            alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        t_scalar = t.flatten()[0] if isinstance(t, Tensor) else torch.tensor(t)
        return Level(t=t_scalar, alpha=alpha.to(device, dtype), sigma=sigma.to(device, dtype), index=index,
                     num_steps=num_steps)

    def _mask(self, level: Level, batch: int) -> Tensor:
        mask = self.guide.needs_uncond(level, batch).to(torch.bool).cpu()
        counts = self.stats.uncond_rows_per_sample
        self.stats.uncond_rows_per_sample = mask.long() if counts is None or len(counts) != batch else counts + mask
        return mask

    def _end_step(self) -> None:
        self.stats.rows += self.step_rows
        self.stats.rows_per_step.append(self.step_rows)
        self.step_rows = 0
        self.index += 1

    # -- the network side -----------------------------------------------------------------------------
    def forward(self, net: _Network, args: tuple, kwargs: dict):
        if self.family.layout == "two_calls":
            return self._forward_two_calls(net, args, kwargs)
        return self._forward_batched(net, args, kwargs)

    def _bind_batched(self, net: _Network, args: tuple, kwargs: dict) -> tuple[dict, Tensor, Any, int]:
        """A batched call's arguments, its latent as one tensor (Z-Image's list stacked), its time and its batch;
        the first call of a run fixes the CFG batch (an odd one is refused)."""
        arguments = net.bind(args, kwargs)
        sample = arguments[self.family.latent]
        full = len(sample) if self.family.layout == "list_cu" else sample.shape[0]
        sample = torch.stack(list(sample)) if self.family.layout == "list_cu" else sample
        if self.full is None:
            if full % 2:
                raise ValueError(f"guidance.apply expects {type(self.pipe).__name__}'s CFG batch; got an odd batch")
            self.full = full
        return arguments, sample, arguments.get(self.family.timestep), full

    def _cfg_rows(self, full: int) -> tuple[Tensor, Tensor]:
        """``(cond_rows, uncond_rows)`` of a CFG batch of ``full`` rows in the family's layout."""
        batch = full // 2
        if self.family.layout == "uc":
            return torch.arange(batch, full), torch.arange(batch)
        return torch.arange(batch), torch.arange(batch, full)

    def _select(self, arguments: dict, rows: Tensor, full: int) -> dict:
        """The arguments of the CFG batch's ``rows`` (per-row tensors and, for list batches, list items)."""
        as_list = self.family.layout == "list_cu"
        return {k: v if k in self.family.unbatched else _rows(v, rows, full, as_list) for k, v in arguments.items()}

    def _forward_batched(self, net: _Network, args: tuple, kwargs: dict):
        family = self.family
        as_list = family.layout == "list_cu"  # per-sample tensors in a list (Z-Image): the list is the batch
        arguments, sample, timestep, full = self._bind_batched(net, args, kwargs)
        if full != self.full:  # the pipeline stopped batching CFG (a callback such as SDCFGCutoffCallback)
            if 2 * full != self.full:
                raise ValueError(f"{type(self.pipe).__name__} changed its batch from {self.full} to {full} rows "
                                 "mid-run; apply() follows a callback that turns CFG off, nothing else")
            self.stats.cond_only_steps += 1
            self.renoise = None
            out = net.run(arguments, full)
            self._end_step()
            return out
        batch = full // 2
        uncond_first = family.layout == "uc"
        cond_rows, uncond_rows = self._cfg_rows(full)
        level = self._level(timestep, sample.device, sample.dtype)
        mask = self._mask(level, batch)
        picked = uncond_rows[mask]
        n_u = len(picked)
        if n_u == batch and uncond_first:  # the pipeline's own batch: pass it through untouched
            rows = torch.arange(full)
            out = net.run(arguments, full)
        else:
            rows = torch.cat([picked, cond_rows]).to(sample.device)
            out = net.run(self._select(arguments, rows, full), len(rows))
        tensor = torch.stack(list(_tensor(out))) if as_list else _tensor(out)
        if family.float32:
            tensor = tensor.float()
        tensor = -tensor if family.output_sign < 0 else tensor  # guides see the velocity the scheduler steps on
        channels = sample.shape[1]
        pred_all = tensor[:, :channels]
        pred_cond = pred_all[n_u:]
        if n_u == batch:
            pred_uncond = pred_all[:n_u]
        else:
            pred_uncond = pred_cond.clone()
            pred_uncond[mask.to(sample.device)] = pred_all[:n_u]
        x = sample[cond_rows.to(sample.device)]
        cond, uncond, evaluate = self._branches(
            net, arguments, cond_rows.to(sample.device), full, level,
            lambda: self._select(arguments, uncond_rows.to(sample.device), full))
        step = Step(x, level.t, level.alpha, level.sigma, level.index, level.num_steps, pred_cond, pred_uncond,
                    self.prediction_type, uncond_mask=mask.to(sample.device), cond=cond, evaluate=evaluate,
                    uncond=uncond, next_level=self._next_level(level), family=self.family)
        guided = self._guided(step)
        self.last_step, self.renoise = step, guided.renoise
        denoise = -guided.denoise if family.output_sign < 0 else guided.denoise
        extra = tensor[n_u:, channels:]
        half = torch.cat([denoise, extra], dim=1) if extra.shape[1] else denoise
        new = torch.cat([half, half])  # the pipeline's combination of [g; g] is g exactly
        self._end_step()
        return _with_tensor(out, list(new.unbind(0)) if as_list else new)

    def _forward_two_calls(self, net: _Network, args: tuple, kwargs: dict):
        arguments = net.bind(args, kwargs)
        sample = arguments[self.family.latent]
        pending = self.pending
        if pending is None:  # the conditional call opens the step
            level = self._level(arguments.get(self.family.timestep), sample.device, sample.dtype)
            out = net.run(arguments, sample.shape[0])
            self.pending = dict(net=net, arguments=arguments, level=level, cond=out,
                                mask=self._mask(level, sample.shape[0]))
            return out
        if "uncond" in pending:
            raise RuntimeError(f"{type(self.pipe).__name__} called its network a third time in one step; apply() "
                               "knows two calls per step (cond, uncond)")
        mask, full = pending["mask"], sample.shape[0]
        pending["uncond_arguments"] = arguments  # extra passes may need them even when the call is skipped
        if not bool(mask.any()):  # the guide does not need it: the call is skipped, not evaluated
            pending["uncond"] = None
            return pending["cond"]
        if bool(mask.all()):
            pending["uncond"] = out = net.run(arguments, full)
            return out
        rows = torch.nonzero(mask).flatten().to(sample.device)  # only the rows the guide asks for
        selected = {k: v if k in self.family.unbatched else _rows(v, rows, full) for k, v in arguments.items()}
        part = _tensor(net.run(selected, len(rows)))
        merged = _tensor(pending["cond"]).clone()  # unevaluated rows carry the conditional prediction
        merged[rows] = part
        pending["uncond"] = out = _with_tensor(pending["cond"], merged)
        return out

    def _branches(self, net: _Network, arguments: dict, rows: Tensor, full: int | None, level: Level,
                  uncond_arguments: Callable[[], dict] | None):
        """``step.cond`` (the conditional rows' class labels or text embeddings, as ``diffusers_model_fn`` takes
        them), ``step.uncond`` (a :class:`Branch`: the unconditional rows' arguments) and
        ``step.evaluate(x, cond, level=None)``: one more counted network pass on the conditional rows' inputs, with
        ``x`` and the condition replaced (e.g. GFCG's reference class; a ``Branch`` replaces every argument), at
        the step's level or, on flow pipelines, at another ``Level`` (``x = alpha x0 + sigma eps`` in that level's
        scale; the time argument moved as the family's ``flow_time`` says)."""
        family = self.family
        as_list = family.layout == "list_cu"
        select = (lambda v: v) if full is None else (lambda v: _rows(v, rows, full, as_list))
        latent, time_arg = family.latent, family.timestep
        key = "class_labels" if arguments.get("class_labels") is not None else family.condition
        cond = select(arguments.get(key))
        if arguments.get("added_cond_kwargs") is not None:
            cond = {key: cond, "added_cond_kwargs": select(arguments["added_cond_kwargs"])}
        base = Branch(lambda: {name: select(value) for name, value in arguments.items()})  # the cond rows' own
        sample = arguments[latent]
        shape = (len(rows), *(sample[0].shape if as_list else sample.shape[1:]))
        dtype = sample[0].dtype if as_list else sample.dtype
        uncond = None if uncond_arguments is None else Branch(uncond_arguments)  # () -> the uncond rows' arguments

        def evaluate(x: Tensor, new_cond: Any, new_level: Level | None = None) -> Tensor:
            if tuple(x.shape) != shape:
                raise ValueError(f"step.evaluate takes x of the step's shape {shape}, got {tuple(x.shape)}")
            if isinstance(new_cond, Branch):
                call = dict(new_cond.arguments)
            else:
                replace = new_cond if isinstance(new_cond, dict) else {key: new_cond}
                unknown = set(replace) - set(net.signature.parameters)
                if unknown:
                    raise ValueError(f"{type(net.module).__name__}.forward takes no {sorted(unknown)}")
                call = dict(base.arguments, **replace)
            if new_level is not None:
                if family.scheduler != "flow" or family.flow_time is None:
                    raise ValueError(f"step.evaluate at another level is not available on {type(self.pipe).__name__}")
                x = x / (new_level.alpha + new_level.sigma).to(x)  # to the pipeline's flow scale (1 - s) x0 + s eps
                step_t = level.t.to(torch.float64)
                new_t = torch.as_tensor(new_level.t).to(torch.float64)
                t_in = call[time_arg]
                call[time_arg] = (t_in * (new_t / step_t) if family.flow_time == "proportional"
                                  else t_in + (new_t - step_t)).to(t_in.dtype)
            x = x.to(dtype)
            out = net.run(dict(call, **{latent: list(x.unbind(0)) if as_list else x}), x.shape[0])
            pred = torch.stack(list(_tensor(out))) if as_list else _tensor(out)
            pred = pred[:, : x.shape[1]]
            pred = pred.float() if family.float32 else pred
            return -pred if family.output_sign < 0 else pred

        return cond, uncond, evaluate

    def _guided(self, step: Step):
        """The guide's prediction (finite, or ``FloatingPointError``); warns once per run when its norm is more
        than ``BLOWUP_RATIO`` times the conditional prediction's (a scale far too large: the images are noise)."""
        guided = guided_checked(self.guide, step)
        if not self.blowup_warned:
            ratio = norm_ratio(guided.denoise, step.pred_cond)
            if ratio > BLOWUP_RATIO:
                self.blowup_warned = True
                warnings.warn(f"{self.guide!r}: at step {step.index + 1} of {step.num_steps} the guided prediction's "
                              f"norm is {ratio:.3g}x the conditional one's (more than {BLOWUP_RATIO:g}x): the images "
                              "will be noise; lower the scale", stacklevel=2)
        return guided

    def _next_level(self, level: Level) -> Level | None:
        """The level the scheduler steps to (flow pipelines whose network time apply knows), else None."""
        family, sigmas = self.family, getattr(self.scheduler, "sigmas", None)
        if not self.flow or family.flow_time is None or sigmas is None or level.index + 1 >= len(sigmas):
            return None
        s, s_next = float(sigmas[level.index]), float(sigmas[level.index + 1])   # float64, not the latents' dtype
        t = level.t.to(torch.float64)
        t_next = t * (s_next / s) if family.flow_time == "proportional" else t + (s - s_next)
        like = level.alpha
        return Level(t=t_next, alpha=torch.as_tensor(1 - s_next, dtype=like.dtype, device=like.device),
                     sigma=torch.as_tensor(s_next, dtype=like.dtype, device=like.device), index=level.index + 1,
                     num_steps=level.num_steps)

    # -- the scheduler side: the prediction the pipeline steps with ---------------------------------------
    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        if self.family.layout == "two_calls":
            return self._step_two_calls(model_output, timestep, sample, *args, **kwargs)
        if self.renoise is None or self.last_step is None:
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        batch = self.renoise.shape[0]
        if model_output.shape[0] != batch:  # DiT steps on the doubled batch
            raise TypeError("guides that change the renoise term need a pipeline that steps on one batch copy")
        denoise = model_output[:, : self.renoise.shape[1]]
        renoise = self.renoise.reshape(denoise.shape)  # Z-Image steps on its outputs squeezed of the frame axis
        return renoise_step(self.scheduler, self._orig_step, denoise, renoise, timestep, sample, self.prediction_type,
                            self.step_state, *args, **kwargs)

    def _step_two_calls(self, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError(f"{type(self.pipe).__name__} stepped its scheduler without a network call")
        mask = pending["mask"]
        if "uncond" not in pending:  # the pipeline ran no unconditional branch this step
            if bool(mask.any()) and self.index == 0:
                raise ValueError(f"{type(self.pipe).__name__} evaluated no unconditional branch: pass a negative "
                                 f"prompt ({', '.join(self.family.negative) or 'negative_prompt_embeds'})")
            self.stats.cond_only_steps += 1  # a callback turned CFG off mid-run: continue conditional-only
            self._end_step()
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        sign = self.family.output_sign
        pred_cond = _tensor(pending["cond"])
        pred_cond = -pred_cond if sign < 0 else pred_cond
        if pending["uncond"] is None:
            pred_uncond = pred_cond.clone()
        else:
            pred_uncond = _tensor(pending["uncond"])
            pred_uncond = -pred_uncond if sign < 0 else pred_uncond
        level = pending["level"]
        rows = torch.arange(pred_cond.shape[0], device=sample.device)
        uncond_arguments = pending.get("uncond_arguments")
        cond, uncond, evaluate = self._branches(pending["net"], pending["arguments"], rows, None, level,
                                                None if uncond_arguments is None else lambda: uncond_arguments)
        step = Step(sample, level.t, level.alpha, level.sigma, level.index, level.num_steps, pred_cond, pred_uncond,
                    self.prediction_type, uncond_mask=mask.to(sample.device), cond=cond, evaluate=evaluate,
                    uncond=uncond, next_level=self._next_level(level), family=self.family)
        guided = self._guided(step)
        self.last_step = step
        self._end_step()
        if self.guide.changes_renoise:
            return renoise_step(self.scheduler, self._orig_step, guided.denoise, guided.renoise, timestep, sample,
                                self.prediction_type, self.step_state, *args, **kwargs)
        return self._orig_step(guided.denoise, timestep, sample, *args, **kwargs)


@contextmanager
def apply(pipe, guide: Guidance) -> Iterator[HookStats]:
    """Context manager: inside it, ``pipe(...)`` runs ``guide`` instead of its own CFG.

    ``guide`` is a diffguide guide or any ``diffusers.guiders.BaseGuidance`` (:mod:`.diffusers_guiders`).

    Whatever CFG scale the caller passes (or none), the pipeline runs CFG and the guide's own parameters rule.
    Yields :class:`HookStats` (network calls and rows). Restores the pipeline on exit. Supported pipelines and
    how each runs CFG: :data:`diffguide.guidance.families.FAMILIES`. The first step of a call whose guided
    prediction has more than ``BLOWUP_RATIO`` times the conditional one's norm warns (a scale far too large).
    """
    from .diffusers_guiders import GuiderSession, is_diffusers_guider

    if is_diffusers_guider(guide):  # a diffusers.guiders.BaseGuidance: its own passes and combination
        session = GuiderSession(pipe, guide)
    elif not isinstance(guide, Guidance):
        raise TypeError(f"guide must be a guidance.Guidance or a diffusers.guiders.BaseGuidance, got "
                        f"{type(guide).__name__}")
    elif getattr(pipe, "_diffguide_session", None) is not None:
        raise ValueError("this pipeline is already inside guidance.apply; nested apply is not supported")
    else:
        session = _Session(pipe, guide)
    if guide is session.guide and guide.changes_renoise:
        if session.family.layout == "cu":
            raise TypeError(f"{type(guide).__name__} changes the renoise term; {type(pipe).__name__} steps its "
                            "scheduler on the doubled CFG batch, which apply() cannot split")
        check_scheduler(session.scheduler)
    if guide is session.guide and guide.evaluates_other_levels:
        family = session.family
        if family.scheduler != "flow" or family.flow_time is None:
            served = other_level_pipelines()
            why = ("runs no flow network" if family.scheduler != "flow" else
                   "feeds its network a time that is no function of the flow level apply knows")
            raise TypeError(f"{type(guide).__name__} evaluates the network at other noise levels; "
                            f"{type(pipe).__name__} {why}. Supported: {', '.join(served)}")
    session.install()
    pipe._diffguide_session = session
    try:
        yield session.stats
    finally:
        session.remove()
        pipe._diffguide_session = None
