"""The `gpuwheel` click group and what the command modules share: TARGET, its completion, and the
mapping of errors to exit codes. cli/__init__.py assembles the commands onto this group.

Commands parse their options, call one stage function and render its result: results on stdout
(`--json` for scripts), diagnostics on stderr. Errors are mapped here, in one place: a
GpuwheelError prints one line and exits with its own code; anything else is a bug in gpuwheel:
its traceback, a line saying so, exit 70.

Every option can also be set from the environment: GPUWHEEL_<OPTION> for the global ones
(GPUWHEEL_RECIPES, GPUWHEEL_VERBOSE), GPUWHEEL_<COMMAND>_<OPTION> for a command's
(GPUWHEEL_BUILD_JOBS=4, GPUWHEEL_PLAN_JSON=1), named after the long option as typed (click's own
auto_envvar_prefix would name them after the Python parameter: GPUWHEEL_PLAN_AS_JSON); `--help`
shows each one. docs/cli.md lists them.

Start-up matters (`gpuwheel --help`, shell completion, CI loops): the command modules import
only click and what this module already loads at the top, their stages inside the command (stage
values for type names under TYPE_CHECKING), so a command pays for what it uses. Rich too: `out` and
`console` from gpuwheel.log are made when first imported, so a command imports them where it prints.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from gpuwheel import log
from gpuwheel.errors import BUG_EXIT_CODE, DISK_FULL, REFUSED_WRITE, GpuwheelError, StorageError
from gpuwheel.run import stop_on_signals

# The machine refused a write: nothing gpuwheel or the user's input did wrong, and wherever it
# happens (cache, trees, staging, logs) the user's fix is the same, so it is answered here once.


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            try:
                return super().invoke(ctx)
            except OSError as error:
                # Without a file name only a full disk says where the fix lies; others stay bugs.
                if error.errno not in REFUSED_WRITE or not (error.filename or error.errno in DISK_FULL):
                    raise
                raise _storage_error(error) from None
        except GpuwheelError as error:
            click.echo(f"gpuwheel: error: {error}", err=True)
            sys.exit(error.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own ways out (--help, usage errors, an abort) keep their codes
        except Exception:
            # Not a user mistake: the traceback is what a bug report needs, and 70 (EX_SOFTWARE) tells
            # scripts that gpuwheel itself failed, not their input.
            traceback.print_exc()
            click.echo(
                "gpuwheel: internal error: this is a bug in gpuwheel, not in your input; please report "
                "it with the traceback above",
                err=True,
            )
            sys.exit(BUG_EXIT_CODE)


def _storage_error(error: OSError) -> StorageError:
    # Only on this error path: cache.py loads platformdirs and filelock, which --help must not pay for.
    import tempfile

    from gpuwheel.cache import cache_root

    root = cache_root()
    if not error.filename:  # a write() on an open file: which disk is not known here
        return StorageError(
            f"a write failed: {error.strerror}",
            hint=f"free space in the cache {root}, the output folder and the temp folder "
            f"{tempfile.gettempdir()} (TMPDIR)",
        )
    path = Path(error.filename)
    hint = (
        f"the cache {root} (GPUWHEEL_CACHE) must be a folder you can write, on a disk with room"
        if path == root or root in path.parents
        else "check that folder: free space, permissions, a file where a folder belongs"
    )
    return StorageError(f"cannot write {path}: {error.strerror}", hint=hint)


def complete_target(ctx: click.Context, param: click.Parameter, incomplete: str):
    """Shell completion of TARGET: the target names along the search path, or a recipe file."""
    # Loaded only when completing: a plain run pays for neither.
    from click.shell_completion import CompletionItem

    if "/" in incomplete or incomplete.startswith(".") or incomplete.endswith(".toml"):
        return [CompletionItem(incomplete, type="file")]
    from gpuwheel.recipe import list_targets, set_recipe_paths

    dirs = ctx.find_root().params.get("recipe_dirs")
    set_recipe_paths(tuple(dirs) if dirs else None)
    try:
        return [CompletionItem(name) for name in list_targets() if name.startswith(incomplete)]
    except GpuwheelError:
        return []


TARGET = click.argument("target", metavar="TARGET", shell_complete=complete_target)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpuwheel")
@click.option("-v", "--verbose", is_flag=True, help="Log what gpuwheel does (each command it runs) on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors; results still go to stdout.")
@click.option(
    "--recipes",
    "recipe_dirs",
    multiple=True,
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Look for targets in DIR before the shipped recipes (repeatable; "
    "GPUWHEEL_RECIPES=DIR:DIR does the same). Its recipes can extend shipped targets.",
)
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, recipe_dirs: tuple[Path, ...]) -> None:
    """Build vLLM and flash-attn wheels for exactly your GPUs.

    Results go to stdout (--json on every command that reports), diagnostics to stderr.
    Shell completion: eval "$(_GPUWHEEL_COMPLETE=bash_source gpuwheel)" (zsh_source, fish_source).
    """
    # Here, not at the top: `gpuwheel --help` never runs this and must not load the recipe code.
    from gpuwheel.recipe import set_recipe_paths

    stop_on_signals()  # SIGTERM/SIGHUP stop a build the way Ctrl-C does: compilers and all
    log.configure(verbose=verbose, quiet=quiet)
    set_recipe_paths(recipe_dirs or None)
    ctx.call_on_close(lambda: set_recipe_paths(None))


def name_envvars(command: click.Command, prefix: str = "GPUWHEEL") -> None:
    """Give every option without a variable of its own GPUWHEEL_[<COMMAND>_]<LONG OPTION>."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None and param.expose_value:
            long = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
            param.envvar = f"{prefix}_{long}"
            param.show_envvar = True
    for name, sub in getattr(command, "commands", {}).items():
        name_envvars(sub, f"{prefix}_{name.replace('-', '_').upper()}")
