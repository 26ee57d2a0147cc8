"""The typed records ``apply`` keeps: what a run's network did, and one step's state between the network side (the
hooked forward) and the scheduler side (the hooked ``scheduler.step``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from diffguide.samplers.base import Level


@dataclass
class HookStats:
    """What the hooked network did during the guided calls."""

    calls: int = 0
    rows: int = 0
    rows_per_step: list[int] = field(default_factory=list)
    uncond_rows_per_sample: Tensor | None = None   # (B,) unconditional rows each sample took (adaptive guides)
    cond_only_steps: int = 0  # steps the pipeline itself ran without CFG (a callback turned it off)


@dataclass
class PendingStep:
    """One step's state from the network side to the scheduler side (``scheduler.step`` takes it).

    ``net`` / ``arguments`` / ``cond_out``: the (conditional) call and its output. A guide's combiner adds the
    step's ``level`` and per-sample need of the unconditional branch (``mask``), and on batched layouts the
    ``renoise`` prediction the scheduler steps with (CFG++); a guider's its ``batches`` and their ``outputs``. On
    two-call layouts ``uncond_arguments`` is set by the unconditional call (None: the pipeline made none) and
    ``uncond_out`` is its output (None where the guide did not need it and the call was skipped).
    """

    net: Any
    arguments: dict[str, Any]
    cond_out: Any = None
    level: Level | None = None
    mask: Tensor | None = None
    uncond_arguments: dict[str, Any] | None = None
    uncond_out: Any = None
    batches: list | None = None
    outputs: list | None = None
    renoise: Tensor | None = None

    @property
    def uncond_called(self) -> bool:
        return self.uncond_arguments is not None
