"""Omniglot (Lake, Salakhutdinov, Tenenbaum 2015) read from its original layout, offline.

The original release is ``<split>/<alphabet>/<character>/<drawing>.png`` (105×105, 1-bit, ink dark on
white), as a folder or as the zip it ships in (``images_background.zip``, ``images_evaluation.zip`` or
the "minimal" ``images_background_small1.zip`` / ``images_background_small2.zip``). Images are returned
as ``uint8`` tensors of shape ``(n, size, size)``, 255 = white paper, 0 = ink (area-resampled), with one
class per (alphabet, character).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["OmniglotData", "SPLITS", "find_omniglot", "load_omniglot", "DATA_ENV"]

#: environment variable naming a folder that holds the Omniglot zips or folders
DATA_ENV = "BILEVEL_RAY_DATA"
#: the original release's splits, by name
SPLITS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
_REPO = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
_SEARCH = (_REPO / "data" / "omniglot", Path("data/omniglot"), Path("../shared/data/omniglot"),
           _REPO.parent / "shared" / "data" / "omniglot", Path.home() / ".cache" / "bilevel-ray" / "omniglot")


@dataclass(frozen=True)
class OmniglotData:
    """Images of some Omniglot characters: ``images[i]`` is a drawing of class ``labels[i]``, and
    ``classes[c] = (alphabet, character)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[tuple[str, str], ...]

    @property
    def alphabets(self) -> tuple[str, ...]:
        """The alphabets of these characters, sorted."""
        return tuple(sorted({a for a, _ in self.classes}))

    def select(self, *, alphabets: list[str] | tuple[str, ...] | None = None,
               exclude: list[str] | tuple[str, ...] | None = None) -> "OmniglotData":
        """The characters of the named alphabets (all if ``None``) minus those of the alphabets in
        ``exclude`` (which need not be in this split); classes are renumbered from 0 in order."""
        known = set(self.alphabets)
        for name in alphabets or ():
            if name not in known:
                raise ValueError(f"alphabet {name!r}: not in this split; allowed: {', '.join(sorted(known))}")
        keep = [c for c, (a, _) in enumerate(self.classes)
                if (alphabets is None or a in alphabets) and a not in (exclude or ())]
        if not keep:
            raise ValueError("alphabets: the selection holds no character")
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        rows = remap[self.labels] >= 0
        return OmniglotData(self.images[rows], remap[self.labels[rows]], tuple(self.classes[c] for c in keep))


def find_omniglot(split: str, root: str | os.PathLike | None = None) -> Path:
    """Where split ``split`` lies: ``root`` (a folder holding ``<split>.zip`` or ``<split>/``, or the zip
    or folder itself), else ``$BILEVEL_RAY_DATA``, the checkout's ``data/omniglot`` (the minimal splits ship
    there), ``data/omniglot`` and ``../shared/data/omniglot`` from the working directory and next to the
    checkout, and ``~/.cache/bilevel-ray/omniglot``. Raises ``FileNotFoundError`` naming every place looked at."""
    if root is not None and (Path(root).suffix == ".zip" or Path(root).name == split):
        if Path(root).exists():
            return Path(root)
        raise FileNotFoundError(f"Omniglot split {split!r}: {root} does not exist")
    bases = [Path(root)] if root else [*( [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []),
                                       *_SEARCH]
    looked = []
    for base in bases:
        for cand in (base / f"{split}.zip", base / split, base / "omniglot" / f"{split}.zip"):
            looked.append(str(cand))
            if cand.exists():
                return cand
    raise FileNotFoundError(
        f"Omniglot split {split!r} not found; expected {split}.zip (or the folder {split}/, "
        f"<alphabet>/<character>/*.png) in one of: {', '.join(looked)}. Download it from "
        f"https://github.com/brendenlake/omniglot (python/{split}.zip) or set ${DATA_ENV}")


def _decode(blob: bytes, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(blob)).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime: float, size: int) -> OmniglotData:
    files: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    p = Path(path)
    if p.is_dir():
        entries = [(str(f.relative_to(p)), f.read_bytes) for f in sorted(p.rglob("*.png"))]
        loaded = [(name, read()) for name, read in entries]
    else:
        with zipfile.ZipFile(p) as zf:
            loaded = [(n, zf.read(n)) for n in sorted(zf.namelist()) if n.endswith(".png")]
    for name, blob in loaded:
        parts = Path(name).parts
        if len(parts) < 3:
            raise ValueError(f"{path}: {name} is not <alphabet>/<character>/<drawing>.png")
        files.setdefault((parts[-3], parts[-2]), []).append((parts[-1], blob))
    if not files:
        raise ValueError(f"{path}: holds no <alphabet>/<character>/<drawing>.png image")
    classes = tuple(sorted(files))
    images, labels = [], []
    for c, key in enumerate(classes):
        for _, blob in sorted(files[key]):
            images.append(_decode(blob, size))
            labels.append(c)
    return OmniglotData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), classes)


def load_omniglot(split: str = "images_background_small1", *, root: str | os.PathLike | None = None,
                  size: int = 28) -> OmniglotData:
    """Read one Omniglot split (zip or folder, located by :func:`find_omniglot`), resized to
    ``size``×``size``. Cached per process."""
    if not (isinstance(size, int) and 4 <= size <= 105):
        raise ValueError(f"size: must be an integer in [4, 105], got {size!r}")
    path = find_omniglot(split, root)
    return _read(str(path.resolve()), path.stat().st_mtime, size)
