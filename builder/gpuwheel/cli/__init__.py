"""The `gpuwheel` command: one click group; each command group lives in its own module.

Commands parse their options, call one stage function and render its result. Errors are
mapped here, in one place: a GpuwheelError prints one line and exits with its own code.
"""

from __future__ import annotations

import sys

import click

from gpuwheel.errors import GpuwheelError
from gpuwheel.run import stop_on_signals


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GpuwheelError as error:
            click.echo(f"gpuwheel: error: {error}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpuwheel")
def main() -> None:
    """Build vLLM and flash-attn wheels for exactly your GPUs."""
    stop_on_signals()


def _register() -> None:
    # Each module adds its commands to `main`; imported here so `gpuwheel --help` lists all.
    from gpuwheel.cli import recipes  # noqa: F401
    from gpuwheel.cli import audit  # noqa: F401
    from gpuwheel.cli import publish  # noqa: F401
    from gpuwheel.cli import sources  # noqa: F401
    from gpuwheel.cli import wheels  # noqa: F401
    from gpuwheel.cli import build  # noqa: F401
    from gpuwheel.cli import smoke  # noqa: F401


_register()
