"""The GPU kit: the packages the GPU acceptance run needs that the GPU machine's image lacks, carried there
as wheels, since that machine reaches no package registry (docs/GPU.md).

- requirements/gpu_kit.txt pins the kit; requirements/gpu_image.txt lists what the image already has.
- scripts/gpu_kit.sh downloads the kit into .whl/ here, then runs `python -m harnesses.gpu_kit check .whl`:
  one wheel per pin, tags the machine's Python 3.12 on x86_64 Linux installs, nothing the image has, and every
  requirement of every wheel met by the kit or by the image (the exceptions below, each with its reason).
- scripts/gpu_acceptance.sh --kit .whl installs it there with `install_kit` (pip --no-index --no-deps --target).

Standard library only (plus `packaging`, or pip's copy of it): it runs before anything of the kit is installed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT

KIT_PINS = REPO_ROOT / "requirements" / "gpu_kit.txt"
IMAGE_PACKAGES = REPO_ROOT / "requirements" / "gpu_image.txt"
# Wheels installed only where the image lacks what they provide, from the kit's fallback/ folder: detectron2's
# model_zoo and mmengine's is_installed import pkg_resources, which setuptools 82 removed (torch 2.11 itself asks
# for setuptools<82, so the image most likely has it).
IF_MISSING = {"setuptools==81.0.0": "pkg_resources"}
# Requirements a kit wheel states that the run knowingly leaves unmet: (wheel, requirement's name) -> why.
VERSION_EXCEPTIONS = {
    ("sal-detectron2", "numpy"): "asks numpy<2; the image's numpy 2 runs the code paths used (ENVIRONMENT_NOTES.md)",
}
# Another distribution of the same import name that the image has: mmcv-lite / mmengine ask for opencv-python.
SAME_MODULE = {"opencv-python": "opencv-python-headless"}
# What the machine's python3 is, for the requirements' environment markers.
TARGET_ENVIRONMENT = dict(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
                          platform_python_implementation="CPython", os_name="posix", sys_platform="linux",
                          platform_system="Linux", platform_machine="x86_64", extra="")
IMPORT_CHECK = ("mae_transfer", "backbones", "detectron2", "mmseg", "backbones.detectron2", "backbones.mmseg")
# Beside the pure-Python py3-none-any: CPython 3.12 wheels (or abi3 ones of an earlier 3.x) for x86_64 Linux.
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)"
                         r"\.whl$")


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip's own copy, present wherever pip is
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a list of `name==version` or bare `name` lines ('' for no version)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()) or (_ and not version.strip()):
            raise MaeTransferError(f"{path}:{number}: expected 'name==version' or 'name', found {raw!r}")
        pins[canonical(name)] = version.strip()
    return pins


def wheel_tags_ok(filename: str) -> bool:
    """Whether pip on the GPU machine (CPython 3.12, x86_64 Linux, glibc 2.28+) installs this wheel file."""
    match = _WHEEL_NAME.match(filename)
    if not match:
        return False
    py, abi, plat = (set(match[k].split(".")) for k in ("py", "abi", "plat"))
    if plat == {"any"}:
        return bool(py & {"py3", "py312", "cp312"}) and abi <= {"none", "abi3", "cp312"}
    if not any(re.fullmatch(r"(manylinux_2_\d+|manylinux2014|manylinux2010|manylinux1)_x86_64", p) for p in plat):
        return False
    if "cp312" in py and abi & {"cp312", "abi3", "none"}:
        return True
    return "abi3" in abi and any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 for p in py)


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(meta) != 1:
            raise MaeTransferError(f"{path}: expected one *.dist-info/METADATA in the wheel, found {len(meta)}")
        headers = HeaderParser().parsestr(zf.read(meta[0]).decode("utf-8", errors="replace"))
    return headers["Name"], headers["Version"], headers.get_all("Requires-Dist") or []


def check_kit(kit: Path, pins: dict[str, str], image: dict[str, str]) -> list[str]:
    """Problems of the kit folder's wheels (none: it is complete for the image); fallback/ wheels are checked
    for their tags only."""
    Requirement, Version = _packaging()
    problems: list[str] = []
    for name in sorted(set(pins) & set(image)):
        problems.append(f"{name}: pinned for the kit, but the image has it (requirements/gpu_image.txt)")
    wheels: dict[str, tuple[Path, str, list[str]]] = {}
    for path in sorted(kit.glob("*.whl")) + sorted(kit.glob("fallback/*.whl")):
        if not wheel_tags_ok(path.name):
            problems.append(f"{path.name}: not installable by CPython 3.12 on x86_64 Linux (its tags)")
        if path.parent != kit:
            continue
        name, version, requires = wheel_metadata(path)
        key = canonical(name)
        if key in wheels:
            problems.append(f"{key}: two wheels ({wheels[key][0].name}, {path.name}); pip installs one of each")
        elif key not in pins:
            problems.append(f"{path.name}: not in requirements/gpu_kit.txt (a stale download?)")
        elif pins[key] and Version(version) != Version(pins[key]):
            problems.append(f"{path.name}: version {version}, requirements/gpu_kit.txt pins {pins[key]}")
        wheels[key] = (path, version, requires)
    problems += [f"{name}=={pins[name]}: no wheel in {kit}" for name in pins if name not in wheels]
    for key, (path, _, requires) in sorted(wheels.items()):
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENVIRONMENT):
                continue  # another Python or platform, or an optional extra
            dep = canonical(req.name)
            if dep in wheels:
                have, where = wheels[dep][1], "the kit"
            elif dep in image or SAME_MODULE.get(dep) in image:
                have, where = image.get(dep, ""), "the image"
            else:
                problems.append(f"{path.name} requires {line}: neither in the kit nor in the image")
                continue
            if have and req.specifier and not req.specifier.contains(have, prereleases=True) \
                    and (key, dep) not in VERSION_EXCEPTIONS:
                problems.append(f"{path.name} requires {line}: {where} has {dep} {have}")
    return problems


def kit_listing(kit: Path) -> str:
    """One line per wheel (size in MiB) and the total."""
    files = sorted(kit.glob("*.whl")) + sorted(kit.glob("fallback/*.whl"))
    lines = [f"  {f.stat().st_size / 2 ** 20:6.2f} MiB  {f.relative_to(kit)}" for f in files]
    total = sum(f.stat().st_size for f in files)
    return "\n".join([*lines, f"  {total / 2 ** 20:6.2f} MiB  in all ({len(files)} wheels)"])


# ---------------------------------------------------------------------------------------------- on the machine
def _run(cmd: list[str], log, env: dict[str, str] | None = None) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT).returncode


def kit_wheels(kit: Path) -> list[Path]:
    """The kit folder's wheels; none is one error line (checked before the run starts too: without the kit, the
    machine's python lacks the project's stack, and the run would stop at its first import)."""
    wheels = sorted(kit.glob("*.whl"))
    if not wheels:
        raise MaeTransferError(f"--kit {kit}: no *.whl files there; expected the wheels of scripts/gpu_kit.sh "
                               "(make the kit with it, docs/GPU.md)")
    return wheels


def install_kit(kit: Path, site: Path, log_path: Path, imports: tuple[str, ...] = IMPORT_CHECK) -> float:
    """Install the kit's wheels offline into `site` with this interpreter's pip (no dependency resolution: the kit
    was checked against the image where it was made), its fallback/ wheels only where their import fails, then
    import `imports` in a fresh process with `site` and the repo on PYTHONPATH; the log goes to `log_path`.
    Returns the seconds it took; raises MaeTransferError naming the log on failure."""
    start = time.time()
    wheels = kit_wheels(kit)
    site.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]), "PYTHONDONTWRITEBYTECODE": "1"}
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"[kit] {sys.executable} ({sys.version.split()[0]}): {len(wheels)} wheels from {kit} into {site}\n")
        if _run(pip + [str(w) for w in wheels], log) != 0:
            raise MaeTransferError(f"installing the kit {kit} into {site} failed; see {log_path}")
        for pin, module in IF_MISSING.items():
            if _run([sys.executable, "-c", f"import {module}"], log, env) == 0:
                log.write(f"[kit] {module} imports: {pin} not needed\n")
                continue
            fallback = sorted(kit.glob(f"fallback/{canonical(pin.split('==')[0]).replace('-', '_')}-*.whl"))
            if not fallback or _run(pip + [str(fallback[0])], log) != 0:
                raise MaeTransferError(f"the image has no {module} and the kit's fallback {pin} did not install "
                                       f"(looked in {kit / 'fallback'}); see {log_path}")
        code = (f"import importlib, sys\nfor m in {list(imports)!r}:\n    importlib.import_module(m)\n"
                "import torch, numpy\nprint('[kit] imports ok:', ', '.join(" + repr(list(imports)) + "), '; torch',"
                " torch.__version__, 'numpy', numpy.__version__)")
        if _run([sys.executable, "-c", code], log, env) != 0:
            raise MaeTransferError(f"the kit installed but an import failed ({', '.join(imports)}); see {log_path}")
        _run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"], log, env)  # for the record only
        log.write(f"[kit] ready in {time.time() - start:.0f} s\n")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # for this process's children: every row's process
    sys.path[:0] = [str(site), str(REPO_ROOT)]
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harnesses.gpu_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check"], help="check: the kit folder is complete for the image")
    parser.add_argument("kit", type=Path, help="the kit folder (.whl)")
    args = parser.parse_args(argv)
    problems = check_kit(args.kit, read_pins(KIT_PINS), read_pins(IMAGE_PACKAGES))
    print(kit_listing(args.kit))
    if problems:
        raise MaeTransferError(f"the kit in {args.kit} is not ready: " + "; ".join(problems))
    exceptions = "; ".join(f"{wheel} {why}" for (wheel, _), why in VERSION_EXCEPTIONS.items())
    print(f"[gpu_kit] {args.kit}: every requirement is met by the kit or by the image (known exceptions: "
          f"{exceptions})")
    return 0


if __name__ == "__main__":
    from mae_transfer.cli import run_cli

    sys.exit(run_cli(main))
