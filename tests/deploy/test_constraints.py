"""constraints/serving.txt: the locked versions the image and the development venv install.

It must pin every serving dependency at a version pyproject.toml allows, agree with every extra
(the development venv installs them all with it), be current (what `make constraints` writes
from this environment), and be used by the Dockerfile and by `make`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy import dockerfile as df

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "constraints" / "serving.txt"
SERVING_EXTRAS = ("otel", "data")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        assert canonical(name) not in out, f"pinned twice: {name}"
        out[canonical(name)] = Version(version)
    return out


def project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def requirements(*groups: str) -> list[Requirement]:
    meta = project()
    deps: list[str] = list(meta["dependencies"]) if "base" in groups else []  # type: ignore[call-overload]
    extras: dict[str, list[str]] = meta["optional-dependencies"]  # type: ignore[assignment]
    for group in groups:
        if group != "base":
            deps += extras[group]
    return [Requirement(r) for r in deps if canonical(Requirement(r).name) != "rankserve"]


def test_every_serving_dependency_is_pinned_within_its_range() -> None:
    locked = pins()
    for req in requirements("base", *SERVING_EXTRAS):
        name = canonical(req.name)
        assert name in locked, f"{req.name} is a serving dependency but not in {LOCK.name}: run `make constraints`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req} but {LOCK.name} pins {locked[name]}"
    for tool in ("grpcio-tools",):  # the Dockerfile's build-time stub generator
        assert tool in locked


def test_pins_agree_with_every_extra() -> None:
    """The development venv installs all extras with these constraints (`make`): no pin may
    contradict a direct requirement of any extra, and torch stays at the train extra's version."""
    locked = pins()
    extras = list(project()["optional-dependencies"])  # type: ignore[call-overload]
    for req in requirements("base", *extras):
        version = locked.get(canonical(req.name))
        if version is not None:
            assert req.specifier.contains(version, prereleases=True), f"{req} but {LOCK.name} pins {version}"
    assert "torch" not in locked or locked["torch"] == Version("2.13.0")
    assert not {"pandas", "pyarrow"} & {canonical(r.name) for r in requirements("base")}, "the data extra's"


def test_lock_is_current() -> None:
    """What `make constraints` would write from this environment (the tested development venv)."""
    fresh = subprocess.run([sys.executable, str(REPO / "constraints" / "freeze.py")], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    assert fresh == LOCK.read_text(), f"{LOCK.name} is stale: run `make constraints`"


def test_image_and_make_install_with_the_lock() -> None:
    installs = [i.args for s in df.stages() for i in s.all("RUN") if "pip install" in i.args]
    assert installs and all("-c constraints/serving.txt" in args for args in installs), installs
    makefile = (REPO / "Makefile").read_text()
    assert "install -q -c constraints/serving.txt -e '.[train,dev,loadtest,otel]'" in makefile
