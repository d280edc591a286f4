"""The command line as a tool user meets it: results on stdout and --json for scripts, options from
GPUWHEEL_* variables, completion of target names, a fast start, and the cache it keeps."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from gpuwheel.cli import main

# Every command that reports something (issue 14): each takes --json and prints JSON on stdout.
REPORTING = ("targets", "show", "plan", "fetch", "patches check", "audit", "smoke", "publish", "show-wheel",
             "build", "finish", "cache list", "lock", "ci github")


def _command(path: str) -> click.Command:
    command = main
    for part in path.split():
        command = command.commands[part]
    return command


@pytest.mark.parametrize("path", REPORTING)
def test_every_reporting_command_takes_json(path):
    [option] = [p for p in _command(path).params if isinstance(p, click.Option) and "--json" in p.opts]
    assert option.is_flag  # a switch for stdout, never a file name (smoke's file is --report)


def test_results_go_to_stdout_so_they_can_be_piped(gpuwheel_script, tmp_path):
    shown = gpuwheel_script.run("plan", "h100")
    assert shown.returncode == 0, shown.stderr
    assert "plan hash:" in shown.stdout and shown.stderr == ""


def test_options_come_from_gpuwheel_environment_variables(gpuwheel_script):
    planned = gpuwheel_script.run("plan", "h100", GPUWHEEL_PLAN_JSON="1", GPUWHEEL_PLAN_ONLY="flash-attn")
    assert planned.returncode == 0, planned.stderr
    assert [p["name"] for p in json.loads(planned.stdout)["packages"]] == ["flash-attn"]


def test_errors_are_one_line_with_the_exit_code_of_their_kind(gpuwheel_script, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="h100", toolchain={"cuda_version": "13.0"})
    result = gpuwheel_script.run("-q", "plan", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpuwheel: error: {path}:{make_recipe.line(path, 'cuda_version = ')}: unknown key [toolchain] 'cuda_version' "
        "(did you mean 'cuda'?)"]


def test_shell_completion_offers_the_target_names(gpuwheel_script, tmp_path):
    mine = tmp_path / "recipes"
    mine.mkdir()
    (mine / "rtx-lab.toml").write_text('extends = "rtx6000pro"\n')
    env = {"_GPUWHEEL_COMPLETE": "bash_complete", "COMP_WORDS": "gpuwheel plan rtx", "COMP_CWORD": "2",
           "GPUWHEEL_RECIPES": str(mine)}
    completed = gpuwheel_script.run(**env)
    assert completed.returncode == 0, completed.stderr
    offered = [line.split(",", 1)[1] for line in completed.stdout.splitlines()]
    assert offered == ["rtx-lab", "rtx6000pro", "rtx6000pro-cu13", "rtx6000pro-torch211"]


def test_help_and_targets_start_without_the_stage_libraries(tmp_path):
    """What keeps `gpuwheel --help` and `gpuwheel targets` under 0.15 s: no network, ELF, docker or
    index library is imported for them (benchmarks/startup.py times it)."""
    probe = ("import sys, json, contextlib, io\n"
             "from gpuwheel.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try: main(sys.argv[1:], prog_name='gpuwheel')\n"
             "    except SystemExit: pass\n"
             "print(json.dumps(sorted(sys.modules)))\n")
    heavy = {"requests", "urllib3", "pypi_simple", "pydantic", "bs4", "docker", "twine", "auditwheel", "elftools",
             "zstandard", "lz4", "filelock", "platformdirs"}
    for args in (["--help"], ["targets"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        loaded = {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}
        assert not loaded & heavy, (args, sorted(loaded & heavy))
        if args == ["--help"]:
            assert "rich" not in loaded and "gpuwheel.recipe" not in json.loads(done.stdout.splitlines()[-1])


# ---- the cache ------------------------------------------------------------------------------------
def test_cache_dir_list_and_prune(gpuwheel_script, tmp_path):
    env = {"GPUWHEEL_CACHE": str(tmp_path / "cache")}
    assert gpuwheel_script.run("cache", "dir", **env).stdout.strip() == str(tmp_path / "cache")
    (tmp_path / "cache" / "toolchains" / "local-abc" / "bin").mkdir(parents=True)
    (tmp_path / "cache" / "toolchains" / "local-abc" / "bin" / "python").write_bytes(b"x" * 3000)
    (tmp_path / "cache" / "sources" / "archives").mkdir(parents=True)
    (tmp_path / "cache" / "sources" / "archives" / "demo.tar.gz").write_bytes(b"y" * 500)

    listed = gpuwheel_script.run("cache", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    sizes = {part["name"]: part["bytes"] for part in json.loads(listed.stdout)["parts"]}
    assert sizes["toolchains"] == 3000 and sizes["sources"] == 500 and sizes["compile"] == 0

    refused = gpuwheel_script.run("cache", "prune", **env)
    assert refused.returncode == 2 and "name the parts to remove" in refused.stderr
    dry = gpuwheel_script.run("cache", "prune", "toolchains", "--dry-run", **env)
    assert dry.stdout.startswith("would remove toolchains: 3.0 KB") and (tmp_path / "cache" / "toolchains").exists()
    pruned = gpuwheel_script.run("cache", "prune", "toolchains", **env)
    assert pruned.returncode == 0 and pruned.stdout.startswith("removed toolchains: 3.0 KB")
    assert not (tmp_path / "cache" / "toolchains").exists()
    assert (tmp_path / "cache" / "sources" / "archives" / "demo.tar.gz").exists()  # only what was named


# ---- the test suite's own plugin ----------------------------------------------------------------------
def test_a_fixture_whose_command_fails_shows_that_commands_stderr(pytester):
    pytester.makepyfile(test_fixture_command="""
        import subprocess, sys
        import pytest

        @pytest.fixture
        def built():
            subprocess.run([sys.executable, "-c", "import sys; sys.exit('error: invalid command bdist_wheel')"],
                           check=True, capture_output=True, text=True)

        def test_uses_it(built):
            pass
    """)
    result = pytester.runpytest("-p", "subprocess_report", "-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*stderr of `*` (exit 1)*", "*error: invalid command bdist_wheel*"])


def test_the_build_commands_engine_choices_are_the_recipes():
    from gpuwheel import recipe
    from gpuwheel.cli import build

    assert (build.ENGINES, build.ENGINE_VARIABLE) == (recipe.ENGINES, recipe.ENGINE_VARIABLE)
