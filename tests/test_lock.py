"""The committed lock is what `make` installs: complete, exact, and inside pyproject's ranges."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    """Package name -> the exact version `requirements/lock.txt` pins."""
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if found:
            pins[canonicalize_name(found.group(1))] = Version(found.group(2))
    return pins


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_requirement_and_test_extra_is_pinned_inside_its_range():
    pins = locked()
    specs = project()["dependencies"] + project()["optional-dependencies"]["test"]
    requirements = [Requirement(spec) for spec in specs]
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in the lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {name}=={pins[name]} outside pyproject's {requirement.specifier}: run make lock"


def test_transformers_has_a_floor_and_a_ceiling_and_the_lock_is_inside_them():
    spec = next(Requirement(s).specifier for s in project()["dependencies"] if s.startswith("transformers"))
    assert {s.operator for s in spec} == {">=", "<"}
    assert spec.contains(locked()["transformers"])


def test_torch_is_pinned_without_a_local_label():
    """`torch==2.13.0` is met by the CPU wheel here and by the CUDA wheel on a GPU machine; `+cpu` would not be."""
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", lock, re.M)
    assert not re.search(r"^\S+==\S+\+", lock, re.M)
