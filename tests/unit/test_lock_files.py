"""The lock files agree with the human-edited lists they are compiled from (scripts/lock).

Offline and cheap: every direct requirement must be pinned in its lock with a version it allows,
the runtime pins must be the same in both locks, and the locks pin everything with ``==``. A
lock left stale after an edit of a ``.in`` list fails here before a fresh machine finds out."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a pip file, following ``-r`` (not ``-c``: constraints add none)."""
    found: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#") or line.startswith("-c "):
            continue
        if line.startswith("-r "):
            found += requirements(path.parent / line[3:].strip())
            continue
        found.append(Requirement(line))
    return found


def pins(lock: Path) -> dict[str, str]:
    locked: dict[str, str] = {}
    for req in requirements(lock):
        (spec,) = req.specifier
        assert spec.operator == "==", f"{lock.name}: {req} is not pinned"
        locked[canonicalize_name(req.name)] = spec.version
    return locked


@pytest.mark.parametrize(("source", "lock"), [("requirements.in", "requirements.txt"),
                                              ("requirements-dev.in", "requirements-dev.txt"),
                                              ("requirements-ray.in", "requirements-ray.txt")])
def test_every_direct_requirement_is_locked_at_a_version_it_allows(source, lock):
    locked = pins(REPO / lock)
    for req in requirements(REPO / source):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in {source} but not in {lock}: run scripts/lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{lock} has {name}=={locked[name]}, {source} asks {req}"


def test_the_dev_lock_pins_the_server_exactly_as_its_lock_does():
    server, dev = pins(REPO / "requirements.txt"), pins(REPO / "requirements-dev.txt")
    assert {name: dev.get(name) for name in server} == server


def test_the_ray_lock_moves_no_pin_of_the_server_or_dev_locks():
    # CI installs requirements-ray.txt on top of requirements-dev.txt: a shared package at
    # another version would silently replace the one the other locks were tested with.
    ray = pins(REPO / "requirements-ray.txt")
    for lock in ("requirements.txt", "requirements-dev.txt"):
        other = pins(REPO / lock)
        assert {n: v for n, v in other.items() if n in ray and ray[n] != v} == {}, lock
    assert set(pins(REPO / "requirements.txt")) <= set(ray)


def test_torch_is_locked_without_a_build_tag():
    # `torch==2.13.0+cpu` would exist on no GPU host's index: the plain pin gives each host its build.
    assert pins(REPO / "requirements.txt")["torch"] == "2.13.0"
