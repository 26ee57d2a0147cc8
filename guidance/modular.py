"""A diffguide guide as a diffusers guider, for Modular Diffusers: ``pipe.update_components(guider=...)``.

A diffusers guider sees only the network's predictions and the step/timestep. The adapter gets the rest itself:

* the scheduler it was given yields ``alpha``/``sigma`` of the current timestep and the prediction type (VP for
  DDPM-family schedulers; ``alpha = 1 - s``, ``sigma = s`` and flow velocity for flow matching);
* ``prepare_models`` puts a forward pre-hook on the denoiser that captures the network's input ``x_t`` (the VP
  state: DDPM-family schedulers scale their state to it in ``scale_model_input``; the flow state ``x_s``) and
  the conditional inputs, so x0-space guides (APG, AG in x0) are exact;
* for guides that renoise with another prediction (CFG++), ``forward`` wraps the scheduler's ``step`` on the
  given instance for the one step that follows and restores it inside that call (``scheduler_step.renoise_step``);
* a guide that needs no unconditional rows at a step (AG after its trigger, LinearAG's replaced steps, interval
  guidance outside its interval, ``CFG(1)``) makes ``num_conditions`` 1: that pass is not run. The protocol runs a
  batch for all samples or none, so when only some samples need it, all rows are evaluated and the unneeded ones
  are discarded (the guide sees what ``guidance.apply`` gives it: ``pred_uncond == pred_cond`` on those rows).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import ScheduleReader, check_prediction_type

from .base import Guidance, Step, guided_checked
from .gfcg import GFCG
from .records import HookStats
from .scheduler_step import check_scheduler, renoise_step

try:
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
    UNAVAILABLE: str | None = None
except ImportError:  # an older diffusers: everything but this adapter works
    from diffusers import __version__ as _diffusers_version

    UNAVAILABLE = (f"as_diffusers_guider needs diffusers' guiders (BaseGuidance, GuiderOutput: diffusers >= 0.36); "
                   f"diffusers {_diffusers_version} is installed: pip install -U 'diffusers>=0.41'")
    BaseGuidance = type("BaseGuidance", (), {})  # a stand-in base class so that this module imports
    GuiderOutput = None

LATENT_NAMES = ("sample", "hidden_states", "x", "latents")  # the latent argument of diffusers denoisers
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # state x_s = (1 - s) x0 + s eps, no scale_model_input
CALL_ONLY = ("timestep", "return_dict")


def _refusal(guide: Guidance) -> str | None:
    """Why the guider protocol cannot carry ``guide`` (or a guide nested in it), else None."""
    if isinstance(guide, GFCG) and guide.reference_model is None:
        return ("GFCG evaluates the main network once more with its reference class; a guider's batches are built "
                "only from the pipeline's own (cond, uncond) inputs, so a pass with another condition cannot be "
                "scheduled. Pass reference_model= (a separate model callable), or run it with guidance.apply on a "
                "classic pipeline")
    if type(guide).evaluates_other_levels:
        return ("it evaluates the network at another noise level within the step (Rectified-CFG++'s corrector at "
                "the predicted point); a guider's batches all run at the step's own latent and timestep. Run it "
                "with guidance.apply on a classic pipeline")
    for inner in (getattr(guide, "guide", None), getattr(guide, "base", None), getattr(guide, "adaptive", None)):
        if isinstance(inner, Guidance):
            reason = _refusal(inner)
            if reason is not None:
                return reason
    return None


class DiffguideGuider(BaseGuidance):
    """A diffusers ``BaseGuidance`` that runs a diffguide guide; build it with :func:`as_diffusers_guider`.

    ``stats`` (:class:`HookStats`) of the last pipeline call: denoiser calls and rows evaluated (``rows_per_step``),
    and the unconditional rows each sample's guide used (``uncond_rows_per_sample``; fewer than evaluated when only
    some samples needed them).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guide: Guidance, scheduler) -> None:
        if UNAVAILABLE is not None:
            raise ImportError(UNAVAILABLE)
        if isinstance(guide, BaseGuidance):
            raise TypeError(f"as_diffusers_guider takes a diffguide guide; {type(guide).__name__} is already a "
                            "diffusers guider: give it to the pipeline directly (pipe.update_components(guider=...))")
        if not isinstance(guide, Guidance):
            raise TypeError(f"guide must be a diffguide guidance.Guidance, got {type(guide).__name__}")
        reason = _refusal(guide)
        if reason is not None:
            raise ValueError(f"{type(guide).__name__} cannot run as a diffusers guider: {reason}")
        name = type(scheduler).__name__
        if name in FLOW_SCHEDULERS:
            prediction_type = "flow_prediction"
        elif getattr(scheduler, "alphas_cumprod", None) is not None and callable(getattr(scheduler, "step", None)):
            prediction_type = check_prediction_type(scheduler.config.get("prediction_type", "epsilon"))
        else:
            raise ValueError(f"as_diffusers_guider needs the pipeline's scheduler: a DDPM-family one (DDIM, Euler, "
                             f"Euler-ancestral, DPM-Solver, UniPC, ...) or one of {FLOW_SCHEDULERS}; got {name}")
        self.flow = prediction_type == "flow_prediction"
        if self.flow and getattr(scheduler, "sigmas", None) is None:
            raise ValueError(f"{name} with prediction_type='flow_prediction' keeps no sigmas to read the level from")
        if guide.changes_renoise:
            if self.flow:
                raise ValueError(f"{type(guide).__name__} changes the renoise term; its scheduler step is written for "
                                 f"VP/VE schedules, not for flow matching ({name})")
            check_scheduler(scheduler)
        super().__init__()
        self.register_to_config(guide=repr(guide), scheduler=type(scheduler).__name__)  # JSON-able description only
        self.guide, self.scheduler, self.prediction_type = guide, scheduler, prediction_type
        self.reader = ScheduleReader(scheduler)
        self.stats = HookStats()
        self._mask: Tensor | None = None        # this step's per-sample need of the unconditional branch
        self._captured: dict[str, Any] = {}     # x and conditional inputs of this step's conditional batch
        self._hook = None
        self._renoise: Tensor | None = None     # pending renoise prediction for the next scheduler step
        self._step_state: dict = {}

    # -- diffusers protocol ---------------------------------------------------------------------------------
    def new(self, **kwargs) -> "DiffguideGuider":
        """A fresh adapter around the same (or a given) guide and scheduler."""
        unknown = set(kwargs) - {"guide", "scheduler"}
        if unknown:
            raise TypeError(f"DiffguideGuider.new takes guide= and scheduler=, got {sorted(unknown)}")
        return DiffguideGuider(kwargs.get("guide", self.guide), kwargs.get("scheduler", self.scheduler))

    def save_pretrained(self, *args, **kwargs):
        raise TypeError("a DiffguideGuider holds Python objects (the guide, the scheduler) and has no config file; "
                        "rebuild it with diffguide.as_diffusers_guider(guide, pipe.scheduler) after loading")

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        if self._renoise is not None:
            self._restore_step()
            raise RuntimeError(f"{self.guide!r} changes the renoise term, but the scheduler given to "
                               "as_diffusers_guider was not stepped: pass the pipeline's own scheduler")
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            self.guide.reset()
            self.stats = HookStats()
            self._step_state.clear()
        self._mask, self._captured = None, {}
        timesteps = getattr(self.scheduler, "timesteps", None)
        if getattr(self.scheduler, "num_inference_steps", None) is None or timesteps is None or \
                not bool((torch.as_tensor(timesteps).cpu() == torch.as_tensor(timestep).cpu()).any()):
            raise ValueError(f"timestep {timestep} is not among the timesteps of the scheduler given to "
                             "as_diffusers_guider; pass the pipeline's own scheduler (pipe.scheduler)")

    def _level(self, device, dtype) -> Level:
        """``alpha``/``sigma`` of the current timestep from the scheduler (``samplers.schedule.ScheduleReader``)."""
        return self.reader.level(self._timestep, None, device, dtype, step=self._step,
                                 num_steps=self._num_inference_steps)

    def _need(self, batch: int, like: Tensor) -> Tensor:
        """The guide's per-sample need of the unconditional branch at this step (asked once per step)."""
        if self._mask is None:
            if not self._enabled:
                self._mask = torch.zeros(batch, dtype=torch.bool)
            else:
                level = self._level(like.device, like.dtype if like.is_floating_point() else torch.float32)
                self._mask = self.guide.needs_uncond(level, batch).to(torch.bool).cpu()
        return self._mask

    @property
    def num_conditions(self) -> int:
        # unknown before this step's inputs (e.g. when the pipeline decides whether to encode a negative prompt)
        return 2 if self._mask is None or bool(self._mask.any()) else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1  # the conditional batch runs first

    def _check_batches(self, items: dict[str, tuple[Any, Any]]) -> int:
        cond = [c for c, _ in items.values() if isinstance(c, Tensor)]
        if not cond:
            raise ValueError("the guider inputs hold no conditional tensor (e.g. prompt_embeds)")
        batch = cond[0].shape[0]
        self._need(batch, cond[0])
        if self.num_conditions == 2:
            missing = [name for name, (c, u) in items.items() if c is not None and u is None]
            if missing:
                raise ValueError(f"{self.guide!r} needs the unconditional branch, but the pipeline provides no "
                                 f"unconditional {', '.join(missing)} (e.g. negative_prompt_embeds)")
        return batch

    def prepare_inputs(self, data: dict[str, tuple[Tensor, Tensor]]) -> list:
        self._check_batches({k: v if isinstance(v, tuple) else (v, v) for k, v in data.items()})
        if self.num_conditions == 2 and not any(isinstance(v, tuple) for v in data.values()):
            raise ValueError(f"{self.guide!r} needs the unconditional branch, but the pipeline passes no (cond, "
                             f"uncond) inputs ({', '.join(data)}): give it negative prompt embeddings")
        return [self._prepare_batch(data, index, name)
                for index, name in zip(range(self.num_conditions), self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        items = {}
        for key, field in input_fields.items():
            names = field if isinstance(field, tuple) else (field, field)
            items[key] = tuple(getattr(data, n, None) if n is not None else None for n in names)
        self._check_batches(items)
        return [self._prepare_batch_from_block_state(input_fields, data, index, name)
                for index, name in zip(range(self.num_conditions), self._input_predictions)]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        if not isinstance(denoiser, torch.nn.Module):
            raise TypeError(f"the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
        patched = getattr(vars(denoiser).get("forward"), "__self__", None)
        if type(patched).__module__.startswith("diffguide."):
            raise ValueError(f"{type(denoiser).__name__}.forward is replaced on the instance (is it inside "
                             "guidance.apply?); a diffguide guide runs either through apply or as a Modular guider, "
                             "not both at once")
        active = getattr(denoiser, "_diffguide_guider", None)
        if active is not None and active is not self:
            raise ValueError("this denoiser is already driven by another DiffguideGuider; nested guiders are not "
                             "supported")
        super().prepare_models(denoiser)
        denoiser._diffguide_guider = self
        self._hook = denoiser.register_forward_pre_hook(self._capture, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(denoiser, "_diffguide_guider", None) is self:
            del denoiser._diffguide_guider

    def _capture(self, module, args: tuple, kwargs: dict):
        """Forward pre-hook: the step's latent ``x_t`` and, for the conditional batch, its other inputs."""
        name = next((n for n in LATENT_NAMES if n in kwargs), None)
        x = args[0] if args else kwargs.get(name)
        if not isinstance(x, Tensor):
            raise TypeError(f"cannot find the latent input of {type(module).__name__} (positional, or one of "
                            f"{LATENT_NAMES})")
        self.stats.calls += 1
        self.stats.rows += x.shape[0]
        if self.is_conditional:
            cond = {k: v for k, v in kwargs.items() if k != name and k not in CALL_ONLY}
            if len(args) > 2:
                raise TypeError(f"{type(module).__name__} was called with its condition positionally; the adapter "
                                "reads the condition from keyword arguments")
            self._captured = {"x": x, "cond": cond, "rows": x.shape[0]}
        else:
            self._captured["rows"] = self._captured.get("rows", 0) + x.shape[0]
        return None

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> GuiderOutput:
        if "x" not in self._captured:
            raise RuntimeError("the denoiser ran without the adapter's hook: call prepare_models(denoiser) before "
                               "each batch, as Modular denoise blocks do")
        x = self._captured["x"][:, : pred_cond.shape[1]]  # drop extra input channels (inpainting mask, image)
        if x.shape != pred_cond.shape:
            raise ValueError(f"the denoiser's latent input {tuple(x.shape)} and its prediction "
                             f"{tuple(pred_cond.shape)} differ in shape (learned-variance outputs are not supported)")
        self.stats.rows_per_step.append(self._captured["rows"])
        if not self._enabled:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        mask = self._need(pred_cond.shape[0], pred_cond).to(pred_cond.device)
        counts = self.stats.uncond_rows_per_sample
        self.stats.uncond_rows_per_sample = mask.long().cpu() if counts is None else counts + mask.long().cpu()
        if pred_uncond is None:
            uncond = pred_cond.clone()
        else:
            uncond = torch.where(mask.view(-1, *[1] * (pred_cond.ndim - 1)), pred_uncond, pred_cond)
        level = self._level(pred_cond.device, pred_cond.dtype)
        step = Step.at(level, x, pred_cond, uncond, self.prediction_type, uncond_mask=mask,
                       cond=self._captured["cond"])
        guided = guided_checked(self.guide, step)
        if self.guide.changes_renoise:
            self._install_step(guided.renoise)
        if self._step == self._num_inference_steps - 1:
            # classic pipelines ask num_conditions before the next call's first set_state (to decide whether to
            # encode the negative prompt): after the last step it is 2 again, not the last step's need
            self._mask = None
        return GuiderOutput(pred=guided.denoise, pred_cond=pred_cond, pred_uncond=pred_uncond)

    # -- the scheduler step of guides that renoise differently (CFG++) ----------------------------------------
    def _install_step(self, renoise: Tensor) -> None:
        sched = self.scheduler
        if "step" in vars(sched):
            raise ValueError(f"{type(sched).__name__}.step is already replaced on the instance (is the scheduler "
                             "inside guidance.apply?); a CFG++-style guide can wrap it only once")
        self._renoise = renoise
        orig = sched.step

        def step(model_output: Tensor, timestep, sample: Tensor, *args, **kwargs):
            self._restore_step()
            pending, self._renoise = self._renoise, None
            if pending is None or model_output.shape != pending.shape:
                raise TypeError("the scheduler was stepped on another prediction than the guider's output")
            return renoise_step(sched, orig, model_output, pending, timestep, sample, self.prediction_type,
                                self._step_state, *args, **kwargs)

        # keep the scheduler's signature visible: pipelines pass eta/generator only if inspect finds them
        sched.step = functools.wraps(orig)(step)

    def _restore_step(self) -> None:
        if "step" in vars(self.scheduler):
            del self.scheduler.step

    def __repr__(self) -> str:
        return f"DiffguideGuider({self.guide!r}, scheduler={type(self.scheduler).__name__})"


def as_diffusers_guider(guide: Guidance, scheduler) -> DiffguideGuider:
    """Wrap a diffguide guide as a diffusers guider for a Modular pipeline.

    ``scheduler`` must be the pipeline's own scheduler instance (``pipe.scheduler``): it gives the adapter
    ``alpha``/``sigma`` and the prediction type, and CFG++-style guides step it. Usage::

        pipe.update_components(guider=diffguide.as_diffusers_guider(diffguide.APG(scale=5.0), pipe.scheduler))

    Refused (``ValueError``): GFCG without ``reference_model`` (its extra pass with the reference class is a
    network call the pipeline never schedules; use ``guidance.apply``); schedulers that are neither DDPM-family nor
    ``FlowMatchEulerDiscreteScheduler`` (e.g. EDM); CFG++-style guides on flow matching or on a scheduler
    ``scheduler_step.renoise_step`` does not cover.
    """
    return DiffguideGuider(guide, scheduler)
