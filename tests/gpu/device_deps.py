"""Python wheels for the GPU machine, which has no network: staged here, carried, installed there.

    python3 tests/gpu/device_deps.py stage GROUP...       # here: download, check, split into batches
    python3 tests/gpu/device_deps.py install [GROUP...]   # there: install what was carried
    python3 tests/gpu/device_deps.py pins REQUIREMENT...  # here: pinned lines with hashes, to update the list

The groups and their pinned wheels (sha256) are in device_deps.toml beside this file. `stage` puts
each group's wheels into `.device/GROUP/batch-N/` of the work tree (git-ignored), each batch at most
`batch_mib` MiB so that one device call carries one batch beside the work tree (64 MiB in all), with
a MANIFEST.json. `install` installs every carried batch into /tmp/site (`pip install --no-index
--no-deps`, merged into the target so that namespace packages split over batches stay whole); a wheel
already installed there is skipped, so each call may run it again. A group's `fallbacks` are newer
releases of packages the image already has: each is installed only when the image's own version does
not satisfy what the group's wheels (their METADATA) or vLLM (`requires`) ask of it. The last line
printed is the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PINS = HERE / "device_deps.toml"
DEVICE = REPO / ".device"
TARGET = Path(os.environ.get("GPUWHEEL_DEVICE_SITE", "/tmp/site"))
INSTALLED = ".gpuwheel-installed"  # under the target: one empty file per installed wheel
MIB = 1 << 20


def load_pins() -> dict:
    with open(PINS, "rb") as handle:
        return tomllib.load(handle)


def pinned(line: str) -> tuple[str, str, str]:
    """"name==version --hash=sha256:HEX" → (canonical name, version, hex)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})\s*", line)
    if not match:
        raise SystemExit(f"device_deps.toml: '{line}' is not 'name==version --hash=sha256:HEX'")
    return canonical(match.group(1)), match.group(2), match.group(3)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_name(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return canonical(name), version


# ---- stage (here) --------------------------------------------------------------------------------
def download(pins: dict, lines: list[str], dest: Path) -> None:
    """pip download of exactly these files for the GPU machine's Python and platform, hashes checked."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write("".join(f"{line}\n" for line in lines))
    platforms = [arg for platform in pins["platforms"] for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--only-binary", ":all:", "--python-version", pins["python"], *platforms,
               "--require-hashes", "-r", requirements.name, "-d", str(dest)]
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    try:
        subprocess.run(command, check=True, env=env)
    finally:
        os.unlink(requirements.name)


def batches(files: list[tuple[Path, str]], limit: int) -> list[list[tuple[Path, str]]]:
    """First fit, largest first: as few batches of at most `limit` bytes as that finds."""
    packed: list[list[tuple[Path, str]]] = []
    sizes: list[int] = []
    for path, role in sorted(files, key=lambda item: (-item[0].stat().st_size, item[0].name)):
        size = path.stat().st_size
        if size > limit:
            raise SystemExit(f"{path.name} is {size / MIB:.1f} MiB, more than a batch ({limit / MIB:.0f} MiB)")
        for index, used in enumerate(sizes):
            if used + size <= limit:
                packed[index].append((path, role))
                sizes[index] += size
                break
        else:
            packed.append([(path, role)])
            sizes.append(size)
    return packed


def stage(groups: list[str]) -> int:
    pins = load_pins()
    limit = int(pins["batch_mib"] * MIB)
    lines = []
    for group in groups:
        spec = pins[group]
        wanted = {pinned(line): "wheel" for line in spec["wheels"]}
        wanted.update({pinned(line): "fallback" for line in spec.get("fallbacks", ())})
        cache = DEVICE / ".downloads"
        download(pins, list(spec["wheels"]) + list(spec.get("fallbacks", ())), cache)
        by_hash = {}
        for path in cache.glob("*.whl"):
            by_hash.setdefault(sha256(path), path)
        files = []
        for (name, version, digest), role in wanted.items():
            if digest not in by_hash:
                raise SystemExit(f"{group}: no downloaded wheel of {name}=={version} has sha256 {digest}")
            files.append((by_hash[digest], role))
        root = DEVICE / group
        shutil.rmtree(root, ignore_errors=True)
        packed = batches(files, limit)
        for number, batch in enumerate(packed, 1):
            directory = root / f"batch-{number}"
            directory.mkdir(parents=True)
            manifest = []
            for path, role in sorted(batch, key=lambda item: item[0].name):
                shutil.copy2(path, directory / path.name)
                manifest.append({"file": path.name, "sha256": sha256(path), "role": role})
            (directory / "MANIFEST.json").write_text(json.dumps({"group": group, "batch": number, "of": len(packed),
                                                                 "wheels": manifest}, indent=1) + "\n")
        total = sum(path.stat().st_size for path, _ in files)
        sizes = ", ".join(f"batch-{n}: {sum(p.stat().st_size for p, _ in b) / MIB:.1f} MiB"
                          for n, b in enumerate(packed, 1))
        lines.append(f"{group}: {len(files)} wheels ({sum(r == 'fallback' for _, r in files)} fallbacks), "
                     f"{total / MIB:.1f} MiB in {len(packed)} batch(es) under {root.relative_to(REPO)} ({sizes})")
    for line in lines:
        print(line)
    return 0


# ---- install (on the GPU machine) ----------------------------------------------------------------
def carried(group: str) -> list[Path]:
    return sorted((DEVICE / group).glob("batch-*/MANIFEST.json"), key=lambda p: int(p.parent.name.split("-")[1]))


def image_versions() -> dict[str, str]:
    """The interpreter's own distributions, without the target (what the image has)."""
    import importlib.metadata

    path = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(TARGET.resolve())]
    versions: dict[str, str] = {}
    for distribution in importlib.metadata.distributions(path=path):  # in sys.path order: the first imports
        if distribution.metadata["Name"]:
            versions.setdefault(canonical(distribution.metadata["Name"]), distribution.version)
    return versions


def requirements_of(wheel: Path):
    """The Requires-Dist of a wheel that apply here (no extras asked for)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                yield requirement


def choose(group_spec: dict, wheels: dict[str, tuple[Path, str]], image: dict[str, str]) -> tuple[list, list]:
    """The wheels to install: every 'wheel', and each fallback whose package the image lacks or has in a
    version that a chosen wheel's METADATA or vLLM's `requires` excludes. Returns (chosen, reasons)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    chosen = {name: item for name, item in wheels.items() if item[1] == "wheel"}
    reasons = []
    asked = [Requirement(text) for text in group_spec.get("requires", ())]
    changed = True
    while changed:  # a chosen fallback may ask more of another package the image has
        changed = False
        demands = asked + [r for path, _ in chosen.values() for r in requirements_of(path)]
        for name, (path, role) in wheels.items():
            if role != "fallback" or name in chosen:
                continue
            specifiers = [r.specifier for r in demands if canonical(r.name) == name]
            have = image.get(name)
            unmet = sorted({str(s) for s in specifiers if have is None or not s.contains(Version(have), prereleases=True)})
            if unmet:
                chosen[name] = (path, role)
                reasons.append(f"{name} {wheel_name(path.name)[1]} (image has {have or 'none'}, "
                               f"needed {'; '.join(unmet)})")
                changed = True
    for requirement in asked:  # vLLM's bounds that no staged wheel covers: say so, nothing to install
        name, have = canonical(requirement.name), image.get(canonical(requirement.name))
        if name not in wheels and (have is None or not requirement.specifier.contains(Version(have), prereleases=True)):
            reasons.append(f"{name}: image has {have or 'none'}, vLLM asks {requirement.specifier} (not staged)")
    return list(chosen.values()), reasons


def install(groups: list[str]) -> int:
    pins = load_pins()
    groups = groups or [g for g in pins if isinstance(pins[g], dict) and carried(g)]
    marks = TARGET / INSTALLED
    marks.mkdir(parents=True, exist_ok=True)
    image = image_versions()
    summary, failed = [], False
    for group in groups:
        spec = pins[group]
        manifests = [json.loads(p.read_text()) | {"dir": p.parent} for p in carried(group)]
        wheels = {}
        for manifest in manifests:
            for entry in manifest["wheels"]:
                path = manifest["dir"] / entry["file"]
                if sha256(path) != entry["sha256"]:
                    print(f"{group}: {path} does not match its MANIFEST sha256; not installed")
                    failed = True
                    continue
                wheels[wheel_name(entry["file"])[0]] = (path, entry["role"])
        chosen, reasons = choose(spec, wheels, image)
        todo = [path for path, _ in chosen if not (marks / path.name).exists()]
        if todo:
            with tempfile.TemporaryDirectory(prefix="device-deps-") as staging:
                done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                                       "--no-index", "--no-deps", "--no-compile", "--target", staging,
                                       *map(str, todo)])
                if done.returncode != 0:
                    failed = True
                    summary.append(f"{group}: pip install failed (exit {done.returncode})")
                    continue
                # merge, not replace: namespace packages (opentelemetry/, …) come from several wheels
                shutil.copytree(staging, TARGET, dirs_exist_ok=True, symlinks=True)
            for path in todo:
                (marks / path.name).touch()
        expected = {pinned(line)[0] for line in spec["wheels"]}
        have = {wheel_name(m.name)[0] for m in marks.iterdir()}
        missing = sorted(expected - have)
        waiting = f"; still to carry: {len(missing)} wheel(s) ({', '.join(missing[:6])}{', …' if len(missing) > 6 else ''})" \
            if missing else ""
        total = manifests[0]["of"] if manifests else "?"
        summary.append(f"{group}: {len(todo)} installed, {len(chosen) - len(todo)} already there, from "
                       f"{len(manifests)} of {total} batch(es)"
                       + (f"; fallbacks and notes: {' | '.join(reasons)}" if reasons else "; no fallback needed")
                       + waiting)
    for line in summary or ["nothing carried: no .device/GROUP/batch-N in this work tree"]:
        print(line)
    print(f"device deps: {'FAILED' if failed else 'ok'} ({', '.join(groups) or 'no group'}) in {TARGET}; "
          f"run with PYTHONPATH={TARGET} PATH={TARGET}/bin:$PATH")
    return 1 if failed else 0


# ---- pins (here, to update device_deps.toml) -----------------------------------------------------
def pins_for(requirements: list[str]) -> int:
    pins = load_pins()
    with tempfile.TemporaryDirectory() as directory:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
            listing.write("".join(f"{r}\n" for r in requirements))
        platforms = [arg for platform in pins["platforms"] for arg in ("--platform", platform)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--only-binary", ":all:", "--python-version", pins["python"], *platforms,
                        "-r", listing.name, "-d", directory], check=True, stdout=subprocess.DEVNULL)
        os.unlink(listing.name)
        for path in sorted(Path(directory).glob("*.whl"), key=lambda p: p.name.lower()):
            name, version = path.name.split("-")[:2]
            print(f'    "{name}=={version} --hash=sha256:{sha256(path)}",  # {path.stat().st_size / MIB:.1f} MiB')
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("stage").add_argument("groups", nargs="+")
    commands.add_parser("install").add_argument("groups", nargs="*")
    commands.add_parser("pins").add_argument("requirements", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "stage":
        return stage(args.groups)
    if args.command == "install":
        return install(args.groups)
    return pins_for(args.requirements)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
