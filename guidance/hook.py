"""``apply(pipe, guide)``: make a diffusers pipeline run any guide, without copying its ``__call__``.

The pipeline's family (:mod:`.families`) names its CFG layout, one object each (:mod:`.layouts`):

* batched (``[uncond; cond]``, ``[cond; uncond]``, per-sample lists): the network's ``forward`` is replaced on the
  instance. It evaluates only the rows the guide asks for, lets the guide combine, and returns ``[g; g]``; the
  pipeline's ``g + w (g - g)`` is then ``g`` exactly. ``scheduler.step`` is wrapped only for guides that renoise
  differently (CFG++).
* two calls per step (cond, then uncond: Flux, Qwen-Image, Wan, CogView4, Lumina 2): the forward records each
  branch as it passes (and skips the unconditional call when the guide does not need it); the guided
  prediction replaces the pipeline's own combination where it is handed to ``scheduler.step``. The pipeline's
  code runs unchanged, and whatever it does between the calls and the step is superseded by the guide.

``Step.x`` is the pipeline's own latent (flow scale for flow pipelines; the converters hold for any scale) and
``step.evaluate(x, cond)`` takes ``x`` in that same scale, at the step's own level; on flow pipelines also at
another ``Level`` (``step.next_level`` is the scheduler's next one), as Rectified-CFG++ needs. Everything is
restored on exit.

The layers: :mod:`.network` (the hooked network, argument binding, row selection), :mod:`.layouts` (one object per
CFG layout), :mod:`.records` (the typed state of a step), :mod:`.session` (installation, the pipeline call, the
noise level from ``samplers.schedule.ScheduleReader``) and the combiner the session is given:
:class:`~.combiners.GuideCombiner` or :class:`~.guider_apply.GuiderCombiner`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

from .base import Guidance
from .combiners import GuideCombiner
from .families import other_level_pipelines
from .guider_apply import GuiderCombiner, is_diffusers_guider
from .network import Branch
from .records import HookStats
from .scheduler_step import check_scheduler
from .session import Session

__all__ = ["Branch", "HookStats", "apply"]


@contextmanager
def apply(pipe, guide: Guidance) -> Iterator[HookStats]:
    """Context manager: inside it, ``pipe(...)`` runs ``guide`` instead of its own CFG.

    ``guide`` is a diffguide guide or any ``diffusers.guiders.BaseGuidance`` (:mod:`.guider_apply`).

    Whatever CFG scale the caller passes (or none), the pipeline runs CFG and the guide's own parameters rule.
    Yields :class:`HookStats` (network calls and rows). Restores the pipeline on exit. Supported pipelines and
    how each runs CFG: :data:`diffguide.guidance.families.FAMILIES`. The first step of a call whose guided
    prediction has more than ``BLOWUP_RATIO`` times the conditional one's norm warns (a scale far too large).
    """
    if is_diffusers_guider(guide):  # a diffusers.guiders.BaseGuidance: its own passes and combination
        session = Session(pipe, GuiderCombiner(pipe, guide))
        if session.layout.branches > 2:
            raise TypeError(f"{type(guide).__name__} is a two-branch diffusers guider; {session.pipe_name} batches "
                            f"{session.layout.branches} branches: use guidance.ImageCFG or a diffguide guide")
    elif not isinstance(guide, Guidance):
        raise TypeError(f"guide must be a guidance.Guidance or a diffusers.guiders.BaseGuidance, got "
                        f"{type(guide).__name__}")
    elif getattr(pipe, "_diffguide_session", None) is not None:
        raise ValueError("this pipeline is already inside guidance.apply; nested apply is not supported")
    else:
        session = Session(pipe, GuideCombiner(guide))
        _check_guide(session, guide)
    session.install()
    pipe._diffguide_session = session
    try:
        yield session.stats
    finally:
        session.remove()
        pipe._diffguide_session = None


def _check_guide(session: Session, guide: Guidance) -> None:
    """Refuse, up front, a guide the pipeline's layout or network time cannot serve."""
    name = type(session.pipe).__name__
    if guide.changes_renoise:
        if not session.layout.steps_on_one_copy:
            raise TypeError(f"{type(guide).__name__} changes the renoise term; {name} steps its "
                            "scheduler on the doubled CFG batch, which apply() cannot split")
        check_scheduler(session.scheduler)
    if guide.evaluates_other_levels and session.family.residuals:
        raise TypeError(f"{type(guide).__name__} evaluates the network at other noise levels; {name} feeds it "
                        f"ControlNet residuals ({', '.join(session.family.residuals)}) computed for the step's own "
                        "latent and level, which such a pass would reuse wrongly. Use a guide that takes no extra "
                        "pass (CFG, APG, CFG++, CFG-Zero*, AG, interval)")
    if guide.evaluates_other_levels:
        family = session.family
        if family.scheduler != "flow" or family.flow_time is None:
            served = other_level_pipelines()
            why = ("runs no flow network" if family.scheduler != "flow" else
                   "feeds its network a time that is no function of the flow level apply knows")
            raise TypeError(f"{type(guide).__name__} evaluates the network at other noise levels; "
                            f"{name} {why}. Supported: {', '.join(served)}")


def is_flow_scheduler(scheduler) -> bool:
    """Deprecated: :func:`diffguide.samplers.schedule.is_flow`."""
    from diffguide.samplers.schedule import is_flow

    warnings.warn("diffguide.guidance.hook.is_flow_scheduler is deprecated; use diffguide.samplers.schedule.is_flow",
                  DeprecationWarning, stacklevel=2)
    return is_flow(scheduler)
