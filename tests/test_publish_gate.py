"""Only wheels whose audit passed for the target and whose smoke test passed on the target's arch
are published; --force publishes anyway and warns per wheel what it did not check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpuwheel.errors import PublishError
from gpuwheel.publish.gate import PublishGate, check_gate
from gpuwheel.provenance import Provenance, PublishMark
from gpuwheel.wheelfile import read_wheel
from publish_helpers import (TARGET, TARGET_CC, audit_record, index_listing, make_wheel, passing_wheel, sha256,
                             write_smoke_report)



@pytest.fixture
def publish(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    """`gpuwheel publish TARGET --wheels WHEELS --index-dir tmp_path/index EXTRA...` in its own process."""
    def run(wheels: Path, *extra: str):
        return gpuwheel_script.run("publish", TARGET, "--wheels", wheels, "--index-dir", tmp_path / "index", *extra,
                                   GPUWHEEL_RECIPES=publish_recipes)
    return run


def refused_line(result) -> str:
    assert result.returncode == 13, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gpuwheel: error: refusing to publish 1 wheel(s) for target {TARGET}: ")
    return line


def test_audited_and_smoke_tested_wheel_is_published(tmp_path: Path, publish):
    passing_wheel(tmp_path / "in", "gw-alpha")
    result = publish(tmp_path / "in")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_unaudited_wheel_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha")
    write_smoke_report(tmp_path / "in", [wheel])
    line = refused_line(publish(tmp_path / "in"))
    assert "gw_alpha-1.0-py3-none-any.whl: not audited (no gw_alpha-1.0.dist-info/gpuwheel.json)" in line
    assert not (tmp_path / "index").exists()


def test_failed_audit_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record(passed=False))
    write_smoke_report(tmp_path / "in", [wheel])
    assert "audit failed (gw_alpha-1.0.dist-info/gpuwheel.json)" in refused_line(publish(
                                                                                          tmp_path / "in"))


def test_audit_for_another_arch_or_target_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record(arch="12.0", target="rtx6000"))
    write_smoke_report(tmp_path / "in", [wheel])
    line = refused_line(publish(tmp_path / "in"))
    assert f"built for target 'rtx6000', not '{TARGET}'" in line
    assert f"audited for arch 12.0, target is {TARGET_CC}" in line


def test_missing_smoke_report_is_refused(tmp_path: Path, publish):
    make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    line = refused_line(publish(tmp_path / "in"))
    assert f"no smoke report ({tmp_path / 'in' / 'smoke.json'} does not exist)" in line


def test_smoke_on_another_arch_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    write_smoke_report(tmp_path / "in", [wheel], cc="8.9")
    line = refused_line(publish(tmp_path / "in"))
    assert f"smoke ran on other GPU (compute capability 8.9), target is {TARGET_CC}" in line


def test_failed_smoke_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    write_smoke_report(tmp_path / "in", [wheel], passed=False)
    assert "failed smoke" in refused_line(publish(tmp_path / "in"))


def test_smoke_without_the_target_gpu_is_not_smoke_tested_rather_than_failed(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    no_gpu = "GPU checks skipped: no GPU visible (nvidia-smi not found)"
    write_smoke_report(tmp_path / "in", [wheel], gpu_skip_reason=no_gpu)
    line = refused_line(publish(tmp_path / "in"))
    assert "not smoke-tested on the target GPU (GPU checks skipped: no GPU visible (nvidia-smi not found)" in line
    assert "failed smoke" not in line and "unknown GPU" not in line

    forced = publish(tmp_path / "in", "--force")
    [warning] = [line for line in forced.stderr.splitlines() if "warning:" in line]
    assert "not smoke-tested on the target GPU" in warning and "failed smoke" not in warning
    assert "marked not GPU-tested" in warning
    (name,) = index_listing(tmp_path / "index")
    assert read_wheel(tmp_path / "index" / "files" / name).provenance.to_json()["publish"]["gpu_tested"] is False

    # a check that ran and failed is a failure still
    write_smoke_report(tmp_path / "in", [wheel], gpu_skip_reason=no_gpu, failing=("import",))
    assert "failed smoke: import" in refused_line(publish(tmp_path / "in"))


def test_a_report_that_claims_a_pass_its_checks_do_not_show_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    report = write_smoke_report(tmp_path / "in", [wheel], passed=False)
    edited = json.loads(report.read_text())
    edited["passed"] = edited["wheels"][0]["passed"] = True  # passed is written for readers, not trusted
    report.write_text(json.dumps(edited))
    assert f"failed smoke: kernels ({report})" in refused_line(publish(tmp_path / "in"))


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda r: r.pop("target"), "target is missing"),
    (lambda r: r["wheels"][0].update(sha256=None), "wheels[0].sha256 is null, not text"),
    (lambda r: r["wheels"][0]["checks"][1].update(seconds="fast"), "wheels[0].checks[1].seconds is text, not a number"),
    (lambda r: r.update(gpu="H100"), "gpu is text, not an object"),
    (lambda r: r.update(schema=2), "schema 2 is newer than this gpuwheel reads (1): upgrade gpuwheel"),
])
def test_a_malformed_smoke_report_is_refused_naming_the_file_and_the_field(tmp_path: Path, publish, edit,
                                                                           problem):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    report = write_smoke_report(tmp_path / "in", [wheel])
    edited = json.loads(report.read_text())
    edit(edited)
    report.write_text(json.dumps(edited))
    assert refused_line(publish(tmp_path / "in")).startswith(
        f"gpuwheel: error: refusing to publish 1 wheel(s) for target {TARGET}: {wheel.name}: "
        f"smoke report {report}: {problem} (run")

    report.write_text("{not json")
    assert f"{wheel.name}: smoke report {report} is not JSON (" in refused_line(
        publish(tmp_path / "in"))


def test_smoke_report_of_another_build_is_refused(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record(), value="tested")
    write_smoke_report(tmp_path / "in", [wheel])
    make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record(), value="rebuilt")  # same name, new bytes
    assert "tested another file of that name (sha256 differs)" in refused_line(
        publish(tmp_path / "in"))


def test_smoke_report_flag_overrides_the_default(tmp_path: Path, publish):
    wheel = make_wheel(tmp_path / "in", "gw-alpha", provenance=audit_record())
    report = write_smoke_report(tmp_path, [wheel])  # not beside the wheels
    result = publish(tmp_path / "in", "--smoke-report", str(report))
    assert result.returncode == 0, result.stderr


def test_force_publishes_with_a_loud_warning_per_wheel(tmp_path: Path, publish):
    make_wheel(tmp_path / "in", "gw-alpha")  # neither audited nor smoke-tested
    passing_wheel(tmp_path / "in", "gw-beta")
    (tmp_path / "in" / "smoke.json").unlink()

    result = publish(tmp_path / "in", "--force", "--json")

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2
    assert "--force: published gw_alpha-1.0-py3-none-any.whl, which the gate would have refused: not audited" \
        in warnings[0]
    assert "gw_beta-1.0-py3-none-any.whl" in warnings[1] and "no smoke report" in warnings[1]
    report = json.loads(result.stdout)
    assert [w["action"] for w in report["wheels"]] == ["published", "published"]
    assert all(w["warnings"] for w in report["wheels"])
    assert "(marked not GPU-tested in its gpuwheel.json and the index)" in warnings[1]

    # What was let through travels with each file: its gpuwheel.json, and the index pages (index_listing
    # checks that they agree with it). The staged wheels stay as they were built.
    listed = index_listing(tmp_path / "index")
    alpha, beta = (read_wheel(tmp_path / "index" / "files" / name) for name in sorted(listed))
    no_report = f"no smoke report ({tmp_path / 'in' / 'smoke.json'} does not exist)"
    assert alpha.provenance == Provenance(publish=PublishMark(
        gpu_tested=False, skipped_audit=("not audited (no gw_alpha-1.0.dist-info/gpuwheel.json)",),
        skipped_smoke=(no_report,)))
    assert beta.provenance.to_json()["publish"]["skipped"] == {"audit": [], "smoke": [no_report]}
    assert beta.provenance.audit == Provenance.from_json(audit_record()).audit  # the build's record is kept beside the mark
    assert read_wheel(tmp_path / "in" / beta.filename).provenance == Provenance.from_json(audit_record())
    assert [w["sha256"] for w in report["wheels"]] == [alpha.sha256, beta.sha256]

    again = publish(tmp_path / "in", "--force", "--json")  # the mark is reproducible
    assert [w["action"] for w in json.loads(again.stdout)["wheels"]] == ["skipped", "skipped"], again.stderr


def test_force_marks_only_what_it_let_through(tmp_path: Path, publish):
    passing_wheel(tmp_path / "in", "gw-alpha")
    result = publish(tmp_path / "in", "--force")
    assert result.returncode == 0, result.stderr
    assert "--force skipped nothing for it" in result.stderr
    (name,) = index_listing(tmp_path / "index")
    assert read_wheel(tmp_path / "index" / "files" / name).provenance.publish is None
    assert sha256(tmp_path / "index" / "files" / name) == sha256(tmp_path / "in" / name)


def test_target_is_read_from_the_wheels_when_not_named(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    passing_wheel(tmp_path / "in", "gw-alpha")
    result = gpuwheel_script.run("publish", "--wheels", tmp_path / "in", cwd=tmp_path, GPUWHEEL_RECIPES=publish_recipes)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wheels" / TARGET / "files" / "gw_alpha-1.0-py3-none-any.whl").is_file()


def test_wheels_naming_no_target_need_one_named(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    make_wheel(tmp_path / "in", "gw-alpha")
    result = gpuwheel_script.run("publish", "--wheels", tmp_path / "in", cwd=tmp_path, GPUWHEEL_RECIPES=publish_recipes)
    assert result.returncode == 13
    assert result.stderr.strip() == ("gpuwheel: error: gw_alpha-1.0-py3-none-any.whl names no target (no "
                                     "readable gpuwheel.json) (name the TARGET: gpuwheel publish TARGET --wheels DIR)")


def test_gate_lists_every_refused_wheel(tmp_path: Path):
    wheels = [read_wheel(make_wheel(tmp_path, name)) for name in ("gw-a", "gw-b")]
    gate = PublishGate(target=TARGET, compute_capability=TARGET_CC, smoke_report=None)
    with pytest.raises(PublishError, match=r"refusing to publish 2 wheel\(s\) .*gw_a-1.0.*gw_b-1.0"):
        check_gate(wheels, gate)
