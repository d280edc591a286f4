"""Recipes → a GitHub Actions workflow (`gpuwheel ci github`), and the step summaries it shows
(`gpuwheel ci summary`): the CI a team would write by hand, derived from what gpuwheel knows of
each target — its plan hash (the source cache key), its Python, where its toolkit can come from on a
runner without CUDA, and the GPU its smoke test needs (the runner label `smNN`).

The jobs, per target (a matrix):
  build    GitHub-hosted: lock --check, fetch (actions/cache keyed by the plan hash), build --locked,
           audit; wheels and reports uploaded as artifacts
  smoke    on a self-hosted runner labelled [self-hosted, gpu, smNN]: the kernels on the target GPU
  verify   on demand (workflow_dispatch with verify), on a fresh hosted runner: the wheels rebuilt from
           their provenance and the lock (`gpuwheel verify`), compared byte for byte
  publish  after smoke, on demand (workflow_dispatch with publish), credentials from secrets
Each stage's output sits in a log group; the audit, smoke and verify JSON become the step summary.
docs/ci.md shows a generated workflow.
"""

from __future__ import annotations

import json
import shlex
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuwheel import facts
from gpuwheel.plan import Plan
from gpuwheel.smoke.report import SmokeReport, SmokeReportFormatError

# The runner the CPU jobs use, and the versions of the actions the workflow calls.
HOSTED_RUNNER = "ubuntu-24.04"
ACTIONS = {
    "checkout": "actions/checkout@v4",
    "setup-python": "actions/setup-python@v5",
    "cache": "actions/cache@v4",
    "upload": "actions/upload-artifact@v4",
    "download": "actions/download-artifact@v4",
}
# Repository secrets the publish job reads (docs/ci.md): the index's upload URL and twine's credentials.
SECRETS = ("GPUWHEEL_INDEX_URL", "GPUWHEEL_INDEX_USERNAME", "GPUWHEEL_INDEX_PASSWORD")


@dataclass(frozen=True)
class CiTarget:
    """One row of the workflow's matrix."""

    target: str  # the target's name: artifact names, the wheels/<target>/ directory
    recipe: str  # how the workflow's commands name it: a shipped target, or a recipe path in the repository
    plan_hash: str
    python: str  # x.y: the runner's Python, the recipe's
    backend: str  # local (the toolkit from PyPI wheels) | container (the recipe's CUDA base image)
    lock_cuda_from: str  # what `gpuwheel lock --cuda-from` must have been for this runner: pypi | host
    runner: tuple[str, ...]  # the smoke job's runner labels
    only: tuple[str, ...]

    def row(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "recipe": self.recipe,
            "plan": self.plan_hash,
            "python": self.python,
            "backend": self.backend,
            "only": " ".join(self.only),
            "runner": list(self.runner),
        }


def ci_target(reference: str, plan: Plan, only: Sequence[str] = ()) -> CiTarget:
    """The matrix row of a planned target. A GitHub-hosted runner has no CUDA: where PyPI ships the
    toolkit (CUDA 13.0) the local backend installs it from the lock; else the build runs in the
    recipe's nvidia/cuda image (the container backend, docker on the runner)."""
    arch = facts.parse_arch(plan.target.compute_capability)
    from_pypi = facts.major_minor(plan.toolchain.cuda) in facts.CUDA_PYPI_TOOLCHAIN
    return CiTarget(
        target=plan.target.name,
        recipe=reference,
        plan_hash=plan.hash,
        python=facts.major_minor(plan.toolchain.python),
        backend="local" if from_pypi else "container",
        lock_cuda_from="pypi" if from_pypi else "host",
        runner=("self-hosted", "gpu", f"sm{arch.number}"),
        only=tuple(only),
    )


def github_workflow(targets: Sequence[CiTarget], *, install: str, command: str) -> str:
    """The workflow file's text: YAML, its matrix a JSON flow sequence (YAML reads JSON as it is)."""
    matrix = _flow([t.row() for t in targets])
    locks = "\n".join(
        f"#   gpuwheel lock {shlex.quote(t.recipe)}"
        + "".join(f" --only {shlex.quote(p)}" for p in t.only)
        + f" --cuda-from {t.lock_cuda_from}"
        for t in targets
    )
    runners = ", ".join(sorted({"[" + ", ".join(t.runner) + "]" for t in targets}))
    return _Template(
        _WORKFLOW.replace("@hosted_setup\n", _HOSTED_SETUP).replace("@job_matrix\n", _JOB_MATRIX)
    ).substitute(
        command=command,
        locks=locks,
        runners=runners,
        matrix=matrix,
        install=shlex.quote(install),
        secrets=", ".join(SECRETS),
        hosted=HOSTED_RUNNER,
        **{name.replace("-", "_"): uses for name, uses in ACTIONS.items()},
    )


class _Template(string.Template):
    delimiter = "@"  # GitHub's ${{ }} and the shell's $VARIABLES stay as they are


def _flow(rows: Iterable[Mapping[str, Any]]) -> str:
    return "\n".join(f"          - {json.dumps(row, separators=(', ', ': '))}" for row in rows)


# ${{ }} are GitHub's expressions, kept as they are: gpuwheel's values are @NAME placeholders.
# The first steps of both jobs on GitHub's runners (build, publish): the checkout, the recipe's Python, gpuwheel.
_HOSTED_SETUP = """\
      - uses: @checkout
      - uses: @setup_python
        with:
          python-version: ${{ matrix.python }}
      - name: install gpuwheel
        run: |
          echo "::group::pip install gpuwheel"
          python -m pip install @install
          echo "::endgroup::"
"""
# Every job runs once per target, each target on its own (one failing does not cancel the others).
_JOB_MATRIX = """\
    strategy:
      fail-fast: false
      matrix:
        include:
@matrix
    env:
      TARGET: ${{ matrix.target }}
      RECIPE: ${{ matrix.recipe }}
"""
_WORKFLOW = """\
# Generated by `@command`; regenerate it rather than editing it.
# Before its first run (docs/ci.md):
# - a lock per target, made and committed where the recipes live:
@locks
# - self-hosted GPU runners with the labels @runners, an NVIDIA driver and python3;
# - for publishing, repository secrets @secrets.
name: gpuwheel

on:
  push:
    branches: [main]
  pull_request:
  workflow_dispatch:
    inputs:
      publish:
        description: Publish the smoke-tested wheels to the index
        type: boolean
        default: false
      verify:
        description: Rebuild the wheels on a fresh runner from their provenance and lock, and compare the bytes
        type: boolean
        default: false

permissions:
  contents: read

env:
  GPUWHEEL_CACHE: ${{ github.workspace }}/.gpuwheel-cache
  PIP_DISABLE_PIP_VERSION_CHECK: "1"
  NO_COLOR: "1"

jobs:
  build:
    name: build ${{ matrix.target }}
    runs-on: @hosted
    timeout-minutes: 360
@job_matrix
      GPUWHEEL_LOCK_ONLY: ${{ matrix.only }}
      GPUWHEEL_FETCH_ONLY: ${{ matrix.only }}
      GPUWHEEL_BUILD_ONLY: ${{ matrix.only }}
    steps:
@hosted_setup
      - name: the lock is up to date
        run: gpuwheel lock "$RECIPE" --check
      - name: source cache
        uses: @cache
        with:
          path: ${{ env.GPUWHEEL_CACHE }}/sources
          key: gpuwheel-sources-${{ matrix.plan }}
      - name: fetch
        run: |
          echo "::group::gpuwheel fetch $RECIPE"
          gpuwheel fetch "$RECIPE"
          echo "::endgroup::"
      - name: build
        run: |
          echo "::group::gpuwheel build $RECIPE --locked"
          gpuwheel build "$RECIPE" --locked --backend "${{ matrix.backend }}" --json > "build-$TARGET.json"
          echo "::endgroup::"
      - name: audit
        run: |
          echo "::group::gpuwheel audit wheels/$TARGET/staging"
          gpuwheel audit "wheels/$TARGET/staging" --target "$RECIPE" --json > "audit-$TARGET.json"
          echo "::endgroup::"
      - name: summary
        if: always()
        run: gpuwheel ci summary "build-$TARGET.json" "audit-$TARGET.json" >> "$GITHUB_STEP_SUMMARY"
      - uses: @upload
        with:
          name: wheels-${{ matrix.target }}
          path: wheels/${{ matrix.target }}/staging/*.whl
          if-no-files-found: error
      - uses: @upload
        if: always()
        with:
          name: build-reports-${{ matrix.target }}
          path: |
            build-${{ matrix.target }}.json
            audit-${{ matrix.target }}.json
          if-no-files-found: ignore

  smoke:
    name: smoke ${{ matrix.target }}
    needs: build
    runs-on: ${{ matrix.runner }}
    timeout-minutes: 60
@job_matrix
    steps:
      - uses: @checkout
      - name: install gpuwheel
        run: |
          echo "::group::pip install gpuwheel"
          python3 -m venv .gpuwheel-venv
          .gpuwheel-venv/bin/python -m pip install @install
          echo "$PWD/.gpuwheel-venv/bin" >> "$GITHUB_PATH"
          echo "::endgroup::"
      - uses: @download
        with:
          name: wheels-${{ matrix.target }}
          path: wheels/${{ matrix.target }}/staging
      - name: smoke
        run: |
          echo "::group::gpuwheel smoke $RECIPE"
          gpuwheel smoke "$RECIPE" --wheels "wheels/$TARGET/staging" --junit "smoke-$TARGET.xml"
          echo "::endgroup::"
      - name: summary
        if: always()
        run: gpuwheel ci summary "wheels/$TARGET/staging/smoke.json" >> "$GITHUB_STEP_SUMMARY"
      - uses: @upload
        if: always()
        with:
          name: smoke-${{ matrix.target }}
          path: |
            wheels/${{ matrix.target }}/staging/smoke.json
            smoke-${{ matrix.target }}.xml
          if-no-files-found: ignore

  verify:
    name: verify ${{ matrix.target }}
    needs: build
    if: github.event_name == 'workflow_dispatch' && inputs.verify
    runs-on: @hosted
    timeout-minutes: 360
@job_matrix
    steps:
@hosted_setup
      - name: source cache
        uses: @cache
        with:
          path: ${{ env.GPUWHEEL_CACHE }}/sources
          key: gpuwheel-sources-${{ matrix.plan }}
      - uses: @download
        with:
          name: wheels-${{ matrix.target }}
          path: built
      - name: verify
        run: |
          echo "::group::gpuwheel verify built/*.whl"
          gpuwheel verify built/*.whl --target "$RECIPE" --json > "verify-$TARGET.json"
          echo "::endgroup::"
      - name: summary
        if: always()
        run: gpuwheel ci summary "verify-$TARGET.json" >> "$GITHUB_STEP_SUMMARY"
      - uses: @upload
        if: always()
        with:
          name: verify-${{ matrix.target }}
          path: verify-${{ matrix.target }}.json
          if-no-files-found: ignore

  publish:
    name: publish ${{ matrix.target }}
    needs: smoke
    if: github.event_name == 'workflow_dispatch' && inputs.publish
    runs-on: @hosted
    environment: gpuwheel-publish
@job_matrix
    steps:
@hosted_setup
      - uses: @download
        with:
          name: wheels-${{ matrix.target }}
          path: wheels/${{ matrix.target }}/staging
      - uses: @download
        with:
          name: smoke-${{ matrix.target }}
          path: smoke-report
      - name: publish
        env:
          INDEX_URL: ${{ secrets.GPUWHEEL_INDEX_URL }}
          TWINE_USERNAME: ${{ secrets.GPUWHEEL_INDEX_USERNAME }}
          TWINE_PASSWORD: ${{ secrets.GPUWHEEL_INDEX_PASSWORD }}
        run: |
          echo "::group::gpuwheel publish $RECIPE"
          gpuwheel publish "$RECIPE" --wheels "wheels/$TARGET/staging" --smoke-report smoke-report/wheels/"$TARGET"/staging/smoke.json --repository "$INDEX_URL"
          echo "::endgroup::"
"""  # noqa: E501 (the publish step's shell line, kept on one line as it runs)


# ---- step summaries ----------------------------------------------------------------------------
def summary_markdown(reports: Sequence[tuple[str, Any]]) -> str:
    """Markdown for $GITHUB_STEP_SUMMARY from (file name, parsed JSON) of `build --json`, `audit --json`,
    smoke reports and `verify --json`; a missing or unreadable report (a failed step) is a line saying so."""
    parts = []
    for name, report in reports:
        if report is None:
            parts.append(f"**{name}**: no report (the step that writes it failed or did not run)\n")
        elif isinstance(report, dict) and "finished" in report:
            parts.append(_build_summary(name, report))
        elif isinstance(report, dict) and "gpu_checks" in report:
            try:
                parts.append(_smoke_summary(SmokeReport.from_json(report)))
            except SmokeReportFormatError as error:  # the gate refuses such a report too
                parts.append(f"**{name}**: a smoke report gpuwheel cannot read: {error}\n")
        elif isinstance(report, dict) and "sos" in report:
            parts.append(_audit_summary(name, report))
        elif isinstance(report, dict) and "rebuilt_dir" in report:
            parts.append(_verify_summary(name, report))
        else:
            parts.append(f"**{name}**: not a build, audit, smoke or verify report of gpuwheel\n")
    return "\n".join(parts)


def _build_summary(name: str, report: Mapping[str, Any]) -> str:
    how = "reused (nothing changed)" if report.get("reused") else "built"
    rows = [
        f"| `{w['filename']}` | {w['label']} | {'passed' if w['audit_passed'] else '**FAILED**'} "
        f"| `{w['sha256'][:16]}…` |"
        for w in report["finished"]["wheels"]
    ]
    return "\n".join(
        [
            f"### {report['finished']['target']}: wheels {how}",
            "",
            "| wheel | label | audit | sha256 |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def _audit_summary(name: str, report: Mapping[str, Any]) -> str:
    target = report.get("target", {})
    rows = [
        f"| `{so['path']}` | {so['verdict']} | {so['native']} / {so['jit']} / {so['none']} | "
        f"{', '.join(so['sass_archs']) or '—'} | {', '.join(so['ptx_archs']) or '—'} |"
        for so in report["sos"]
    ]
    verdict = "passed" if report.get("passed") else "**FAILED**"
    problems = [f"- {p}" for p in report.get("problems", [])]
    return "\n".join(
        [
            f"### audit {verdict}: GPU {target.get('arch')}, driver ≥ {target.get('min_driver')}",
            "",
            "| .so | verdict | native / JIT / none | SASS | PTX |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            *problems,
            "",
        ]
    )


def _verify_summary(name: str, report: Mapping[str, Any]) -> str:
    head = "the same bytes" if report.get("same") else "**DIFFERENT BYTES**"
    rows = []
    for check in report.get("wheels", []):
        diff = check["diff"]
        first = diff["members"][0]["summary"] if diff["members"] else (diff["archive"] or [""])[0]
        rows.append(
            f"| `{Path(check['wheel']).name}` | `{diff['sha256'][0][:16]}…` | `{diff['sha256'][1][:16]}…` | "
            f"{'same' if check['same'] else first.replace('|', '/')} |"
        )
    return "\n".join(
        [
            f"### verify {report.get('target')}: {head} (plan {str(report.get('plan_hash'))[:16]}, "
            f"{report.get('backend')} backend)",
            "",
            "| wheel | sha256 | rebuilt | difference |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def _smoke_summary(report: SmokeReport) -> str:
    head = (
        "passed"
        if report.passed
        else "**FAILED**"
        if report.failed or report.gpu_ran  # ran on the GPU and not passed: a failure, or no wheel at all
        else f"**not on the GPU**: {report.gpu_skip_reason}"
    )
    checks = [("environment", c) for c in report.checks]
    for wheel in report.wheels:
        checks.extend((wheel.filename, c) for c in wheel.checks)
    rows = [f"| {where} | {c.name} | {c.status} | {c.detail} |" for where, c in checks]
    return "\n".join(
        [
            f"### smoke {report.target} {head} ({report.gpu.name if report.gpu else 'no GPU'})",
            "",
            "| where | check | status | detail |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
