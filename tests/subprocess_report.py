"""A pytest plugin: when a test or fixture dies of a CalledProcessError, the report shows what the
command printed. Without it a failing `pip wheel` in a fixture reads only "returned non-zero exit
status 1", and its real reason (no bdist_wheel, a compile error) stays hidden."""

from __future__ import annotations

import subprocess

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo is not None else None
    if not isinstance(error, subprocess.CalledProcessError):
        return
    command = " ".join(str(part) for part in error.cmd) if isinstance(error.cmd, (list, tuple)) else str(error.cmd)
    for stream, text in (("stdout", error.stdout), ("stderr", error.stderr)):
        if text:
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            report.sections.append((f"{stream} of `{command[:160]}` (exit {error.returncode})", text[-6000:]))
