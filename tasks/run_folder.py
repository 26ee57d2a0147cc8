"""A resumable output folder for one sampling run: a stored configuration, one PNG per image index.

Image ``i`` is written as ``images/{i:06d}.png`` by an atomic rename, with the hash of the configuration that
made it and the network rows it took in PNG text chunks, so a killed run leaves only complete images and
every image says which configuration it belongs to. The folder's identity is the configuration hash, stored
in ``config.json`` *and* in every image: a folder whose ``config.json`` is lost is still recognised (and
refused for another configuration), and an image of another configuration is refused by name. Restarting
with the same configuration decodes every image, re-samples the damaged (truncated, unreadable) ones and
samples exactly the missing indices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

IMAGE_NAME = re.compile(r"^(\d{6})\.png$")
TEMP_PREFIX = ".partial-"
ROWS_KEY = "diffguide:network_rows"
CONFIG_KEY = "diffguide:config"


def image_seed(base_seed: int, index: int) -> int:
    """Generator seed of image ``index``: a 63-bit hash of ``(base_seed, index)``, independent of batching."""
    digest = hashlib.sha256(f"diffguide:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The file gets the permissions of a plain ``open``, 0o666 less the umask (``mkstemp`` makes it 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def to_pil(image: Tensor, name: str = "image") -> Image.Image:
    """``(C, H, W)`` float in [0, 1] -> 8-bit gray (C=1) or RGB (C=3) PIL image; NaN or inf is refused."""
    image = image.detach().float()
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} holds NaN or inf values (the sampler diverged); only finite images can be "
                         "saved: lower the guidance scale or check the model")
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def load_image(path: str | Path) -> Tensor:
    """A PNG/JPEG file -> ``(C, H, W)`` float in [0, 1]; gray stays 1 channel, everything else becomes RGB.

    A missing, truncated or unreadable file is a ``ValueError`` naming it.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("L") if image.mode in ("L", "I;16", "1") else image.convert("RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as err:           # PIL: truncated / not an image / bad chunk
        raise ValueError(f"cannot read image {path}: {err}") from None
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def image_config(path: str | Path) -> str | None:
    """Decode the PNG at ``path`` completely and return the configuration hash stored in it (``None``: none).

    ``ValueError`` naming the file if it is truncated or unreadable.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.info.get(CONFIG_KEY)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


class RunFolder:
    """Folder of one run: ``config.json``, ``images/000000.png ...``, and JSON side files."""

    def __init__(self, root: str | Path, config: dict[str, Any]) -> None:
        self.root = Path(root)
        self.config = config
        self.hash = config_hash(config)
        self.images = self.root / "images"

    def check(self) -> bool:
        """True if ``config.json`` holds this configuration, False if it is absent; ValueError for another one."""
        path = self.root / "config.json"
        if not path.exists():
            return False
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is unreadable ({err}); restore it or delete the folder") from None
        if not isinstance(stored, dict) or stored.get("hash") != self.hash:
            old = stored.get("config", {}) if isinstance(stored, dict) else {}
            changed = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise ValueError(f"{self.root} holds a run with another configuration (differs in: "
                             f"{', '.join(changed) or 'hash'}); use another output folder or delete it")
        return True

    def audit(self, stored: bool) -> list[Path]:
        """Decode every image; return the damaged ones. ValueError if one was made by another configuration.

        An image without a stored hash (written before hashes were stored) is accepted only when
        ``config.json`` holds this configuration (``stored``).
        """
        damaged, foreign = [], []
        for index in sorted(self.existing()):
            path = self.image_path(index)
            try:
                made_by = image_config(path)
            except ValueError:
                damaged.append(path)
                continue
            if made_by != self.hash and not (made_by is None and stored):
                foreign.append(path)
        if foreign:
            missing = "" if stored else " (and its config.json is missing)"
            raise ValueError(f"{self.root}{missing} holds {len(foreign)} image(s) not made by this configuration, "
                             f"e.g. {foreign[0]}; use another output folder or delete it")
        return damaged

    def claim(self) -> list[Path]:
        """Create the folder or verify it (config.json and every image); store the configuration.

        Removes partial files and the damaged images, and returns the paths of the latter (to be re-sampled).
        """
        stored = self.check()
        self.images.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.images):
            for stale in folder.glob(TEMP_PREFIX + "*"):
                stale.unlink(missing_ok=True)
        damaged = self.audit(stored)
        for path in damaged:
            path.unlink()
        if not stored:
            write_json(self.root / "config.json", {"hash": self.hash, "config": self.config})
        return damaged

    def image_path(self, index: int) -> Path:
        return self.images / f"{index:06d}.png"

    def existing(self) -> set[int]:
        """Indices of the images already written."""
        if not self.images.is_dir():
            return set()
        return {int(m.group(1)) for m in map(IMAGE_NAME.match, os.listdir(self.images)) if m}

    def missing(self, num_images: int) -> list[int]:
        done = self.existing()
        return [i for i in range(num_images) if i not in done]

    def write_image(self, index: int, image: Tensor, network_rows: int | None = None) -> None:
        """Save image ``index`` with the configuration hash and ``network_rows`` (the rows it took) in the PNG."""
        pil = to_pil(image, f"image {index}")
        info = PngInfo()
        info.add_text(CONFIG_KEY, self.hash)
        if network_rows is not None:
            info.add_text(ROWS_KEY, str(int(network_rows)))
        atomic_write(self.image_path(index), lambda tmp: pil.save(tmp, format="PNG", pnginfo=info))

    def network_rows(self, index: int) -> int | None:
        """The network rows stored with image ``index`` (``None`` if it was saved without them)."""
        with Image.open(self.image_path(index)) as image:
            value = image.info.get(ROWS_KEY)
        return None if value is None else int(value)

    def files_state(self, indices: Iterable[int]) -> str:
        """Hash of the size and modification time of images ``indices``: changes whenever one is rewritten."""
        stats = [self.image_path(i).stat() for i in indices]
        return config_hash({"images": [(st.st_size, st.st_mtime_ns) for st in stats]})

    def read_images(self, indices: Iterable[int]) -> Tensor:
        return torch.stack([load_image(self.image_path(i)) for i in indices])

    def read_json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.root / name, data)
