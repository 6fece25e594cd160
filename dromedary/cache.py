"""The one cache directory every part of dromedary writes to: the embedded default model, the
compiled CPU decoding step, chat's input history. `$DROMEDARY_CACHE`, else the XDG cache home."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("DROMEDARY_CACHE"):
        return Path(os.environ["DROMEDARY_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dromedary"
