"""Making a toolchain venv: with uv where it is installed, else with the interpreter's venv and pip.

uv installs torch and its CUDA libraries in a fraction of pip's time (benchmarks/toolchain_venv.py
measures both), but it does not read pip's configuration — and that is where a user names PyTorch's
variant index (torch==2.11.0+cu128 is on download.pytorch.org/whl/cu128 or a mirror of it, never on
PyPI), their mirror, find-links and constraints. So gpuwheel asks pip for its configuration and hands
it to uv, unless the environment configures uv's indexes itself (UV_INDEX, UV_DEFAULT_INDEX, …): then
uv keeps its own. Either way the packages come from the same places the pip path would take them.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from gpuwheel.run import capture

# uv's own index settings: any of these set means the user configured uv, and pip's config stays out.
UV_INDEX_VARIABLES = (
    "UV_INDEX",
    "UV_DEFAULT_INDEX",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_NO_INDEX",
)
# pip option → uv pip install option, for the options that decide where packages come from and which.
_UV_OPTION = {
    "index-url": "--default-index",
    "extra-index-url": "--index",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
# Sections pip applies to `pip install`, in its precedence order (later wins): config files' [global],
# then their [install], then PIP_* variables (listed as `:env:`).
_SECTIONS = ("global", "install", ":env:")


def find_uv() -> str | None:
    """uv on PATH, or beside this interpreter (a venv holding gpuwheel and uv, not activated)."""
    beside = Path(sys.executable).with_name("uv")
    return shutil.which("uv") or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def pip_config(pythons: Iterable[Path | str]) -> dict[str, str] | None:
    """pip's effective settings for `pip install` as `pip config list` reports them (files and PIP_*),
    from the first of `pythons` that has pip; None where none has."""
    for python in pythons:
        listed = capture([python, "-m", "pip", "config", "list"])
        if listed.returncode == 0:
            return parse_pip_config(listed.stdout)
    return None


def parse_pip_config(text: str) -> dict[str, str]:
    """`pip config list` lines (`global.extra-index-url='URL URL'`, `:env:.find-links='/dir'`) → the
    value pip uses per option: files in the order pip reads them, [install] over [global], PIP_* last."""
    found: list[tuple[int, int, str, str]] = []
    for order, line in enumerate(text.splitlines()):
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in _SECTIONS:
            continue
        try:
            parsed = ast.literal_eval(value)  # pip prints each value with repr()
        except (ValueError, SyntaxError):
            continue
        found.append((_SECTIONS.index(section), order, option, str(parsed)))
    return {option: value for _, _, option, value in sorted(found)}


def uv_settings(config: dict[str, str] | None, environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv pip install options and environment that take packages from where pip's configuration says;
    none where pip has no configuration to give or the environment configures uv's indexes itself."""
    if config is None or any(environ.get(name) for name in UV_INDEX_VARIABLES):
        return [], dict(environ)
    args: list[str] = []
    for option, uv_option in _UV_OPTION.items():
        for value in config.get(option, "").split():
            args += [uv_option, value]
    if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if any(option in config for option in ("index-url", "extra-index-url", "find-links")) and not environ.get(
        "UV_INDEX_STRATEGY"
    ):
        # pip takes the best version across all its indexes; uv's default takes a package only from the
        # first index that has it — a PyPI mirror holding an older torch would hide the variant's.
        args += ["--index-strategy", "unsafe-best-match"]
    env = dict(environ)
    if config.get("cert") and not environ.get("SSL_CERT_FILE"):
        env["SSL_CERT_FILE"] = config["cert"]  # pip's private CA bundle: uv reads it from here
    return args, env


def venv_steps(
    installer: str, *, uv: str | None, base: Path, venv: Path, requirements: Sequence[str], environ: dict[str, str]
) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """The commands (and their environments) that make `venv` from interpreter `base` and install
    `requirements` into it."""
    python = str(venv / "bin" / "python")
    if installer == "pip":
        return [
            ((str(base), "-m", "venv", str(venv)), environ),
            ((python, "-m", "pip", "install", "--no-input", *requirements), environ),
        ]
    if uv is None:
        raise ValueError("the uv installer needs uv")
    # pip's configuration as the pip path would see it: the base interpreter's pip, else gpuwheel's own.
    args, env = uv_settings(pip_config((base, sys.executable)), environ)
    # pip joins the requirements: the build runs `python -m pip wheel`, and uv's venvs come without it.
    return [
        ((uv, "venv", "--no-project", "--python", str(base), str(venv)), environ),
        ((uv, "pip", "install", "--python", python, *args, *requirements, "pip"), env),
    ]
