"""Cache of real-image statistics (FID sums, KID features), one safetensors file per dataset and extractor.

Computing the real side once and loading it for every evaluation is what ``reset_real_features=False``
is for. Under ``torch.distributed`` only rank 0 holds the loaded statistics, because torchmetrics sums
states over ranks when it computes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .distribution import FID, KID

DEFAULT_CACHE = Path(os.environ.get("DIFFGUIDE_CACHE", Path.home() / ".cache" / "diffguide")) / "real_stats"


def real_stats_file(dataset: str, extractor: str, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Where the statistics of ``dataset`` under extractor ``extractor`` (see ``extractor_id``) live."""
    for name, value in (("dataset", dataset), ("extractor", extractor)):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(f"{name} must use letters, digits, '.', '_' or '-' only, got {value!r}")
    return Path(cache_dir) / f"{dataset}__{extractor}.safetensors"


def save_real_stats(path: str | Path, fid: FID | None = None, kid: KID | None = None,
                    metadata: dict | None = None) -> Path:
    """Write the real side of ``fid`` and/or ``kid`` to ``path`` (atomically), with the real image size."""
    if fid is None and kid is None:
        raise ValueError("pass fid= and/or kid= to save their real statistics")
    tensors = {}
    if fid is not None:
        if int(fid.real_features_num_samples) < 2:
            raise ValueError("fid has no real statistics to save")
        tensors.update(fid_sum=fid.real_features_sum, fid_cov_sum=fid.real_features_cov_sum,
                       fid_num=fid.real_features_num_samples.reshape(1))
    if kid is not None:
        if not kid.real_features:
            raise ValueError("kid has no real features to save")
        tensors["kid_features"] = torch.cat(kid.real_features)
    sizes = {metric.real_size for metric in (fid, kid) if metric is not None and metric.real_size is not None}
    if len(sizes) > 1:
        raise ValueError(f"fid and kid saw real images of different sizes {sorted(sizes)}; use one size")
    if sizes:
        tensors["real_size"] = torch.tensor(sizes.pop(), dtype=torch.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"json": json.dumps(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _holds_real() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_real_stats(path: str | Path, fid: FID | None = None, kid: KID | None = None) -> dict:
    """Load cached real statistics into ``fid`` / ``kid`` (rank 0 only when distributed); returns the metadata.

    The real image size stored with them is restored on every rank, so generated images of another size
    are refused as after updating with the real images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no real statistics at {path}: compute them first (update the metrics with "
                                "real images and save_real_stats), or pass the real images instead")
    tensors = load_file(path)
    missing = [key for key, needed in (("fid_sum", fid), ("kid_features", kid)) if needed is not None
               and key not in tensors]
    if missing:
        raise ValueError(f"{path} does not hold {', '.join(missing)}; recompute it with the metrics you need")
    dim = tensors.get("fid_sum", tensors.get("kid_features", torch.zeros(0, 0)).T).shape[0]
    for metric in (fid, kid):
        if metric is not None:
            expected = int(metric.inception.num_features)
            if dim != expected:
                raise ValueError(f"{path} holds {dim}-d features, the metric's extractor gives {expected}")
    size = tuple(int(n) for n in tensors["real_size"]) if "real_size" in tensors else None
    for metric in (fid, kid):
        if metric is not None:
            metric.real_size = size
    if _holds_real():
        if fid is not None:
            device = fid.real_features_sum.device
            fid.real_features_sum = tensors["fid_sum"].to(device)
            fid.real_features_cov_sum = tensors["fid_cov_sum"].to(device)
            fid.real_features_num_samples = tensors["fid_num"].reshape(()).to(device)
        if kid is not None:
            kid.real_features = [tensors["kid_features"].to(kid.device)]
    from safetensors import safe_open
    with safe_open(path, "pt") as handle:
        return json.loads((handle.metadata() or {}).get("json", "{}"))
