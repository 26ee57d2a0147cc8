"""Image-generation metrics on torchmetrics and open_clip; every metric takes float images in [0, 1].

- distribution: :class:`FID`, :class:`KID` with :class:`DigitFeatures` (offline "FID-digits") or
  :class:`InceptionFeatures`; real statistics cached with :func:`save_real_stats` / :func:`load_real_stats`.
- text alignment: :class:`CLIPScore` on any open_clip model (:func:`load_open_clip`).
- class-conditional: :class:`ClassifierAccuracy`.
- against a reference: :class:`PSNR`, :class:`SSIM`, :class:`LPIPS`.
- :class:`ImageMetrics` builds any of them by name and feeds them one batch at a time.
"""

from .accuracy import ClassifierAccuracy
from .clip_score import CLIPScore, OpenCLIPModel, OpenCLIPProcessor, load_open_clip
from .distribution import FID, KID
from .features import DigitFeatures, InceptionFeatures, MissingWeightsError, extractor_id, weights_fingerprint
from .images import check_images, to_rgb, to_uint8
from .real_stats import DEFAULT_CACHE, load_real_stats, real_stats_file, save_real_stats
from .reference import LPIPS, PSNR, SSIM
from .suite import METRICS, ImageMetrics

__all__ = [
    "CLIPScore", "ClassifierAccuracy", "DEFAULT_CACHE", "DigitFeatures", "FID", "ImageMetrics", "InceptionFeatures",
    "KID", "LPIPS", "METRICS", "MissingWeightsError", "OpenCLIPModel", "OpenCLIPProcessor", "PSNR", "SSIM", "check_images",
    "extractor_id", "load_open_clip", "load_real_stats", "real_stats_file", "save_real_stats", "to_rgb",
    "to_uint8", "weights_fingerprint",
]
