"""Pipeline families as data: how each diffusers pipeline runs classifier-free guidance.

``apply`` reads one :class:`Family` per pipeline class; its control flow is written once per CFG layout, one class
each in :mod:`.layouts` (``Family.layout`` names it). Adding a pipeline is adding an entry here and a test; the
facts come from the pipeline's ``__call__`` in diffusers 0.42.1 (see ``docs``/README "Supported pipelines").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .layouts import LAYOUTS


@dataclass(frozen=True)
class Family:
    """One family of pipelines that run CFG the same way.

    ``layout``: the name of its CFG layout object in :mod:`.layouts` (``"uc"``, ``"cu"``, ``"list_cu"``,
    ``"two_calls"``; ``LAYOUTS``).
    ``networks``: pipeline attributes holding the denoising network(s) (Wan 2.2 has two).
    ``latent`` / ``timestep``: names of the network ``forward`` parameters that take the latent and the time
    (positional or keyword alike: calls are bound to the forward's signature).
    ``scale_arg``: the ``__call__`` argument that switches CFG on (``> cfg_threshold``), forced on under apply.
    ``negative``: call arguments of which one must be given for the pipeline to run CFG at all (Flux, Qwen);
    when none is, apply passes ``negative_prompt=""`` (the empty prompt, as those pipelines document).
    ``neutral``: call arguments that must keep their neutral value under apply, with the guide that does the
    same job (``guidance_rescale`` -> CFGRescale).
    ``output_sign``: -1 where the pipeline steps on ``-network_output`` (Lumina 2, Z-Image): guides see the
    flow velocity ``eps - x0`` either way.
    ``float32``: the pipeline combines ``.float()`` copies of the network outputs (Sana, Z-Image).
    ``unbatched``: network arguments that are not per-row even if their first dimension matches the batch.
    ``scheduler``: "flow" (rectified flow, velocity output) or "diffusion" (epsilon / v / x0 schedules).
    ``condition``: the network argument holding the text embeddings (``step.cond`` under apply).
    ``flow_time``: how a flow network's time argument follows the flow level ``s``, for extra passes at another
    level (Rectified-CFG++): "proportional" (``1000 s``, ``s``, ``1000 s * timestep_scale``), "one_minus" (``1 - s``:
    Lumina 2, Z-Image), or None where it is no function of ``s`` apply knows (CogView4 feeds unshifted timesteps).
    ``zero_init_steps``: CFG-Zero*'s default number of zero-initialised first steps on this family, the official
    demo's ``zero_steps + 1`` (WeichenFan/CFG-Zero-star: SD3 1, Wan 2.1 T2V and CogView4 2); 1 where there is none.
    ``native``: the guide expression that reproduces the pipeline's own CFG at scale ``s`` (docs and tests);
    ``native_exact`` False where it does so only to rounding: Z-Image computes ``c + s (c - u)``, which is
    ``CFG(s + 1)`` but not CFG's floating-point expression ``u + w (c - u)``.
    """

    pipelines: tuple[str, ...]
    layout: str
    scheduler: str
    networks: tuple[str, ...] = ("transformer",)
    latent: str = "hidden_states"
    timestep: str = "timestep"
    scale_arg: str = "guidance_scale"
    cfg_threshold: float = 1.0
    negative: tuple[str, ...] = ()
    neutral: dict[str, tuple[Any, str]] = field(default_factory=dict)
    output_sign: int = 1
    float32: bool = False
    unbatched: tuple[str, ...] = ()
    condition: str = "encoder_hidden_states"
    flow_time: str | None = "proportional"
    zero_init_steps: int = 1
    native: str = "CFG(s)"
    native_exact: bool = True

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {self.layout!r}")
        if self.scheduler not in ("flow", "diffusion"):
            raise ValueError(f"scheduler must be 'flow' or 'diffusion', got {self.scheduler!r}")
        if self.flow_time not in ("proportional", "one_minus", None):
            raise ValueError(f"flow_time must be 'proportional', 'one_minus' or None, got {self.flow_time!r}")
        steps = self.zero_init_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {self.zero_init_steps!r}")

    def time_at(self, t: Tensor, s: float | Tensor, s_new: float | Tensor) -> Tensor:
        """The network time at flow level ``s_new`` of the network time ``t`` at level ``s`` (``flow_time``:
        scaled where the time is proportional to ``s``, shifted where it is ``1 - s``)."""
        return t * (s_new / s) if self.flow_time == "proportional" else t + (s - s_new)

    def level_of_time(self, t: Tensor) -> Tensor:
        """The flow level of network time ``t``, up to the network's own factor (``flow_time``)."""
        return t if self.flow_time == "proportional" else 1 - t


_RESCALE = {"guidance_rescale": (0.0, "use guidance.CFGRescale")}

FAMILIES: tuple[Family, ...] = (
    Family(("StableDiffusionPipeline", "StableDiffusionXLPipeline"), "uc", "diffusion", networks=("unet",),
           latent="sample", neutral=_RESCALE),
    Family(("ClassConditionalPipeline",), "uc", "diffusion", networks=("unet",), latent="sample"),
    Family(("DiTPipeline",), "cu", "diffusion"),
    Family(("StableDiffusion3Pipeline",), "uc", "flow",
           neutral={"skip_guidance_layers": (None, "skip-layer guidance is a third network call apply does not "
                                                   "replace")}),
    Family(("SanaPipeline",), "uc", "flow", float32=True),
    Family(("PixArtSigmaPipeline",), "uc", "diffusion"),
    Family(("HunyuanDiTPipeline",), "uc", "diffusion", neutral=_RESCALE, unbatched=("image_rotary_emb",)),
    Family(("FluxPipeline",), "two_calls", "flow", scale_arg="true_cfg_scale",
           negative=("negative_prompt", "negative_prompt_embeds")),
    Family(("QwenImagePipeline",), "two_calls", "flow", scale_arg="true_cfg_scale",
           negative=("negative_prompt", "negative_prompt_embeds"), native="NormRescale(CFG(s))"),
    Family(("WanPipeline",), "two_calls", "flow", networks=("transformer", "transformer_2"), zero_init_steps=2),
    Family(("CogView4Pipeline",), "two_calls", "flow", flow_time=None, zero_init_steps=2),
    Family(("ZImagePipeline",), "list_cu", "flow", latent="x", timestep="t", scale_arg="guidance_scale",
           cfg_threshold=0.0, output_sign=-1, float32=True, condition="cap_feats", flow_time="one_minus",
           native="CFG(s + 1)", native_exact=False,
           neutral={"cfg_normalization": (False, "its norm clamp is not a guide yet"),
                    "cfg_truncation": (1.0, "use a guide that skips the unconditional branch, e.g. "
                                            "guidance.GuidanceInterval")}),
    Family(("Lumina2Pipeline",), "two_calls", "flow", output_sign=-1, flow_time="one_minus",
           native="NormRescale(CFG(s))",
           neutral={"cfg_trunc_ratio": (1.0, "use a guide that skips the unconditional branch, e.g. "
                                             "guidance.GuidanceInterval")}),
)

# The guidance-distilled pipelines of this generation never evaluate an unconditional branch.
DISTILLED = {"Flux2Pipeline": "is guidance-distilled (no unconditional branch)",
             "FluxKontextPipeline": "is guidance-distilled unless given a negative prompt; not yet covered"}


def supported_pipelines() -> list[str]:
    return [name for family in FAMILIES for name in family.pipelines]


def other_level_pipelines() -> list[str]:
    """Pipelines on which apply runs extra passes at another noise level (flow, with a known ``flow_time``)."""
    return [name for family in FAMILIES if family.scheduler == "flow" and family.flow_time is not None
            for name in family.pipelines]


def family_of(pipe: Any) -> Family:
    """The family of the class whose ``__call__`` ``pipe`` runs (listed by name); TypeError otherwise."""
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None:
        raise TypeError(f"{name} has a guidance-distilled unet (time_cond_proj_dim set): it never runs CFG batches")
    # the class whose __call__ the pipeline runs: a subclass that keeps its parent's __call__ (e.g. diffusers'
    # Lumina2Text2ImgPipeline alias) is served as that parent; one that overrides it is not
    owner = next((cls for cls in type(pipe).__mro__ if "__call__" in vars(cls)), type(pipe))
    for family in FAMILIES:
        if owner.__name__ in family.pipelines:
            _check_networks(pipe, family, name)
            return family
    reason = DISTILLED.get(name)
    listed = [cls.__name__ for cls in type(pipe).__mro__[1:] if cls.__name__ in supported_pipelines()]
    if reason is None and listed:
        reason = f"overrides the __call__ of {listed[0]}, so its CFG is not the one the table describes"
    if reason is None:
        call = getattr(type(pipe), "__call__", None)
        takes_scale = callable(call) and "guidance_scale" in inspect.signature(call).parameters
        reason = ("runs CFG in a way no table entry describes" if takes_scale else
                  "does not batch classifier-free guidance (its __call__ takes no guidance_scale)")
    raise TypeError(f"apply() supports {', '.join(supported_pipelines())}; got {name}, which {reason}")


def _check_networks(pipe: Any, family: Family, name: str) -> None:
    primary = getattr(pipe, family.networks[0], None)
    if primary is None or not hasattr(pipe, "scheduler"):
        raise TypeError(f"{name} has no {family.networks[0]} or scheduler for apply() to hook")


def native_guide(family: Family, scale: float):
    """The guide that reproduces ``family``'s own CFG at scale ``scale`` (``Family.native``)."""
    from .cfg import CFG
    from .norm_rescale import NormRescale

    return {"CFG(s)": lambda: CFG(scale), "NormRescale(CFG(s))": lambda: NormRescale(CFG(scale)),
            "CFG(s + 1)": lambda: CFG(scale + 1)}[family.native]()
