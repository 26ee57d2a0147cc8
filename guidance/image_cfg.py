"""InstructPix2Pix's classifier-free guidance over two conditions, text and image (Brooks, Holynski & Efros,
CVPR 2023, Eq. 3): ``e_u + s_T (e_TI - e_I) + s_I (e_I - e_u)``."""

from __future__ import annotations

from .base import Guidance, Guided, Step, check_scale, require_uncond


class ImageCFG(Guidance):
    """Two-condition CFG on a three-branch pipeline's predictions: ``pred_cond`` (text and image),
    ``step.pred_image`` (image only) and ``pred_uncond`` (neither).

    ``text_scale`` / ``image_scale`` are diffusers' ``guidance_scale`` / ``image_guidance_scale``; the expression is
    the pipeline's own, so ``apply(pipe, ImageCFG(s, s_i))`` reproduces ``pipe(guidance_scale=s,
    image_guidance_scale=s_i)`` bit for bit (``StableDiffusionInstructPix2PixPipeline`` and its SDXL twin).
    """

    def __init__(self, text_scale: float = 7.5, image_scale: float = 1.5) -> None:
        self.text_scale = check_scale("text_scale", text_scale)
        self.image_scale = check_scale("image_scale", image_scale)

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "ImageCFG")
        image = step.pred_image
        if image is None:
            raise ValueError("ImageCFG needs the image-only branch of a three-branch pipeline (InstructPix2Pix "
                             "under guidance.apply); this step has none")
        pred = uncond + self.text_scale * (step.pred_cond - image) + self.image_scale * (image - uncond)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"ImageCFG(text_scale={self.text_scale}, image_scale={self.image_scale})"
