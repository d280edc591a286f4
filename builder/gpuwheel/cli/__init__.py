"""The `gpuwheel` command (the console script `gpuwheel.cli:main`): the group from group.py with
every command module's commands on it.

Each command module adds its commands to `main` when imported; importing them all here is what
makes `gpuwheel --help` list them. They import the group from group.py, never from this module.
"""

from gpuwheel.cli import (
    audit,  # noqa: F401
    build,  # noqa: F401
    cache,  # noqa: F401
    ci,  # noqa: F401
    dist,  # noqa: F401
    lock,  # noqa: F401
    publish,  # noqa: F401
    recipes,  # noqa: F401
    smoke,  # noqa: F401
    sources,  # noqa: F401
    verify,  # noqa: F401
    wheels,  # noqa: F401
)
from gpuwheel.cli.group import main, name_envvars

__all__ = ["main"]

name_envvars(main)  # after every command is on the group: their options get their variables too
