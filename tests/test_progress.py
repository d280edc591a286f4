"""What a user sees of a build while it runs off a terminal (CI logs): no minutes of silence before
the first compile, then a line per tenth of the ninja steps; and the milestones its record keeps."""

from __future__ import annotations

from gpuwheel.backends.procedure import BuildLog
from gpuwheel.backends.progress import BuildProgress, milestones

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


def test_the_build_log_keeps_each_milestone_once_in_order_with_its_second(tmp_path):
    seen = []
    with BuildLog(tmp_path / "vllm.log", seen.append) as log:
        for line in [*PIP_VERBOSE, "  [20/20] sccache nvcc -c csrc/kernel_20.cu"]:  # a second [N/N] line
            log.line(line)

    assert list(log.milestones) == [
        "cmake configure started", "cmake configure done", "first compile step done", "last compile step done",
        "wheel written"]
    at = log.milestones
    assert 0 <= at["cmake configure started"] <= at["cmake configure done"] <= at["first compile step done"]
    # every milestone at its first line but the last step, at its latest: here after the wheel's line
    assert at["first compile step done"] <= at["wheel written"] <= at["last compile step done"]
    assert seen == [*PIP_VERBOSE, "  [20/20] sccache nvcc -c csrc/kernel_20.cu"]  # progress still sees every line
    assert (tmp_path / "vllm.log").read_text().count("\n") == len(PIP_VERBOSE) + 1


def test_lines_that_mark_no_milestone_give_none_and_a_one_step_build_marks_both_ends():
    assert [line for line in PIP_VERBOSE if not milestones(line)] == [
        line for line in PIP_VERBOSE
        if not line.strip().startswith(("-- The CXX", "-- Configuring done", "[1/20]", "[20/20]", "Created wheel"))]
    assert milestones("[1/1] c++ -o gwfixture.so") == ("first compile step done", "last compile step done")
    assert milestones("gpuwheel: copying the source tree to /gpuwheel/work/vllm") == ()
