"""Write constraints/serving.txt: the exact versions of the serving install, from an environment.

The pins are the serving dependencies of pyproject.toml (the base `dependencies` and the `otel`
and `data` extras) and everything they pull in, at the versions installed in the environment
that runs this script, plus `grpcio-tools` (the Dockerfile's stub generator). Run it from the
development virtualenv, which holds every extra at once, so the pins never conflict with the
`train`, `dev` and `loadtest` extras:

    make constraints          # .venv/bin/python constraints/freeze.py > constraints/serving.txt

To move to newer releases: upgrade the development venv (`.venv/bin/pip install -U -e '.[...]'`
without `-c`), run the tests, then regenerate.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("otel", "data")
BUILD_TOOLS = ("grpcio-tools",)
HEADER = """\
# Pinned versions of the serving install (`pip install '.[otel]'`), the `data` extra and the
# Dockerfile's stub generator (grpcio-tools), with everything they pull in. Constraints only:
# nothing here is installed unless something asks for it. Used by the Dockerfile
# (`pip install -c constraints/serving.txt`) and by `make` for the development venv.
# Generated from the development venv; regenerate with `make constraints` (constraints/freeze.py).
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs + [Requirement(name) for name in BUILD_TOOLS]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version of every distribution `roots` need, following active markers."""
    project = canonical(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    pins: dict[str, str] = {}
    queue = list(roots)
    seen: set[tuple[str, frozenset[str]]] = set()  # a distribution once per set of extras asked of it
    while queue:
        req = queue.pop()
        name = canonical(req.name)
        key = (name, frozenset(req.extras))
        if key in seen or name == project:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        version = dist.version
        if not req.specifier.contains(version, prereleases=True):
            raise SystemExit(f"{req.name} {version} is installed, but {req} is required: update the venv first")
        pins[name] = version
        for raw in dist.requires or []:
            child = Requirement(raw)
            envs = [{"extra": e} for e in ("", *req.extras)]
            if child.marker is None or any(child.marker.evaluate(env) for env in envs):
                queue.append(child)
    return pins


def main() -> int:
    pins = closure(project_requirements())
    sys.stdout.write(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
