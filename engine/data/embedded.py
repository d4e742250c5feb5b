"""The embedded default dataset in the cache: $CLIP_RD_CACHE, else ~/.cache/clip_rd.

Layout of the cache (``--cache-dir``)::

    data-v<N>/                    train-{00000..00015}.tar, val-00000.tar, sizes.json, classnames.json (N: the
                                  dataset's format version; a folder of an older format is left as it was)
    stores/<teacher>-<data>/      teacher embedding stores (engine.teachers.store)
    teachers/runs/                the default teacher's training run (python -m engine.teacher)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..core.errors import UserError
from ..core.lock import DEFAULT_TIMEOUT
from . import synthetic


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIP_RD_CACHE", Path.home() / ".cache" / "clip_rd"))


def cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def data_dir(cache: Path) -> Path:
    """Where the cache keeps the embedded dataset of this format (a new format is generated beside an old one)."""
    return Path(cache) / f"data-v{synthetic.FORMAT_VERSION}"


def ensure_default_data(cache: Path, progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """The embedded dataset's {"train": pattern, "val": pattern}, generated into ``data_dir(cache)`` when missing
    (or after waiting, at most ``timeout`` seconds, for another process generating it)."""
    return synthetic.build(data_dir(cache), synthetic.SyntheticSpec(), progress=progress, timeout=timeout)


def embedded_val_data(cache_dir: Optional[str]) -> str:
    """The embedded validation shards, generated into the cache when missing; a UserError naming the cache."""
    cache = cache_root(cache_dir)
    try:
        return ensure_default_data(cache)["val"]
    except (OSError, ValueError) as exc:
        raise UserError(f"--cache-dir {cache}: cannot prepare the embedded validation data there: "
                        f"{' '.join(str(exc).split())}") from exc
