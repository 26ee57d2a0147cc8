"""What an ``apply`` session combines with: a *combiner* decides, at each step the layout hands it, which rows to
evaluate and how to combine them. :class:`GuideCombiner` runs a diffguide guide (the rows it asks for, then
``guide.combine(step)``); :class:`~.guider_apply.GuiderCombiner` a diffusers guider.

A combiner implements ``batched`` (one :class:`~.layouts.CfgBatch` per step: returns the network output handed
back) and, for two-call layouts, ``cond_call`` / ``uncond_call`` (the network side of a
:class:`~.records.PendingStep`) and ``close`` (the scheduler side: steps the scheduler).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import BLOWUP_RATIO, Level, norm_ratio

from .base import Guidance, Guided, Step, guided_checked
from .layouts import CfgBatch
from .network import Branch, Network, prediction_of, with_prediction
from .records import PendingStep
from .scheduler_step import renoise_step


class StepPasses:
    """``step.cond``, ``step.uncond`` and ``step.evaluate`` of one step under apply, on the conditional ``rows`` of
    the call's ``arguments`` (all of them when ``full`` is None).

    ``cond`` holds the conditional rows' class labels or text embeddings, as ``diffusers_model_fn`` takes them;
    ``uncond`` is a :class:`~.network.Branch` (the unconditional rows' arguments); ``evaluate(x, cond, level=None)``
    is one more counted network pass on the conditional rows' inputs, with ``x`` and the condition replaced (e.g.
    GFCG's reference class; a ``Branch`` replaces every argument), at the step's level or, on flow pipelines, at
    another ``Level`` (``x = alpha x0 + sigma eps`` in that level's scale; the time moved as ``Family.time_at``).
    """

    def __init__(self, session, net: Network, arguments: dict, rows: Tensor, full: int | None, level: Level,
                 uncond_arguments, width: int | None = None) -> None:
        layout, family = session.layout, session.family
        self.session, self.net, self.level, self.layout = session, net, level, layout
        repeats = layout.repeats(arguments)
        self.select = ((lambda v, name=None: v) if full is None else
                       (lambda v, name=None: layout.select_value(v, rows, full, name, repeats)))
        # the family's condition where the call carries one (IF super-resolution and SD upscale pass their noise
        # level as class_labels), else the class labels (DiT; AudioLDM's projected text embedding)
        by_label = arguments.get(family.condition) is None and arguments.get("class_labels") is not None
        self.key = "class_labels" if by_label else family.condition
        cond = self.select(arguments.get(self.key), self.key)
        if arguments.get("added_cond_kwargs") is not None:
            cond = {self.key: cond, "added_cond_kwargs": self.select(arguments["added_cond_kwargs"])}
        self.cond = cond
        self.base = Branch(lambda: {name: self.select(value, name) for name, value in arguments.items()})
        sample = arguments[family.latent]
        shape = list(sample[0].shape if layout.lists else sample.shape[1:])
        if family.conditioning is not None and width is not None:  # the stepped latent, conditioning cut off
            shape[family.conditioning_dim - 1] = width
        self.width = width
        self.shape = (len(rows), *shape)
        self.dtype = sample[0].dtype if layout.lists else sample.dtype
        self.uncond = None if uncond_arguments is None else Branch(uncond_arguments)

    def evaluate(self, x: Tensor, new_cond: Any, new_level: Level | None = None) -> Tensor:
        session, family, layout, net = self.session, self.session.family, self.layout, self.net
        if tuple(x.shape) != self.shape:
            raise ValueError(f"step.evaluate takes x of the step's shape {self.shape}, got {tuple(x.shape)}")
        if isinstance(new_cond, Branch):
            call = dict(new_cond.arguments)
        else:
            replace = new_cond if isinstance(new_cond, dict) else {self.key: new_cond}
            unknown = set(replace) - set(net.signature.parameters)
            if unknown:
                raise ValueError(f"{type(net.module).__name__}.forward takes no {sorted(unknown)}")
            call = dict(self.base.arguments, **replace)
        carried = [name for name in family.residuals if call.get(name) is not None]
        if carried:
            raise ValueError(f"{session.pipe_name} passes ControlNet residuals ({', '.join(carried)}) computed for "
                             "the step's own latent, level and condition; an extra pass (another x, level or "
                             "condition) would reuse them wrongly, so apply() refuses it. Use a guide that takes no "
                             "extra pass (CFG, APG, CFG++, CFG-Zero*, AG, interval)")
        if new_level is not None:
            if family.scheduler != "flow" or family.flow_time is None:
                raise ValueError(f"step.evaluate at another level is not available on {session.pipe_name}")
            x = x / (new_level.alpha + new_level.sigma).to(x)  # to the pipeline's flow scale (1 - s) x0 + s eps
            t_in = call[family.timestep]
            level_of = family.level_of_time
            call[family.timestep] = family.time_at(t_in, level_of(self.level.t.to(torch.float64)),
                                                   level_of(torch.as_tensor(new_level.t).to(torch.float64))
                                                   ).to(t_in.dtype)
        x = x.to(self.dtype)
        if family.conditioning is not None:  # the step's conditioning channels / tokens re-appended
            x_in = layout.with_conditioning(x, layout.conditioning_part(call[family.latent], self.width))
        else:
            x_in = x
        out = net.run(dict(call, **{family.latent: list(x_in.unbind(0)) if layout.lists else x_in}), x.shape[0])
        pred = layout.latent_part(layout.prediction(out), x.shape[family.conditioning_dim])
        return layout.to_guide(pred[:, : x.shape[1]])


class GuideCombiner:
    """A diffguide guide as an ``apply`` combiner: evaluates only the unconditional rows ``guide.needs_uncond``
    asks for, builds the :class:`~.base.Step` and lets the guide combine; renoises through the scheduler where the
    guide's renoise prediction differs (CFG++)."""

    def __init__(self, guide: Guidance) -> None:
        self.guide = guide
        self.changes_renoise = guide.changes_renoise
        self.blowup_warned = False

    def reset(self) -> None:
        self.guide.reset()
        self.blowup_warned = False

    def _mask(self, session, level: Level, batch: int) -> Tensor:
        mask = self.guide.needs_uncond(level, batch).to(torch.bool).cpu()
        counts = session.stats.uncond_rows_per_sample
        session.stats.uncond_rows_per_sample = mask.long() if counts is None or len(counts) != batch else counts + mask
        return mask

    def _combine(self, session, x: Tensor, level: Level, pred_cond: Tensor, pred_uncond: Tensor, mask: Tensor,
                 passes: StepPasses, pred_image: Tensor | None = None) -> Guided:
        """The guide's prediction (finite, or ``FloatingPointError``); warns once per run when its norm is more
        than ``BLOWUP_RATIO`` times the conditional prediction's (a scale far too large: the images are noise)."""
        step = Step.at(level, x, pred_cond, pred_uncond, session.prediction_type, uncond_mask=mask.to(x.device),
                       cond=passes.cond, evaluate=passes.evaluate, uncond=passes.uncond,
                       next_level=session.next_level(level), family=session.family,
                       pred_image=pred_image)
        guided = guided_checked(self.guide, step)
        if not self.blowup_warned:
            ratio = norm_ratio(guided.denoise, step.pred_cond)
            if ratio > BLOWUP_RATIO:
                self.blowup_warned = True
                warnings.warn(f"{self.guide!r}: at step {step.index + 1} of {step.num_steps} the guided prediction's "
                              f"norm is {ratio:.3g}x the conditional one's (more than {BLOWUP_RATIO:g}x): the images "
                              "will be noise; lower the scale", stacklevel=2)
        return guided

    # -- one batched call per step ------------------------------------------------------------------------------
    def batched(self, session, net: Network, call: CfgBatch) -> Any:
        layout, arguments, sample, full = session.layout, call.arguments, call.sample, call.full
        if full != session.full:  # the pipeline stopped batching CFG (a callback such as SDCFGCutoffCallback)
            if layout.branches * full != session.full:
                raise ValueError(f"{session.pipe_name} changed its batch from {session.full} to {full} rows "
                                 "mid-run; apply() follows a callback that turns CFG off, nothing else")
            session.stats.cond_only_steps += 1
            session.pending = None
            out = net.run(arguments, full)
            session.end_step()
            return out
        batch, device = full // layout.branches, sample.device
        cond_rows, uncond_rows = layout.cfg_rows(full)
        image_rows = layout.image_rows(full)
        level = session.level(call.timestep, device, sample.dtype)
        mask = self._mask(session, level, batch)
        picked = uncond_rows[mask]
        n_u, n_i = len(picked), len(image_rows)
        # rows in the call's own order ([uncond; cond], or [cond; image; uncond]): all of them is the call itself
        order = [cond_rows, image_rows, picked] if layout.uncond_last else [picked, cond_rows]
        out = layout.run_rows(net, arguments, torch.cat(order).to(device), full)
        tensor = layout.prediction(out)
        width = layout.width(tensor, sample)
        sample = layout.latent_part(sample, width)  # the latent the scheduler steps (conditioning channels cut)
        pred_all, _ = layout.split(layout.to_guide(tensor), sample)
        first_cond = 0 if layout.uncond_last else n_u
        first_uncond = batch + n_i if layout.uncond_last else 0
        pred_cond = pred_all[first_cond: first_cond + batch]
        pred_image = pred_all[batch: batch + n_i] if n_i else None
        if n_u == batch:
            pred_uncond = pred_all[first_uncond: first_uncond + n_u]
        else:
            pred_uncond = pred_cond.clone()
            pred_uncond[mask.to(device)] = pred_all[first_uncond: first_uncond + n_u]
        passes = StepPasses(session, net, arguments, cond_rows.to(device), full, level,
                            lambda: layout.select(arguments, uncond_rows.to(device), full), width)
        guided = self._combine(session, sample[cond_rows.to(device)], level, pred_cond, pred_uncond, mask, passes,
                               pred_image)
        session.pending = PendingStep(net=net, arguments=arguments, cond_out=out, level=level, mask=mask,
                                      renoise=guided.renoise)
        cond_tensor = tensor[first_cond: first_cond + batch]
        output = layout.output(out, guided.denoise, layout.split(cond_tensor, sample)[1])
        session.end_step()
        return output

    # -- two calls per step ---------------------------------------------------------------------------------------
    def cond_call(self, session, pending: PendingStep) -> Any:
        sample = pending.arguments[session.family.latent]
        pending.level = session.level(pending.arguments.get(session.family.timestep), sample.device, sample.dtype)
        pending.cond_out = pending.net.run(pending.arguments, sample.shape[0])
        pending.mask = self._mask(session, pending.level, sample.shape[0])
        return pending.cond_out

    def uncond_call(self, session, pending: PendingStep) -> Any:
        mask, net, arguments = pending.mask, pending.net, pending.uncond_arguments
        full = arguments[session.family.latent].shape[0]
        if not bool(mask.any()):  # the guide does not need it: the call is skipped, not evaluated
            return pending.cond_out
        if bool(mask.all()):
            pending.uncond_out = net.run(arguments, full)
            return pending.uncond_out
        rows = torch.nonzero(mask).flatten().to(arguments[session.family.latent].device)  # only the rows asked for
        part = prediction_of(net.run(session.layout.select(arguments, rows, full), len(rows)))
        merged = prediction_of(pending.cond_out).clone()  # unevaluated rows carry the conditional prediction
        merged[rows] = part
        pending.uncond_out = with_prediction(pending.cond_out, merged)
        return pending.uncond_out

    def close(self, session, pending: PendingStep, model_output: Tensor, timestep: Any, sample: Tensor, *args,
              **kwargs):
        layout, mask = session.layout, pending.mask
        if not pending.uncond_called:  # the pipeline ran no unconditional branch this step
            if bool(mask.any()) and session.index == 0:
                raise ValueError(f"{session.pipe_name} evaluated no unconditional branch: pass a negative "
                                 f"prompt ({', '.join(session.family.negative) or 'negative_prompt_embeds'})")
            session.stats.cond_only_steps += 1  # a callback turned CFG off mid-run: continue conditional-only
            session.end_step()
            return session.orig_step(model_output, timestep, sample, *args, **kwargs)
        width = sample.shape[session.family.conditioning_dim]  # outputs cut to the stepped latent's tokens
        pred_cond = layout.to_guide(layout.latent_part(layout.prediction(pending.cond_out), width))
        if pending.uncond_out is None:
            pred_uncond = pred_cond.clone()
        else:
            pred_uncond = layout.to_guide(layout.latent_part(layout.prediction(pending.uncond_out), width))
        level, uncond_arguments = pending.level, pending.uncond_arguments
        passes = StepPasses(session, pending.net, pending.arguments, torch.arange(pred_cond.shape[0],
                            device=sample.device), None, level, lambda: uncond_arguments, width)
        guided = self._combine(session, sample, level, pred_cond, pred_uncond, mask, passes)
        session.end_step()
        if self.changes_renoise:
            return renoise_step(session.scheduler, session.orig_step, guided.denoise, guided.renoise, timestep,
                                sample, session.prediction_type, session.step_state, *args, **kwargs)
        return session.orig_step(guided.denoise, timestep, sample, *args, **kwargs)
