"""CFG layouts: how a pipeline family lays out classifier-free guidance in its network calls, one class each.

A layout owns everything that differs between them: which rows of a call are which branch (:meth:`cfg_rows`),
per-sample lists (Z-Image), the sign and float32 copy of the prediction the pipeline steps on
(``Family.output_sign`` / ``float32``), the channels or tokens of an output beyond the latent's (learned sigma,
appended image tokens), and the pipeline's control flow: one batched call per step (:class:`BatchedLayout`)
or a conditional and an unconditional call (:class:`TwoCalls`). It hands each step to the session's combiner
(a diffguide guide or a diffusers guider), which decides what to evaluate and how to combine.

``Family.layout`` names the class (``LAYOUTS``). A new layout is one subclass with a ``name``; see
``docs/layouts.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .network import Network, prediction_of, select_rows, with_prediction
from .records import PendingStep
from .scheduler_step import renoise_step

LAYOUTS: dict[str, type["Layout"]] = {}


@dataclass
class CfgBatch:
    """One batched network call: its bound ``arguments``, its latent as one tensor (per-sample lists stacked), its
    network time and the number of rows (``full``: the CFG batch, or half of it once the pipeline stops CFG)."""

    arguments: dict[str, Any]
    sample: Tensor
    timestep: Any
    full: int


class Layout:
    """The base of every CFG layout; ``family`` is the pipeline's :class:`~.families.Family`."""

    name: ClassVar[str] = ""
    branches: ClassVar[int] = 2            # CFG branches batched in one network call
    lists: ClassVar[bool] = False          # the batch is a list of per-sample tensors
    wraps_step: ClassVar[bool] = False     # the guided prediction is handed over at ``scheduler.step``
    steps_on_one_copy: ClassVar[bool] = True  # the scheduler steps on one batch copy (renoise can be split)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            LAYOUTS[cls.name] = cls

    def __init__(self, family) -> None:
        self.family = family

    @property
    def rows_per_latent_row(self) -> int:
        """Network rows per row of the latent the scheduler steps (the runtime guard's multiple)."""
        return self.branches if self.steps_on_one_copy else 1

    # -- the prediction: network output <-> what the guide sees ------------------------------------------------
    def prediction(self, out: Any) -> Tensor:
        """The network output's prediction as one tensor (lists stacked), float32 where the pipeline combines
        ``.float()`` copies."""
        tensor = prediction_of(out)
        tensor = torch.stack(list(tensor)) if self.lists else tensor
        return tensor.float() if self.family.float32 else tensor

    def to_guide(self, tensor: Tensor) -> Tensor:
        """The prediction the scheduler steps on (negated where the pipeline steps on ``-network_output``)."""
        return -tensor if self.family.output_sign < 0 else tensor

    from_guide = to_guide  # the sign is its own inverse

    @staticmethod
    def split(tensor: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        """``(prediction, extra)``: the output's first ``sample.shape[1]`` channels (or tokens), and the rest
        (learned-sigma channels)."""
        channels = sample.shape[1]
        return tensor[:, :channels], tensor[:, channels:]

    @staticmethod
    def join(pred: Tensor, extra: Tensor) -> Tensor:
        return torch.cat([pred, extra], dim=1) if extra.shape[1] else pred

    def network_output(self, out: Any, tensor: Tensor) -> Any:
        """``out`` with its prediction replaced by ``tensor`` (unbound into a list for list batches)."""
        return with_prediction(out, list(tensor.unbind(0)) if self.lists else tensor)

    def stepped(self, tensor: Tensor) -> Tensor:
        """A prediction in the shape the pipeline hands ``scheduler.step`` (frames folded into the batch where the
        family steps them so, ``Family.frames_in_batch``)."""
        if self.family.frames_in_batch:
            return tensor.transpose(1, 2).reshape(-1, tensor.shape[1], *tensor.shape[3:])
        return tensor

    def unstepped(self, tensor: Tensor, like: Tensor) -> Tensor:
        """A prediction in the :meth:`stepped` shape back in the shape of the network's prediction ``like``."""
        if self.family.frames_in_batch:
            batch, channels, frames = like.shape[:3]
            return tensor.reshape(batch, frames, channels, *like.shape[3:]).transpose(1, 2)
        return tensor.reshape(like.shape)

    # -- the stepped latent and the conditioning concatenated to it (``Family.conditioning``) ----------------------
    def width(self, prediction: Tensor, sample: Tensor) -> int:
        """The stepped latent's size along ``conditioning_dim``, from a network output's ``prediction`` and the
        network's latent input ``sample``: conditioning channels are in the input only, so the prediction's width."""
        dim = self.family.conditioning_dim
        if self.family.conditioning != "channels":
            return sample.shape[dim]
        return prediction.shape[dim] // (2 if self.family.variance else 1)

    def latent_part(self, tensor: Tensor, width: int) -> Tensor:
        """``tensor``'s first ``width`` channels / tokens along ``conditioning_dim``: the latent the scheduler
        steps, or its prediction (the whole of it where the family concatenates nothing)."""
        if self.family.conditioning is None:
            return tensor
        return tensor.narrow(self.family.conditioning_dim, 0, width)

    def conditioning_part(self, sample: Tensor, width: int) -> Tensor | None:
        """The conditioning channels / tokens of a network input beyond the stepped latent's ``width``."""
        if self.family.conditioning is None:
            return None
        dim = self.family.conditioning_dim
        return sample.narrow(dim, width, sample.shape[dim] - width)

    def with_conditioning(self, x: Tensor, conditioning: Tensor | None) -> Tensor:
        """A network input from the latent ``x`` and the step's conditioning (re-appended for extra passes)."""
        return x if conditioning is None else torch.cat([x, conditioning.to(x)], dim=self.family.conditioning_dim)

    # -- the arguments --------------------------------------------------------------------------------------------
    def latent(self, arguments: dict) -> Tensor:
        sample = arguments[self.family.latent]
        return torch.stack(list(sample)) if self.lists else sample

    def repeats(self, arguments: dict) -> int:
        """How many times each row of a ``Family.repeated`` argument is repeated (AnimateDiff: the frames)."""
        if not self.family.repeated:
            return 1
        return int(self.latent(arguments).shape[self.family.repeat_dim])

    def select(self, arguments: dict, rows: Tensor, full: int) -> dict:
        """The arguments of the batch's ``rows`` (per-row tensors and, for list batches, list items; arguments
        repeated per row follow with all their repeats)."""
        repeats = self.repeats(arguments)
        return {k: v if k in self.family.unbatched else self.select_value(v, rows, full, k, repeats)
                for k, v in arguments.items()}

    def select_value(self, value: Any, rows: Tensor, full: int, name: str | None = None, repeats: int = 1) -> Any:
        if name in self.family.repeated and repeats > 1:
            rows = (rows[:, None] * repeats + torch.arange(repeats, device=rows.device)).flatten()
            full = full * repeats
        dim = self.family.batch_dims.get(name, 0)
        if dim and isinstance(value, Tensor):  # rows along another dimension (Family.batch_dims)
            return select_rows(value.movedim(dim, 0), rows, full, self.lists).movedim(0, dim)
        return select_rows(value, rows, full, self.lists)

    # -- the pipeline's control flow ----------------------------------------------------------------------------
    def forward(self, session, net: Network, arguments: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, session, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        return session.orig_step(model_output, timestep, sample, *args, **kwargs)


class BatchedLayout(Layout):
    """One network call per step on the whole CFG batch; the network's output is replaced by ``[g; g]``, whose
    combination by the pipeline is ``g`` exactly."""

    cond_first: ClassVar[bool] = False

    def cfg_rows(self, full: int) -> tuple[Tensor, Tensor]:
        """``(cond_rows, uncond_rows)`` of a CFG batch of ``full`` rows."""
        batch = full // 2
        if self.cond_first:
            return torch.arange(batch), torch.arange(batch, full)
        return torch.arange(batch, full), torch.arange(batch)

    def image_rows(self, full: int) -> Tensor:
        """Rows of an image-only branch (three-branch layouts); none here."""
        return torch.arange(0)

    uncond_last: ClassVar[bool] = False  # the batch is [cond; (image;) uncond] rather than [uncond; cond]

    def bind(self, session, arguments: dict) -> CfgBatch:
        """The call as a :class:`CfgBatch`; the first call of a run fixes the CFG batch (one that is no multiple of
        the layout's branches is refused)."""
        sample = arguments[self.family.latent]
        full = len(sample) if self.lists else sample.shape[0]
        if session.full is None:
            if full % self.branches:
                raise ValueError(f"guidance.apply expects {session.pipe_name}'s CFG batch of {self.branches} "
                                 f"branches; got {full} rows")
            session.full = full
        return CfgBatch(arguments, self.latent(arguments), arguments.get(self.family.timestep), full)

    def run_rows(self, net: Network, arguments: dict, rows: Tensor, full: int) -> Any:
        """The network on the batch's ``rows`` in that order (the call's own arguments when they are all of them)."""
        if len(rows) == full and torch.equal(rows.cpu(), torch.arange(full)):
            return net.run(arguments, full)
        return net.run(self.select(arguments, rows, full), len(rows))

    def output(self, out: Any, guided: Tensor, extra: Tensor) -> Any:
        """The network output handed back to the pipeline: ``[g; g]`` (with the extra channels of the conditional
        rows), in the network's sign."""
        half = self.join(self.from_guide(guided), extra)
        return self.network_output(out, torch.cat([half] * self.branches))

    def forward(self, session, net: Network, arguments: dict) -> Any:
        return session.combiner.batched(session, net, self.bind(session, arguments))

    def step(self, session, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        pending, session.pending = session.pending, None
        renoise = None if pending is None else pending.renoise
        if renoise is None:
            return session.orig_step(model_output, timestep, sample, *args, **kwargs)
        renoise = self.stepped(renoise)
        if model_output.shape[0] != renoise.shape[0]:  # DiT steps on the doubled batch
            raise TypeError("guides that change the renoise term need a pipeline that steps on one batch copy")
        denoise = model_output[:, : renoise.shape[1]]
        return renoise_step(session.scheduler, session.orig_step, denoise, renoise.reshape(denoise.shape), timestep,
                            sample, session.prediction_type, session.step_state, *args, **kwargs)


class UncondCond(BatchedLayout):
    """``[uncond; cond]`` in one call (Stable Diffusion, SDXL, SD3, Sana, PixArt, HunyuanDiT)."""

    name = "uc"


class TextImageUncond(BatchedLayout):
    """``[text; image; uncond]`` in one call (InstructPix2Pix: prompt and image, image only, neither). Guides see
    ``pred_cond`` = text, ``pred_uncond`` = uncond and ``step.pred_image``; the network output is replaced by
    ``[g; g; g]``, which the pipeline's ``u + s (t - i) + s_i (i - u)`` turns into ``g`` exactly."""

    name = "text_image_uncond"
    branches = 3
    uncond_last = True

    def cfg_rows(self, full: int) -> tuple[Tensor, Tensor]:
        third = full // 3
        return torch.arange(third), torch.arange(2 * third, full)

    def image_rows(self, full: int) -> Tensor:
        third = full // 3
        return torch.arange(third, 2 * third)


class CondUncond(BatchedLayout):
    """``[cond; uncond]`` in one call, the scheduler stepping on both halves (DiT)."""

    name = "cu"
    cond_first = True
    steps_on_one_copy = False


class ListCondUncond(BatchedLayout):
    """One call on a list of per-sample tensors, ``[cond...; uncond...]``; the pipeline steps on the stacked
    outputs squeezed of their frame axis (Z-Image)."""

    name = "list_cu"
    cond_first = True
    lists = True

    def stepped(self, tensor: Tensor) -> Tensor:
        return tensor.squeeze(2)


class TwoCalls(Layout):
    """Two network calls per step, cond then uncond (Flux, Qwen-Image, Wan, CogView4, Lumina 2): the conditional
    call opens a :class:`~.records.PendingStep`, ``scheduler.step`` closes it with the guided prediction in place
    of the pipeline's own combination."""

    name = "two_calls"
    wraps_step = True
    branches = 1

    def forward(self, session, net: Network, arguments: dict) -> Any:
        pending = session.pending
        if pending is None:  # the conditional call opens the step
            session.pending = PendingStep(net=net, arguments=arguments)
            return session.combiner.cond_call(session, session.pending)
        if pending.uncond_called:
            raise RuntimeError(f"{session.pipe_name} called its network a third time in one step; apply() "
                               "knows two calls per step (cond, uncond)")
        pending.uncond_arguments = arguments
        return session.combiner.uncond_call(session, pending)

    def step(self, session, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        pending, session.pending = session.pending, None
        if pending is None:
            raise RuntimeError(f"{session.pipe_name} stepped its scheduler without a network call")
        return session.combiner.close(session, pending, model_output, timestep, sample, *args, **kwargs)


def layout_for(family) -> Layout:
    """The layout object of ``family`` (``Family.layout`` names its class)."""
    return LAYOUTS[family.layout](family)
