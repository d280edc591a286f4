"""Where gpuwheel keeps what it downloads and builds between runs: one root, one layout.

$GPUWHEEL_CACHE, else the user cache dir. Under it: sources/ (content-addressed downloads and
checkouts), toolchains/ (venvs per toolchain), compile/ (sccache/ccache), images/ (docker).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    return Path(os.environ.get("GPUWHEEL_CACHE") or platformdirs.user_cache_dir("gpuwheel"))
