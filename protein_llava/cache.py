"""Where the package keeps what it derives or fetches once (the de-quantised SmolLM2, ESM weights fetched from
the package index): $PROTEIN_LLAVA_CACHE, else $XDG_CACHE_HOME/protein_llava, else ~/.cache/protein_llava."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("PROTEIN_LLAVA_CACHE"):
        return Path(os.environ["PROTEIN_LLAVA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "protein_llava"
