"""Where diffusers 0.42.1's guiders do not do what they are written for, and what ``apply`` does about it.

``SmoothedEnergyGuidance.prepare_models`` does not count its calls (:func:`prepare_counted`), the block-skip hook
returns the two streams of SD3's blocks swapped (:func:`fix_block_skip_order`), and ``MagnitudeAwareGuidance``
fails on predictions of more than three dimensions (:data:`FLATTENED`): corrected. ``FrequencyDecoupledGuidance``
builds Laplacian pyramids of images: refused (:func:`check_predictions`) on pipelines whose predictions are not
``(batch, channels, height, width)`` (:data:`IMAGE_ONLY`), where some of its levels would guide at a step and
others not, which its forward mishandles (:func:`check_fdg_levels`), and on latents its pyramid cannot decompose
and rebuild at their size (:func:`check_fdg_size`).
"""

from __future__ import annotations

import functools

import torch

# diffusers 0.42.1's ``mambo_guidance`` takes ``torch.norm(x, dim=[1, ..., ndim - 1])`` with the default
# ``p="fro"``; torch computes that as a vector 2-norm for at most two dims only and hands three or more to
# ``linalg.matrix_norm``, which raises "dim must be a 2-tuple": every 4-D (B, C, H, W) or 5-D prediction fails.
# The norm it means, over all of a sample, is the same over (B, C, H * W ...): those guiders get their predictions
# flattened to three dims, and their combination (elementwise but for that norm) is reshaped back, exactly.
FLATTENED = ("MagnitudeAwareGuidance",)
# guiders whose combination is defined on (B, C, H, W) images only, with the reason
IMAGE_ONLY = {"FrequencyDecoupledGuidance": "builds Laplacian pyramids (kornia) of (batch, channels, height, width) "
                                            "predictions"}


def check_predictions(guider, shape: tuple[int, ...], num_steps: int, pipe_name: str) -> None:
    """At the first network call of a run, before the network runs: refuse a guider whose combination is
    undefined on predictions of ``shape``, or would fail at some step of the run."""
    name = type(guider).__name__
    reason = IMAGE_ONLY.get(name)
    if reason is not None and len(shape) != 4:
        what = {3: "a packed token sequence", 5: "video latents (batch, channels, frames, height, width)"}
        raise ValueError(f"{name} {reason}; {pipe_name} predicts "
                         f"{what.get(len(shape), f'{len(shape)}-D tensors')} of shape {tuple(shape)}")
    if name == "FrequencyDecoupledGuidance":
        check_fdg_size(guider, tuple(shape[-2:]), pipe_name)
        check_fdg_levels(guider, num_steps)


def check_fdg_size(guider, size: tuple[int, int], pipe_name: str) -> None:
    """FDG's pyramid (kornia) fails on sides too small for its levels and, on sides that are not a power of two
    or not divisible by ``2 ** (levels - 1)``, pads them, so that the guided prediction comes back larger: refused
    when the pyramid of a zero image of ``size`` fails or does not come back at ``size``."""
    from diffusers.guiders import frequency_decoupled_guidance as fdg

    levels = guider.levels
    probe = torch.zeros(1, 1, *size)
    try:
        rebuilt = tuple(fdg.build_image_from_pyramid(fdg.build_laplacian_pyramid_func(probe, levels)).shape[-2:])
        problem = None if rebuilt == size else f"comes back at {rebuilt[0]}x{rebuilt[1]} (kornia pads the sides)"
    except RuntimeError as err:
        problem = f"fails in kornia ({str(err).splitlines()[0]})"
    if problem is not None:
        raise ValueError(f"FrequencyDecoupledGuidance's {levels}-level Laplacian pyramid of the {size[0]}x{size[1]} "
                         f"{pipe_name} latents {problem}; use fewer levels (guidance_scales) or "
                         f"latents whose sides are multiples of 2^(levels - 1) = {2 ** (levels - 1)}, at least "
                         f"{2 ** levels}, one of them a power of two")


def check_fdg_levels(guider, num_steps: int) -> None:
    """diffusers 0.42.1's FDG forward puts, in place of a pyramid level that does not guide (scale 1, or 0 with
    ``use_original_formulation``, or a step outside the level's own start / stop), the conditional band of the
    level before it (a shape error), or fails with UnboundLocalError where it is the first: refused for
    every step of the run where some levels guide and others do not."""
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


def fix_block_skip_order(module: torch.nn.Module) -> None:
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


def prepare_counted(guider, module: torch.nn.Module, counts: bool | None) -> bool:
    """``guider.prepare_models(module)``, counted; returns whether the guider counts its own calls (``counts``:
    what an earlier call of the run found, None at its first). ``BaseGuidance.prepare_models`` counts its calls and
    the guiders' ``is_conditional`` reads that count; diffusers 0.42.1's ``SmoothedEnergyGuidance`` overrides it
    without counting, so its perturbed pass would never be perturbed. A guider seen not to count (at its first call
    of the run, where no guider modifies the network) is counted here, before each call."""
    count = guider._count_prepared
    if counts is False:
        guider._count_prepared += 1
    guider.prepare_models(module)
    if counts is None:
        counts = guider._count_prepared != count
        if not counts:
            guider._count_prepared += 1
    return counts
