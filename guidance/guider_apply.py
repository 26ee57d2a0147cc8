"""Any ``diffusers.guiders.BaseGuidance`` through :func:`diffguide.guidance.apply`, on classic pipelines.

Every step, the hooked network call hands the guider the pipeline's own inputs as ``(cond, uncond)`` pairs
(``set_state``, ``prepare_inputs``), as a Modular denoise block does. The network then runs once per guider
batch with ``prepare_models`` / ``cleanup_models`` around it, so the perturbed passes of PAG, SEG, SLG and
AutoGuidance see the network modified exactly as diffusers modifies it; the guider's combination (``forward``)
is what the pipeline steps with. Batches for which ``prepare_models`` leaves the network unchanged (plain cond
and uncond passes) are evaluated together in one call, in the pipeline's own row order: CFG-type guiders then
run the pipeline's own network batch, bit for bit.

On two-call pipelines (Flux, Wan, Lumina 2, ...) the conditional call is the plain conditional pass and the guider's
other passes run at the unconditional call; its combination replaces the prediction handed to
``scheduler.step``. The guider receives the predictions the scheduler steps on (epsilon, v or flow velocity:
negated network outputs where the family's ``output_sign`` is -1, Lumina 2 and Z-Image, as Z-Image's Modular block
negates them too; Z-Image's per-sample list outputs stacked and squeezed of their frame axis, as its pipeline
steps on them), which is what a Modular pipeline feeds it.

``stats.uncond_rows_per_sample`` counts, per sample, the rows evaluated on the unconditional inputs (the negative
prompt), on the plain or a modified network alike (AutoGuidance's layer-skipped pass counts); the perturbed
conditional passes of PAG, SEG and SLG are conditional rows (in ``rows_per_step``, not in this count).

Three diffusers 0.42.1 defects are corrected and FrequencyDecoupledGuidance is refused where its combination fails:
:mod:`.guider_fixes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Guidance
from .guider_fixes import FLATTENED, check_predictions, fix_block_skip_order, prepare_counted
from .layouts import CfgBatch
from .network import Network, assemble, flatten, join_batches
from .records import PendingStep

_SLOT = "_diffguide_slot"  # marks which side of the (cond, uncond) pairs a guider batch took



def is_diffusers_guider(obj: Any) -> bool:
    """True for an instance of ``diffusers.guiders.BaseGuidance`` (never, with a diffusers that has none)."""
    try:
        from diffusers.guiders.guider_utils import BaseGuidance
    except ImportError:
        return False
    return isinstance(obj, BaseGuidance)


def check_guider(pipe, guider) -> None:
    """Refuse what a diffusers guider under ``apply`` cannot be: mixed with a diffguide guide."""
    wrapped = getattr(guider, "guide", None)
    if isinstance(wrapped, Guidance):
        raise TypeError(f"{type(guider).__name__} wraps the diffguide guide {type(wrapped).__name__} for Modular "
                        f"pipelines; pass the guide itself: guidance.apply(pipe, {type(wrapped).__name__}(...))")
    session = getattr(pipe, "_diffguide_session", None)
    if session is not None:
        raise ValueError(f"this pipeline already runs {session.guide!r} under guidance.apply; a diffusers guider and "
                         "a diffguide guide cannot be combined: use one apply() at a time")


def _pairs(cond: dict[str, Any], uncond: dict[str, Any], full_args: dict[str, Any], full: int,
           unbatched: tuple[str, ...], lists: bool = False,
           batch_dims: dict[str, int] | None = None, repeated: tuple[str, ...] = (),
           repeats: int = 1) -> dict[str, tuple[Any, Any]]:
    """The ``(cond, uncond)`` pair of every per-row network input, wherever it is nested (by dotted path); with
    ``lists``, also of every list of ``full`` per-sample tensors (Z-Image's list batches). Inputs batched along
    another dimension (``Family.batch_dims``) are paired rows first, as the guider joins batches on dim 0; inputs
    repeated ``repeats`` times per row (``Family.repeated``: AnimateDiff's per-frame embeddings) have
    ``full * repeats`` rows."""
    flat_c, flat_u, flat_full = {}, {}, {}
    whole = (full, full // 2) if lists else (None, None)
    batch_dims = batch_dims or {}
    for name in cond:
        if name in unbatched:
            continue
        values = (cond[name], uncond[name], full_args[name])
        if batch_dims.get(name, 0) and isinstance(values[2], Tensor):
            values = tuple(v.movedim(batch_dims[name], 0) for v in values)
        flatten(values[0], name, flat_c, whole[1])
        flatten(values[1], name, flat_u, whole[1])
        flatten(values[2], name, flat_full, whole[0])

    def rows(name: str) -> int:
        return full * repeats if name.split(".")[0] in repeated else full

    return {name: (flat_c[name], flat_u[name]) for name, value in flat_full.items()
            if (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == rows(name))
            or (lists and isinstance(value, list) and len(value) == full)}


def _batch_dims_back(values: dict[str, Any], batch_dims: dict[str, int]) -> dict[str, Any]:
    """Guider batch ``values`` (by dotted path) with the inputs of ``Family.batch_dims`` moved back to their own
    batch dimension."""
    return {key: value.movedim(0, batch_dims[key]) if key in batch_dims else value for key, value in values.items()}


def _network_state(module: torch.nn.Module) -> list[tuple[int, int]]:
    """What ``prepare_models`` may change: every submodule's instance ``forward`` (diffusers' hook registry
    rewrites it) and attention processor."""
    return [(id(m.__dict__.get("forward")), id(getattr(m, "processor", None))) for m in module.modules()]


class GuiderCombiner:
    """A diffusers guider as an ``apply`` combiner (see the module docstring)."""

    changes_renoise = False  # the guider's combination is what the scheduler steps with, as it is

    def __init__(self, pipe, guider) -> None:
        check_guider(pipe, guider)
        self.guide = self.guider = guider
        self.pipe_name = type(pipe).__name__
        self._guider_counts: bool | None = None  # whether the guider's prepare_models counts its own calls
        self._flattened = type(guider).__name__ in FLATTENED
        self._last_out: Any = None

    def reset(self) -> None:
        """Nothing: the guider resets itself at its step 0 (``set_state``)."""

    def _check_run(self, session, shape: tuple[int, ...]) -> None:
        """At the first network call of a run, before the network runs: refuse a guider whose combination is
        undefined on predictions of ``shape``, or would fail at some step of the run."""
        if session.index:
            return
        check_predictions(self.guider, shape, session.reader.num_steps, self.pipe_name)

    def _count_uncond(self, session, batch: int, batches: list) -> None:
        """``stats.uncond_rows_per_sample``: one row per sample for each guider batch on the unconditional inputs."""
        taken = torch.full((batch,), sum(self._slot(state) == 1 for state in batches), dtype=torch.long)
        counts = session.stats.uncond_rows_per_sample
        session.stats.uncond_rows_per_sample = taken if counts is None or len(counts) != batch else counts + taken

    # -- one batched call per step --------------------------------------------------------------------------------
    def batched(self, session, net: Network, call: CfgBatch) -> Any:
        layout, arguments, sample, full = session.layout, call.arguments, call.sample, call.full
        if full != session.full:
            raise ValueError(f"{self.pipe_name} changed its batch from {session.full} to {full} rows mid-run; with "
                             "a diffusers guider, turn guidance off by the guider's own start / stop instead")
        self._check_run(session, layout.stepped(sample).shape)
        batch, device = full // 2, sample.device
        cond_rows, uncond_rows = layout.cfg_rows(full)
        cond = layout.select(arguments, cond_rows.to(device), full)
        uncond = layout.select(arguments, uncond_rows.to(device), full)
        pairs = _pairs(cond, uncond, arguments, full, session.family.unbatched, layout.lists,
                       session.family.batch_dims, session.family.repeated, layout.repeats(arguments))
        batches, outputs, plain = self._run_batches(session, net, (cond, uncond), pairs, call.timestep, batch)
        if plain:  # one call on the plain batches, in the pipeline's own row order
            plain.sort(key=lambda i: self._slot(batches[i]) != (0 if layout.cond_first else 1))
            values = {key: join_batches([getattr(batches[i], key) for i in plain]) for key in pairs}
            merged = self._run(session, net, assemble(cond, _batch_dims_back(values, session.family.batch_dims)))
            for j, i in enumerate(plain):
                outputs[i] = merged[j * batch:(j + 1) * batch]
        cond_out = next(t for state, t in zip(batches, outputs) if self._slot(state) == 0)
        # the latent the scheduler steps: conditioning channels cut, learned-variance channels kept from cond's
        sample = layout.latent_part(sample, layout.width(cond_out, sample))
        pred, extra = layout.split(cond_out, sample)
        guided = self._combine(session, batches, [layout.stepped(t) for t in outputs], sample.shape[1])
        session.end_step()
        return layout.output(self._last_out, layout.unstepped(guided, pred), extra)

    @staticmethod
    def _slot(state) -> int:
        """0 if the guider's batch took the conditional inputs, 1 for the unconditional ones."""
        return int(getattr(state, _SLOT))

    def _run_batches(self, session, net: Network, templates: tuple[dict, dict | None],
                     pairs: dict[str, tuple[Any, Any]], timestep: Any,
                     batch: int) -> tuple[list, list[Tensor | None], list[int]]:
        """The guider's batches for this step; the modified passes evaluated, each inside its
        ``prepare_models`` / ``cleanup_models``; the indices of the plain ones (unmodified network), left to the
        caller to evaluate."""
        guider, module = self.guider, net.module
        t = timestep.flatten()[0] if isinstance(timestep, Tensor) else timestep
        guider.set_state(step=session.index, num_inference_steps=session.reader.num_steps, timestep=t)
        try:
            batches = guider.prepare_inputs(dict(pairs, **{_SLOT: (torch.tensor(0), torch.tensor(1))}))
        except IndexError:
            extra = [p for p in guider._input_predictions if p not in ("pred_cond", "pred_uncond")]
            raise ValueError(f"{type(guider).__name__} asks for inputs {self.pipe_name} does not compute: "
                             f"its passes {extra} read input slots beyond (cond, uncond), and the pipeline provides "
                             f"only the cond and uncond values of {', '.join(pairs)}") from None
        self._count_uncond(session, batch, batches)
        outputs: list[Tensor | None] = [None] * len(batches)
        plain = []
        for i, state in enumerate(batches):
            if templates[self._slot(state)] is None:
                raise ValueError(self._missing_uncond(session))
            before = _network_state(module)
            self._guider_counts = prepare_counted(self.guider, module, self._guider_counts)
            if _network_state(module) == before:
                plain.append(i)  # the unmodified network
            else:
                fix_block_skip_order(module)
                values = _batch_dims_back({key: getattr(state, key) for key in pairs}, session.family.batch_dims)
                outputs[i] = self._run(session, net, assemble(templates[self._slot(state)], values))
            guider.cleanup_models(module)
        return batches, outputs, plain

    def _missing_uncond(self, session) -> str:
        negative = ", ".join(session.family.negative) or "negative_prompt_embeds"
        return (f"{type(self.guider).__name__} needs the unconditional inputs, which {self.pipe_name} "
                f"did not compute at step {session.index}: pass a negative prompt ({negative})")

    def _combine(self, session, batches: list, outputs: list[Tensor], channels: int | None) -> Tensor:
        """The guider's combination of the network ``outputs`` (their first ``channels``), in the space the
        scheduler steps on (the layout's sign)."""
        layout = session.layout
        for state, tensor in zip(batches, outputs):
            pred = layout.to_guide(tensor if channels is None else tensor[:, :channels])
            state.noise_pred = pred.flatten(2) if self._flattened and pred.ndim > 3 else pred
        shape = (outputs[0] if channels is None else outputs[0][:, :channels]).shape
        guided = self.guider(batches).pred
        if guided.numel() != shape.numel():
            raise ValueError(f"{type(self.guider).__name__} returned a prediction of shape {tuple(guided.shape)} for "
                             f"predictions of shape {tuple(shape)}")
        guided = guided.reshape(shape)
        if not bool(torch.isfinite(guided).all()):
            raise FloatingPointError(f"{type(self.guider).__name__} produced a non-finite prediction at step "
                                     f"{session.index}; check the model's outputs and the guider's scales")
        return guided

    # -- two calls per step (cond, then uncond): the guider's passes run at the unconditional call ----------------
    def cond_call(self, session, pending: PendingStep) -> Any:
        """The plain conditional pass, as the pipeline asks."""
        sample = pending.arguments[session.family.latent]
        self._check_run(session, sample.shape)
        pending.cond_out = pending.net.run(pending.arguments, sample.shape[0])
        return pending.cond_out

    def uncond_call(self, session, pending: PendingStep) -> Any:
        self._evaluate_two_calls(session, pending)
        return pending.cond_out  # superseded at scheduler.step by the guider's combination

    def _evaluate_two_calls(self, session, pending: PendingStep) -> None:
        net, cond, uncond = pending.net, pending.arguments, pending.uncond_arguments
        flat_c: dict[str, Any] = {}
        flat_u: dict[str, Any] = {}
        for name in cond:
            flatten(cond[name], name, flat_c)
            if uncond is not None:
                flatten(uncond[name], name, flat_u)
        # each pass runs on its own call's arguments; an input the unconditional call lacks stays out of it
        pairs = {k: (v, flat_u.get(k)) for k, v in flat_c.items()
                 if isinstance(v, Tensor) and (uncond is None or k in flat_u)}
        batches, outputs, plain = self._run_batches(session, net, (cond, uncond), pairs,
                                                    cond.get(session.family.timestep),
                                                    cond[session.family.latent].shape[0])
        for i in plain:
            if self._slot(batches[i]) == 0:  # the conditional call already made, on the same inputs
                outputs[i] = session.layout.prediction(pending.cond_out)
            elif uncond is None:
                raise ValueError(self._missing_uncond(session))
            else:
                outputs[i] = self._run(session, net, uncond)  # the pipeline's own unconditional call
        pending.batches, pending.outputs = batches, outputs

    def close(self, session, pending: PendingStep, model_output: Tensor, timestep: Any, sample: Tensor, *args,
              **kwargs):
        if pending.batches is None:  # the pipeline made no unconditional call this step
            self._evaluate_two_calls(session, pending)
        outputs = pending.outputs
        if session.family.conditioning is not None:  # cut to the stepped latent's tokens, as the pipeline does
            outputs = [session.layout.latent_part(t, sample.shape[session.family.conditioning_dim]) for t in outputs]
        guided = self._combine(session, pending.batches, outputs, None).to(model_output.dtype)
        session.end_step()
        return session.orig_step(guided, timestep, sample, *args, **kwargs)

    def _run(self, session, net: Network, arguments: dict[str, Any]) -> Tensor:
        """One counted network call; its prediction as one tensor (the layout's lists stacked, float32)."""
        self._last_out = out = net.run(arguments, len(arguments[session.family.latent]))
        return session.layout.prediction(out)
