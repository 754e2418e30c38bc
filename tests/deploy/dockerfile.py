"""A small reader of the Dockerfile and .dockerignore, enough for the deployment tests.

Not a full parser: it joins continuation lines, drops comments and splits instructions into
stages, which is all the checks need (COPY sources, ENV, USER, EXPOSE, HEALTHCHECK per stage).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # the rest of the line, continuations joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV of this stage (KEY=VALUE forms; later ones win)."""
        values: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if sep:
                    values[key] = value
        return values


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    return out


def stages(text: str | None = None) -> list[Stage]:
    text = DOCKERFILE.read_text() if text is None else text
    result: list[Stage] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            parts = ins.args.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append(Stage(parts[0], name, []))
        elif result:
            result[-1].instructions.append(ins)
    return result


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    line: int


def copies(stage: Stage) -> list[Copy]:
    out = []
    for ins in stage.all("COPY"):
        tokens = shlex.split(ins.args)
        flags = [t for t in tokens if t.startswith("--")]
        paths = [t for t in tokens if not t.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        out.append(Copy(paths[:-1], paths[-1], from_stage, ins.line))
    return out


# -- .dockerignore (Docker's rules: patterns in order, the last match wins, `!` re-includes, a
# pattern that matches a directory covers everything under it) ------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignore_patterns(text: str | None = None) -> list[tuple[bool, str]]:
    """(negated, pattern) per line of .dockerignore, in order."""
    text = DOCKERIGNORE.read_text() if text is None else text
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, (line[1:] if negated else line).strip().strip("/")))
    return patterns


def ignore_rules(text: str | None = None) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern of .dockerignore, in order."""
    return [(negated, _pattern_regex(pattern)) for negated, pattern in ignore_patterns(text)]


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `path` (relative to the context, '/'-separated) is left out of the build context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def context_files(root: Path = REPO) -> list[str]:
    """Every file that `docker build` would send as the context, relative paths, sorted."""
    rules = ignore_rules()
    reincluded = [pattern for negated, pattern in ignore_patterns() if negated]
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if base == "." else base + "/"
        # skip ignored directories (.venv, .git, ...) unless a `!pattern` reaches inside them
        dirnames[:] = [
            d for d in dirnames
            if not is_ignored(rel_dir + d, rules) or any(p.startswith(rel_dir + d + "/") for p in reincluded)
        ]
        files.extend(rel_dir + f for f in filenames if not is_ignored(rel_dir + f, rules))
    return sorted(files)
