"""Publish to a target's local static index (gpuwheel.static_index), which pip reads from file:// or
any static web server."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from gpuwheel.layout import simple_url
from gpuwheel.publish.gate import PublishGate, admit, read_all
from gpuwheel.publish.report import PublishedWheel, PublishReport
from gpuwheel.static_index import add_wheels


def publish_local(wheels: Sequence[Path], index_dir: Path, *, gate: PublishGate | None = None) -> PublishReport:
    """Add the wheels the gate admits to the static index in index_dir and regenerate its pages atomically.

    A wheel already there with the same sha256 is left alone; one with the same file name and a
    different sha256 refuses the whole publish before anything is copied.
    """
    index_dir = Path(index_dir)
    found = read_all(wheels)
    # Outside the index: a scratch folder inside it would be another publish's leftover to remove.
    with tempfile.TemporaryDirectory(prefix="gpuwheel-forced-") as scratch:
        found, warnings = admit(found, gate, Path(scratch))
        added = add_wheels(found, index_dir)
    results = tuple(
        PublishedWheel(
            w.filename, w.sha256, "published" if added[w.filename] else "skipped", warnings.get(w.filename, ())
        )
        for w in found
    )
    return PublishReport(str(index_dir), simple_url(index_dir), results)
