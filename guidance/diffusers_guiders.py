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

Three diffusers 0.42.1 defects are corrected so that guiders do what they are written for:
``SmoothedEnergyGuidance.prepare_models`` does not count its calls (:meth:`GuiderSession._prepare`), the
block-skip hook returns the two streams of SD3's blocks swapped (:func:`_fix_block_skip_order`), and
``MagnitudeAwareGuidance`` fails on predictions of more than three dimensions (:data:`_FLATTENED`).
``FrequencyDecoupledGuidance`` builds Laplacian pyramids of images: it is refused, at the first network call, on
pipelines whose predictions are not ``(batch, channels, height, width)`` (:data:`_IMAGE_ONLY`), and where some of
its levels would guide at a step and others not, which its forward mishandles (:meth:`GuiderSession._check_fdg_levels`),
and on latents its pyramid cannot decompose and rebuild at their size (:meth:`GuiderSession._check_fdg_size`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .base import Guidance, Guided, Step
from .hook import _Network, _Session, _tensor, _with_tensor

_SLOT = "_diffguide_slot"  # marks which side of the (cond, uncond) pairs a guider batch took

# diffusers 0.42.1's ``mambo_guidance`` takes ``torch.norm(x, dim=[1, ..., ndim - 1])`` with the default
# ``p="fro"``; torch computes that as a vector 2-norm for at most two dims only and hands three or more to
# ``linalg.matrix_norm``, which raises "dim must be a 2-tuple": every 4-D (B, C, H, W) or 5-D prediction fails.
# The norm it means, over all of a sample, is the same over (B, C, H * W ...): those guiders get their predictions
# flattened to three dims, and their combination (elementwise but for that norm) is reshaped back, exactly.
_FLATTENED = ("MagnitudeAwareGuidance",)
# guiders whose combination is defined on (B, C, H, W) images only, with the reason
_IMAGE_ONLY = {"FrequencyDecoupledGuidance": "builds Laplacian pyramids (kornia) of (batch, channels, height, width) "
                                             "predictions"}


def is_diffusers_guider(obj: Any) -> bool:
    """True for an instance of ``diffusers.guiders.BaseGuidance`` (never, with a diffusers that has none)."""
    try:
        from diffusers.guiders.guider_utils import BaseGuidance
    except ImportError:
        return False
    return isinstance(obj, BaseGuidance)


class _GuiderSlot(Guidance):
    """The session's guide slot while a diffusers guider runs: it renoises like the scheduler and never combines
    (the guider does)."""

    def __init__(self, guider) -> None:
        self.guider = guider

    def combine(self, step: Step) -> Guided:
        raise RuntimeError(f"{type(self.guider).__name__} combines through its own forward")

    def __repr__(self) -> str:
        return repr(self.guider)


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


def _flatten(value: Any, prefix: str, out: dict[str, Any], whole: int | None = None) -> None:
    """``value`` into ``out`` by dotted path: nested dicts by key, lists and tuples by index (IP-adapter embeddings
    are a list inside ``added_cond_kwargs``), except the per-sample lists of ``whole`` items (Z-Image's batches)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out, whole)
    elif isinstance(value, (list, tuple)) and len(value) != whole:
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", out, whole)
    else:
        out[prefix] = value


def _pairs(cond: dict[str, Any], uncond: dict[str, Any], full_args: dict[str, Any], full: int,
           unbatched: tuple[str, ...], lists: bool = False) -> dict[str, tuple[Any, Any]]:
    """The ``(cond, uncond)`` pair of every per-row network input, wherever it is nested (by dotted path); with
    ``lists``, also of every list of ``full`` per-sample tensors (Z-Image's list batches)."""
    flat_c, flat_u, flat_full = {}, {}, {}
    whole = (full, full // 2) if lists else (None, None)
    for name in cond:
        if name in unbatched:
            continue
        _flatten(cond[name], name, flat_c, whole[1])
        _flatten(uncond[name], name, flat_u, whole[1])
        _flatten(full_args[name], name, flat_full, whole[0])
    return {name: (flat_c[name], flat_u[name]) for name, value in flat_full.items()
            if (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == full)
            or (lists and isinstance(value, list) and len(value) == full)}


def _cat(parts: list) -> Any:
    """Batches of one network input joined along the batch: tensors concatenated, per-sample lists chained."""
    return [item for part in parts for item in part] if isinstance(parts[0], list) else torch.cat(parts)


def _replace(node: Any, keys: list[str], value: Any) -> Any:
    """A copy of ``node`` with the item at the dotted path ``keys`` replaced by ``value``."""
    if not keys:
        return value
    if isinstance(node, dict):
        return {**node, keys[0]: _replace(node[keys[0]], keys[1:], value)}
    items = list(node)
    items[int(keys[0])] = _replace(items[int(keys[0])], keys[1:], value)
    return type(node)(items)


def _assemble(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``template`` (the network's bound arguments) with the per-row inputs at the dotted paths of ``values``
    replaced."""
    arguments = dict(template)
    for path, value in values.items():
        name, *keys = path.split(".")
        arguments[name] = _replace(arguments[name], keys, value)
    return arguments


def _fix_block_skip_order(module: torch.nn.Module) -> None:
    """diffusers 0.42.1's ``TransformerBlockSkipHook`` returns ``(hidden_states, encoder_hidden_states)`` whatever
    the block's own output order; blocks registered with the encoder stream first (SD3's
    ``JointTransformerBlock``) then receive the streams swapped and fail. Where such a hook is the outermost one
    on a block, its output is put back in the block's order (``cleanup_models`` removes the wrapper with it)."""
    from diffusers.hooks.layer_skip import TransformerBlockSkipHook

    for block in module.modules():
        registry = getattr(block, "_diffusers_hook", None)
        if registry is None or not registry._hook_order:
            continue
        hook = registry.hooks[registry._hook_order[-1]]
        if (isinstance(hook, TransformerBlockSkipHook) and hook.dropout == 1.0
                and hook._metadata.return_encoder_hidden_states_index == 0):
            forward = block.forward
            block.forward = functools.wraps(forward)(lambda *args, _f=forward, **kwargs: _f(*args, **kwargs)[::-1])


def _network_state(module: torch.nn.Module) -> list[tuple[int, int]]:
    """What ``prepare_models`` may change: every submodule's instance ``forward`` (diffusers' hook registry
    rewrites it) and attention processor."""
    return [(id(m.__dict__.get("forward")), id(getattr(m, "processor", None))) for m in module.modules()]


class GuiderSession(_Session):
    """An ``apply`` session whose guide is a diffusers guider."""

    def __init__(self, pipe, guider) -> None:
        check_guider(pipe, guider)
        super().__init__(pipe, _GuiderSlot(guider))
        self.guider = guider
        self._guider_counts: bool | None = None  # whether the guider's prepare_models counts its own calls
        self._flattened = type(guider).__name__ in _FLATTENED

    def _check_run(self, shape: tuple[int, ...]) -> None:
        """At the first network call of a run, before the network runs: refuse a guider whose combination is
        undefined on predictions of ``shape``, or would fail at some step of the run."""
        if self.index:
            return
        name = type(self.guider).__name__
        reason = _IMAGE_ONLY.get(name)
        if reason is not None and len(shape) != 4:
            what = {3: "a packed token sequence", 5: "video latents (batch, channels, frames, height, width)"}
            raise ValueError(f"{name} {reason}; {type(self.pipe).__name__} predicts "
                             f"{what.get(len(shape), f'{len(shape)}-D tensors')} of shape {tuple(shape)}")
        if name == "FrequencyDecoupledGuidance":
            self._check_fdg_size(tuple(shape[-2:]))
            self._check_fdg_levels()

    def _check_fdg_size(self, size: tuple[int, int]) -> None:
        """FDG's pyramid (kornia) fails on sides too small for its levels and, on sides that are not a power of two
        or not divisible by ``2 ** (levels - 1)``, pads them, so that the guided prediction comes back larger: refused
        when the pyramid of a zero image of ``size`` fails or does not come back at ``size``."""
        from diffusers.guiders import frequency_decoupled_guidance as fdg

        levels = self.guider.levels
        probe = torch.zeros(1, 1, *size)
        try:
            rebuilt = tuple(fdg.build_image_from_pyramid(fdg.build_laplacian_pyramid_func(probe, levels)).shape[-2:])
            problem = None if rebuilt == size else f"comes back at {rebuilt[0]}x{rebuilt[1]} (kornia pads the sides)"
        except RuntimeError as err:
            problem = f"fails in kornia ({str(err).splitlines()[0]})"
        if problem is not None:
            raise ValueError(f"FrequencyDecoupledGuidance's {levels}-level Laplacian pyramid of the {size[0]}x{size[1]} "
                             f"{type(self.pipe).__name__} latents {problem}; use fewer levels (guidance_scales) or "
                             f"latents whose sides are multiples of 2^(levels - 1) = {2 ** (levels - 1)}, at least "
                             f"{2 ** levels}, one of them a power of two")

    def _check_fdg_levels(self) -> None:
        """diffusers 0.42.1's FDG forward puts, in place of a pyramid level that does not guide (scale 1, or 0 with
        ``use_original_formulation``, or a step outside the level's own start / stop), the conditional band of the
        level before it (a shape error), or fails with UnboundLocalError where it is the first: refused for
        every step of the run where some levels guide and others do not."""
        guider, num_steps = self.guider, len(self.scheduler.timesteps)
        try:
            for step in range(num_steps):
                guider.set_state(step=step, num_inference_steps=num_steps, timestep=None)
                off = [level for level in range(guider.levels) if not guider._is_fdg_enabled_for_level(level)]
                if guider._is_fdg_enabled() and off:
                    raise ValueError(
                        f"FrequencyDecoupledGuidance's levels {off} do not guide at step {step} while the others "
                        "do (scale 1, or 0 with use_original_formulation, or outside their start / stop): diffusers "
                        "0.42.1's forward then uses another level's band in their place (or fails); give every "
                        "level a guiding scale and the same start / stop")
        finally:
            guider.set_state(step=0, num_inference_steps=num_steps, timestep=None)

    def _count_uncond(self, batch: int, batches: list) -> None:
        """``stats.uncond_rows_per_sample``: one row per sample for each guider batch on the unconditional inputs."""
        taken = torch.full((batch,), sum(self._slot(state) == 1 for state in batches), dtype=torch.long)
        counts = self.stats.uncond_rows_per_sample
        self.stats.uncond_rows_per_sample = taken if counts is None or len(counts) != batch else counts + taken

    def _forward_batched(self, net: _Network, args: tuple, kwargs: dict):
        family, name = self.family, type(self.pipe).__name__
        as_list = family.layout == "list_cu"  # per-sample tensors in a list (Z-Image): the list is the batch
        arguments, sample, timestep, full = self._bind_batched(net, args, kwargs)
        if full != self.full:
            raise ValueError(f"{name} changed its batch from {self.full} to {full} rows mid-run; with a diffusers "
                             "guider, turn guidance off by the guider's own start / stop instead")
        self._check_run(sample.squeeze(2).shape if as_list else sample.shape)
        batch = full // 2
        uncond_first = family.layout == "uc"
        cond_rows, uncond_rows = self._cfg_rows(full)
        device = sample.device
        cond = self._select(arguments, cond_rows.to(device), full)
        uncond = self._select(arguments, uncond_rows.to(device), full)
        pairs = _pairs(cond, uncond, arguments, full, family.unbatched, as_list)
        batches, outputs, plain = self._run_batches(net, (cond, uncond), pairs, timestep, batch)
        if plain:  # one call on the plain batches, in the pipeline's own row order
            plain.sort(key=lambda i: self._slot(batches[i]) != (1 if uncond_first else 0))
            values = {key: _cat([getattr(batches[i], key) for i in plain]) for key in pairs}
            merged = self._run(net, _assemble(cond, values))
            for j, i in enumerate(plain):
                outputs[i] = merged[j * batch:(j + 1) * batch]
        shape = outputs[0].shape
        if as_list:  # Z-Image steps on its stacked outputs squeezed of the frame axis: so does the guider
            outputs = [tensor.squeeze(2) for tensor in outputs]
        channels = sample.shape[1]
        guided = self._combine(batches, outputs, channels)
        guided = -guided if family.output_sign < 0 else guided  # back to what the network returns
        base = next(t for state, t in zip(batches, outputs) if self._slot(state) == 0)
        extra = base[:, channels:]
        half = torch.cat([guided, extra], dim=1) if extra.shape[1] else guided
        new = torch.cat([half, half]).reshape(2 * shape[0], *shape[1:])  # the pipeline's CFG of [g; g] is g
        self._end_step()
        return _with_tensor(self._last_out, list(new.unbind(0)) if as_list else new)

    @staticmethod
    def _slot(state) -> int:
        """0 if the guider's batch took the conditional inputs, 1 for the unconditional ones."""
        return int(getattr(state, _SLOT))

    def _run_batches(self, net: _Network, templates: tuple[dict, dict], pairs: dict[str, tuple[Any, Any]],
                     timestep: Any, batch: int) -> tuple[list, list[Tensor | None], list[int]]:
        """The guider's batches for this step; the modified passes evaluated, each inside its
        ``prepare_models`` / ``cleanup_models``; the indices of the plain ones (unmodified network), left to the
        caller to evaluate."""
        guider, module = self.guider, net.module
        t = timestep.flatten()[0] if isinstance(timestep, Tensor) else timestep
        guider.set_state(step=self.index, num_inference_steps=len(self.scheduler.timesteps), timestep=t)
        try:
            batches = guider.prepare_inputs(dict(pairs, **{_SLOT: (torch.tensor(0), torch.tensor(1))}))
        except IndexError:
            extra = [p for p in guider._input_predictions if p not in ("pred_cond", "pred_uncond")]
            raise ValueError(f"{type(guider).__name__} asks for inputs {type(self.pipe).__name__} does not compute: "
                             f"its passes {extra} read input slots beyond (cond, uncond), and the pipeline provides "
                             f"only the cond and uncond values of {', '.join(pairs)}") from None
        self._count_uncond(batch, batches)
        outputs: list[Tensor | None] = [None] * len(batches)
        plain = []
        for i, state in enumerate(batches):
            if templates[self._slot(state)] is None:
                raise ValueError(self._missing_uncond())
            before = _network_state(module)
            self._prepare(module)
            if _network_state(module) == before:
                plain.append(i)  # the unmodified network
            else:
                _fix_block_skip_order(module)
                values = {key: getattr(state, key) for key in pairs}
                outputs[i] = self._run(net, _assemble(templates[self._slot(state)], values))
            guider.cleanup_models(module)
        return batches, outputs, plain

    def _missing_uncond(self) -> str:
        negative = ", ".join(self.family.negative) or "negative_prompt_embeds"
        return (f"{type(self.guider).__name__} needs the unconditional inputs, which {type(self.pipe).__name__} "
                f"did not compute at step {self.index}: pass a negative prompt ({negative})")

    def _combine(self, batches: list, outputs: list[Tensor], channels: int | None) -> Tensor:
        """The guider's combination of the network ``outputs`` (their first ``channels``), in the space the
        scheduler steps on (the outputs negated where the family's ``output_sign`` is -1)."""
        sign = self.family.output_sign
        for state, tensor in zip(batches, outputs):
            pred = tensor if channels is None else tensor[:, :channels]
            pred = -pred if sign < 0 else pred
            state.noise_pred = pred.flatten(2) if self._flattened and pred.ndim > 3 else pred
        shape = (outputs[0] if channels is None else outputs[0][:, :channels]).shape
        guided = self.guider(batches).pred
        if guided.numel() != shape.numel():
            raise ValueError(f"{type(self.guider).__name__} returned a prediction of shape {tuple(guided.shape)} for "
                             f"predictions of shape {tuple(shape)}")
        guided = guided.reshape(shape)
        if not bool(torch.isfinite(guided).all()):
            raise FloatingPointError(f"{type(self.guider).__name__} produced a non-finite prediction at step "
                                     f"{self.index}; check the model's outputs and the guider's scales")
        return guided

    # -- two calls per step (cond, then uncond): the guider's passes run at the unconditional call --------------
    def _forward_two_calls(self, net: _Network, args: tuple, kwargs: dict):
        arguments = net.bind(args, kwargs)
        pending = self.pending
        if pending is None:  # the conditional call opens the step: the plain conditional pass, as the pipeline asks
            self._check_run(arguments[self.family.latent].shape)
            out = net.run(arguments, arguments[self.family.latent].shape[0])
            self.pending = dict(net=net, cond=arguments, cond_out=out)
            return out
        if "uncond" in pending:
            raise RuntimeError(f"{type(self.pipe).__name__} called its network a third time in one step; apply() "
                               "knows two calls per step (cond, uncond)")
        pending["uncond"] = arguments
        self._evaluate_two_calls(pending)
        return pending["cond_out"]  # superseded at scheduler.step by the guider's combination

    def _evaluate_two_calls(self, pending: dict) -> None:
        net, cond, uncond = pending["net"], pending["cond"], pending.get("uncond")
        flat_c: dict[str, Any] = {}
        flat_u: dict[str, Any] = {}
        for name in cond:
            _flatten(cond[name], name, flat_c)
            if uncond is not None:
                _flatten(uncond[name], name, flat_u)
        # each pass runs on its own call's arguments; an input the unconditional call lacks stays out of it
        pairs = {k: (v, flat_u.get(k)) for k, v in flat_c.items()
                 if isinstance(v, Tensor) and (uncond is None or k in flat_u)}
        batches, outputs, plain = self._run_batches(net, (cond, uncond), pairs, cond.get(self.family.timestep),
                                                    cond[self.family.latent].shape[0])
        for i in plain:
            if self._slot(batches[i]) == 0:  # the conditional call already made, on the same inputs
                tensor = _tensor(pending["cond_out"])
                outputs[i] = tensor.float() if self.family.float32 else tensor
            elif uncond is None:
                raise ValueError(self._missing_uncond())
            else:
                outputs[i] = self._run(net, uncond)  # the pipeline's own unconditional call
        pending.update(batches=batches, outputs=outputs)

    def _step_two_calls(self, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs):
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError(f"{type(self.pipe).__name__} stepped its scheduler without a network call")
        if "batches" not in pending:  # the pipeline made no unconditional call this step
            self._evaluate_two_calls(pending)
        guided = self._combine(pending["batches"], pending["outputs"], None).to(model_output.dtype)
        self._end_step()
        return self._orig_step(guided, timestep, sample, *args, **kwargs)

    def _prepare(self, module: torch.nn.Module) -> None:
        """``guider.prepare_models(module)``, counted. ``BaseGuidance.prepare_models`` counts its calls and the
        guiders' ``is_conditional`` reads that count; diffusers 0.42.1's ``SmoothedEnergyGuidance`` overrides it
        without counting, so its perturbed pass would never be perturbed. A guider seen not to count (at its
        first call of the run, where no guider modifies the network) is counted here, before each call."""
        guider = self.guider
        count = guider._count_prepared
        if self._guider_counts is False:
            guider._count_prepared += 1
        guider.prepare_models(module)
        if self._guider_counts is None:
            self._guider_counts = guider._count_prepared != count
            if not self._guider_counts:
                guider._count_prepared += 1

    def _run(self, net: _Network, arguments: dict[str, Any]) -> Tensor:
        """One counted network call; its prediction as one tensor (per-sample list outputs stacked)."""
        rows = len(arguments[self.family.latent])
        self._last_out = out = net.run(arguments, rows)
        tensor = _tensor(out)
        tensor = torch.stack(list(tensor)) if isinstance(tensor, list) else tensor
        return tensor.float() if self.family.float32 else tensor
