"""What a user sees of a build while it runs off a terminal (CI logs): no minutes of silence before
the first compile, then a line per tenth of the ninja steps."""

from __future__ import annotations

from gpuwheel.backends.progress import BuildProgress

# The shape of `pip wheel -v` output of a CUDA extension build (from a real gwfixture build log).
PIP_VERBOSE = [
    "  Preparing metadata (setup.py): started",
    "  running egg_info",
    "  Preparing metadata (setup.py): finished with status 'done'",
    "Building wheels for collected packages: vllm",
    "  Building wheel for vllm (setup.py): started",
    "  running build_ext",
    "  -- The CXX compiler identification is GNU 12.2.0",
    "  -- Configuring done (95.1s)",
    *[f"  [{n}/20] sccache nvcc -c csrc/kernel_{n}.cu" for n in range(1, 21)],
    "  Building wheel for vllm (setup.py): finished with status 'done'",
    "  Created wheel for vllm: filename=vllm-0.26.0-cp38-abi3-linux_x86_64.whl size=1 sha256=0",
]


def _shown(quiet: bool, capsys) -> list[str]:
    progress = BuildProgress(quiet=quiet)
    progress.interactive = False  # as in a CI log, whatever runs the tests
    with progress.package("vllm") as on_line:
        for line in PIP_VERBOSE:
            on_line(line)
    return [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()]


def test_a_build_says_what_it_does_before_its_first_compile_and_then_counts_steps(capsys):
    assert _shown(False, capsys) == [
        "vllm: preparing metadata", "vllm: starting the build", "vllm: building extensions",
        "vllm: cmake: configuring", "vllm: cmake: generating the build files",
        *[f"vllm: {n}/20 build steps" for n in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)],
        "vllm: packing the wheel"]


def test_quiet_shows_nothing(capsys):
    assert _shown(True, capsys) == []
