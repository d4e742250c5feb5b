"""Where cached artefacts live: $CLIP_RD_CACHE, else ~/.cache/clip_rd (data/, teachers/, stores/)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIP_RD_CACHE", Path.home() / ".cache" / "clip_rd"))
