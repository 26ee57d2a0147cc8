"""One ``apply`` session: installs the hooks on a pipeline, runs each call with CFG forced on, and keeps the run's
state (the step count, the noise level of the step, the pending record of a two-call step).

What differs between pipelines is the family's :mod:`layout <.layouts>`; what differs between guides is the
*combiner* the session is given (:class:`~.combiners.GuideCombiner` for a diffguide guide,
:class:`~.guider_apply.GuiderCombiner` for a diffusers guider). The session itself is never subclassed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import ScheduleReader, check_prediction_type

from .families import Family, family_of
from .layouts import Layout, layout_for
from .network import Network
from .records import HookStats, PendingStep


class Session:
    """``pipe`` hooked to run ``combiner`` (see :func:`~.hook.apply`)."""

    def __init__(self, pipe, combiner) -> None:
        self.pipe, self.combiner = pipe, combiner
        self.family: Family = family_of(pipe)
        self.layout: Layout = layout_for(self.family)
        self.pipe_name = type(pipe).__name__
        self.scheduler = pipe.scheduler
        self.reader = ScheduleReader(self.scheduler)
        self.flow = self.reader.flow
        name, sched = self.pipe_name, type(self.scheduler).__name__
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
        self.reset_run()

    @property
    def guide(self):
        """What the session runs: the diffguide guide or the diffusers guider."""
        return self.combiner.guide

    def reset_run(self) -> None:
        self.index = 0                      # steps taken in this call
        self.full: int | None = None        # the CFG batch of the first batched call
        self.pending: PendingStep | None = None  # the current step, from the network side to the scheduler side
        self.step_state: dict = {}
        self.call_rows: list[int] = []      # the latent rows of the network calls since the last scheduler step
        self.latent_batch: int | None = None  # the batch the scheduler steps (from the first scheduler.step)
        self.frames = 1                     # frames folded into the stepped batch (Family.frames_in_batch)
        self.first_index: int | None = None   # Family.start == "timestep": the first step's place in the schedule

    # -- installation -----------------------------------------------------------------------------------------
    def _patch(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._saved.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def install(self) -> None:
        for attr in self.family.networks:
            module = getattr(self.pipe, attr, None)
            if module is not None:
                self._patch(module, "forward", Network(module, self.layout_forward, self.count).forward)
        self.orig_step = self.scheduler.step
        self._step_signature = inspect.signature(self.orig_step)  # CogVideoX-DPM: (output, old x0, t, t_back, sample)
        # keep the scheduler's signature visible: pipelines pass eta/generator only if inspect finds them
        self._patch(self.scheduler, "step", functools.wraps(self.orig_step)(
            lambda *args, **kwargs: self.scheduler_step(*args, **kwargs)))
        base = type(self.pipe)
        session = self

        class GuidedPipeline(base):  # a per-session subclass: forces CFG on, resets the guide per call
            def __call__(self, *args, **kwargs):
                return session.call(super().__call__, *args, **kwargs)

        GuidedPipeline.__name__ = GuidedPipeline.__qualname__ = base.__name__
        self._orig_class = base
        self.pipe.__class__ = GuidedPipeline

    def remove(self) -> None:
        self.pipe.__class__ = self._orig_class
        for obj, name, had, old in reversed(self._saved):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._saved.clear()

    def layout_forward(self, net: Network, arguments: dict) -> Any:
        latent = arguments.get(self.family.latent)
        rows = len(latent) if isinstance(latent, (list, tuple)) else getattr(latent, "shape", (None,))[0]
        self.check_rows(rows, self.latent_batch)
        self.call_rows.append(rows)
        if self.family.frames_in_batch:  # the scheduler steps B * frames rows (Family.frames_in_batch)
            self.frames = int(latent.shape[2])
        return self.layout.forward(self, net, arguments)

    def check_rows(self, rows: int | None, latent_batch: int | None) -> None:
        """The runtime guard: a network call is the layout's multiple of the stepped latent batch (or, once a
        callback turned CFG off, the latent batch itself); anything else is refused, never combined."""
        if rows is None or latent_batch is None:
            return
        multiple = self.layout.rows_per_latent_row
        if rows not in (multiple * latent_batch, latent_batch):
            raise ValueError(f"{self.pipe_name} called its network on {rows} rows for a latent batch of "
                             f"{latent_batch}; its CFG layout ({type(self.layout).__name__}) runs {multiple} rows per "
                             "latent row, so apply() refuses to combine this call (the pipeline batches its "
                             "branches in a way its family row does not describe)")

    def scheduler_step(self, *args, **kwargs):
        """``scheduler.step``: the guard on the step's network calls, then the layout's step."""
        sample = self._step_signature.bind_partial(*args, **kwargs).arguments.get("sample")
        if isinstance(sample, Tensor) and sample.ndim >= 2:
            self.latent_batch = sample.shape[0] // (self.frames if self.family.frames_in_batch else 1)
            for rows in self.call_rows:
                self.check_rows(rows, self.latent_batch)
        self.call_rows = []
        if self.combiner.changes_renoise or self.layout.wraps_step:
            return self.layout.step(self, *args, **kwargs)
        self.pending = None
        return self.orig_step(*args, **kwargs)

    def count(self, rows: int) -> None:
        self.step_rows += rows
        self.stats.calls += 1

    # -- the pipeline call --------------------------------------------------------------------------------------
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
        for arg in family.also_on:  # e.g. image_guidance_scale: the pipeline batches every branch only at >= 1
            if given(arg) is not None and float(given(arg)) < 1.0:
                params[arg] = 1.0
        if family.negative and all(given(arg) is None for arg in family.negative):
            if getattr(self.pipe, "tokenizer", None) is None:
                raise ValueError(f"{name} runs CFG only with a negative prompt; pass {family.negative[1]} (and its "
                                 "pooled/mask companions): the pipeline has no tokenizer to encode an empty one")
            params["negative_prompt"] = ""  # the empty prompt: what the unconditional branch means elsewhere
        self.combiner.reset()
        self.reset_run()
        # bound.args/kwargs re-expand **kwargs (e.g. SD's legacy callback=), so every argument arrives unchanged
        return super_call(*bound.args[1:], **bound.kwargs)

    # -- the scheduler: noise levels ----------------------------------------------------------------------------
    def level(self, timestep: Any, device, dtype) -> Level:
        """The noise level of the current step (the scheduler's, from where the run began)."""
        if self.family.start == "timestep":
            if self.first_index is None:
                self.first_index = self._index_of(timestep)
            begin = self.first_index
        else:
            begin = self.reader.begin_index()
        index = min(begin + self.index, self.reader.num_steps)
        return self.reader.level(timestep, index, device, dtype)

    def _index_of(self, timestep: Any) -> int:
        """The position of ``timestep`` in the scheduler's schedule (the nearest listed timestep)."""
        t = torch.as_tensor(timestep).flatten()[0].to(torch.float64)
        return int((self.scheduler.timesteps.to(torch.float64).cpu() - t.cpu()).abs().argmin())

    def next_level(self, level: Level) -> Level | None:
        """The level the scheduler steps to (flow pipelines whose network time apply knows), else None."""
        if self.family.flow_time is None:
            return None
        return self.reader.next_level(level, self.family.time_at)

    def end_step(self) -> None:
        self.stats.rows += self.step_rows
        self.stats.rows_per_step.append(self.step_rows)
        self.step_rows = 0
        self.index += 1
