"""The two lock files agree with each other on triton and with pyproject's ranges."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read_lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{name}: '{line}' is not an exact pin"
        pins[m.group(1).lower().replace("_", "-")] = Version(m.group(2))
    return pins


def pyproject_requirements() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in data["dependencies"]]
    for extra in data["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_locks_agree_on_triton_and_pin_the_validated_torch():
    cpu, gpu = read_lock("cpu.lock"), read_lock("gpu.lock")
    assert cpu["triton"] == gpu["triton"] == Version("3.6.0")
    assert gpu["torch"] == Version("2.11.0")
    assert cpu["torch"] == Version("2.13.0")


def test_locks_satisfy_pyproject_ranges():
    for lock in ("cpu.lock", "gpu.lock"):
        pins = read_lock(lock)
        for req in pyproject_requirements():
            name = req.name.lower().replace("_", "-")
            assert name in pins, f"{lock} does not pin {name}"
            assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} !~ {req}"


def test_locks_pin_the_same_versions_of_everything_they_share():
    cpu, gpu = read_lock("cpu.lock"), read_lock("gpu.lock")
    shared = (set(cpu) & set(gpu)) - {"torch"}
    assert {n: cpu[n] for n in shared} == {n: gpu[n] for n in shared}


def test_import_does_not_need_triton():
    code = ("import sys; sys.modules['triton'] = None; import muse_lm, muse_lm.ops, muse_lm.layers, "
            "muse_lm.models; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
