"""learn2learn's few-shot vision benchmarks (omniglot, mini-imagenet, tiered-imagenet, cifarfs, fc100),
imported lazily. learn2learn downloads missing files unconditionally; :func:`learn2learn_tasksets`
first checks that they are present and, unless ``download=True``, fails at once naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["L2L_BENCHMARKS", "expected_files", "learn2learn_tasksets"]

#: files (relative to ``root``) each benchmark reads, as learn2learn 0.2 lays them out
L2L_BENCHMARKS: dict[str, tuple[str, ...]] = {
    "omniglot": ("omniglot-py/images_background", "omniglot-py/images_evaluation"),
    "mini-imagenet": tuple(f"mini-imagenet-cache-{m}.pkl" for m in ("train", "validation", "test")),
    "tiered-imagenet": tuple(f"tiered-imagenet/{m}_{k}.pkl" for m in ("train", "val", "test")
                             for k in ("images_png", "labels")),
    "cifarfs": ("cifarfs",),
    "fc100": tuple(f"FC100_{m}.pickle" for m in ("train", "val", "test")),
}


def expected_files(name: str, root: str | Path) -> list[Path]:
    """The files benchmark ``name`` needs under ``root`` that are missing."""
    if name not in L2L_BENCHMARKS:
        raise ValueError(f"benchmark: must be one of {', '.join(L2L_BENCHMARKS)}, got {name!r}")
    base = Path(root).expanduser()
    return [base / rel for rel in L2L_BENCHMARKS[name] if not (base / rel).exists()]


def learn2learn_tasksets(name: str, *, root: str | Path = "~/data", download: bool = False, **kwargs: Any) -> Any:
    """``learn2learn.vision.benchmarks.get_tasksets(name, root=root, **kwargs)`` (train/validation/test
    task sets), after checking its files: missing files raise ``FileNotFoundError`` naming them unless
    ``download=True`` (which needs internet)."""
    missing = expected_files(name, root)
    if missing and not download:
        raise FileNotFoundError(f"benchmark {name}: missing {', '.join(map(str, missing))}; put them there or "
                                "pass download=True on a machine with internet")
    from bilevel_ray.tasks.vision.l2l import import_learn2learn

    get_tasksets = import_learn2learn().vision.benchmarks.get_tasksets
    return get_tasksets(name, root=str(Path(root).expanduser()), **kwargs)
