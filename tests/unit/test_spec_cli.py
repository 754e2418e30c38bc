"""A bad feature spec or data file through the command line, as a user meets it: `rankserve train`
and `rankserve ingest` exit 2 with one error line that names the field, column or file to fix,
never a traceback. Each case is the shop data set (tests/shop_data.py) with one thing broken.

Every case is its own `python -m service.cli` process, whose time is mostly imports (torch), so a
module fixture runs them all side by side once and each test checks its own."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shop_data import write_shop
from tests.unit.test_cli import rankserve


def error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The one line the command wrote on failure. stderr also carries the JSON log records of what
    ran before the error (e.g. "read events.csv"): none may be an error, and no other line may be."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines: list[str] = []
    levels: list[str] = []
    for line in done.stderr.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "level" in record:
            levels.append(str(record["level"]))
        else:
            lines.append(line)
    assert not {"ERROR", "CRITICAL"} & set(levels), done.stderr
    assert len(lines) == 1, done.stderr
    prefix = f"rankserve {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)


def edit_spec(spec: Path, old: str, new: str) -> None:
    text = spec.read_text()
    assert old in text
    spec.write_text(text.replace(old, new))


def drop_column(table: Path, column: str) -> None:
    with table.open(newline="") as f:
        rows = list(csv.reader(f))
    k = rows[0].index(column)
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([r[:k] + r[k + 1 :] for r in rows])


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# case -> how it breaks the shop data set (given its spec file); `ingest_*` cases run ingest, the rest train
BREAKS: dict[str, Callable[[Path], object]] = {
    "unknown_key": lambda spec: edit_spec(spec, "weight: 10}", "weight: 10, wieght: 3}"),
    "unknown_action": lambda spec: edit_spec(spec, "positive: [buy]", "positive: [bought]"),
    "parent_cycle": lambda spec: edit_spec(spec, "weight: 1}", "weight: 1, parent: buy}"),
    "missing_side_column": lambda spec: drop_column(spec.parent / "items.csv", "seller"),
    "missing_events": lambda spec: (spec.parent / "events.csv").unlink(),
    "ingest_missing_side_column": lambda spec: drop_column(spec.parent / "users.csv", "age"),
}


@dataclass(frozen=True)
class Run:
    spec: Path
    out: Path
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every case of BREAKS, run. Ingest gets no Redis server: the URL names a port nobody listens
    on, so an ingest that reached the store would fail differently (exit 1), and no embedded
    Valkey starts; the data set must be read, and refused, before the first store command."""
    cases: dict[str, tuple[Path, Path, tuple[str, ...]]] = {}
    for name, break_it in BREAKS.items():
        directory = tmp_path_factory.mktemp(name)
        spec = write_shop(directory / "shop", users=10, items=20, untouched_items=0)
        break_it(spec)
        out = directory / "run"
        if name.startswith("ingest"):
            args: tuple[str, ...] = (
                "ingest",
                "--spec",
                str(spec),
                "--redis-url",
                f"redis://127.0.0.1:{unused_port()}/0",
                "--no-progress",
            )
        else:
            args = ("train", "--spec", str(spec), "--out", str(out), "--epochs", "1", "--no-progress")
        cases[name] = (spec, out, args)
    with pytest.MonkeyPatch.context() as mp:
        for variable in ("REDIS_URL", "REDIS_CLUSTER_NODES", "REDIS_MODE"):
            mp.delenv(variable, raising=False)
        with ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 1))) as pool:
            done = list(pool.map(lambda case: rankserve(*case[2]), cases.values()))
    return {name: Run(spec, out, d) for (name, (spec, out, _)), d in zip(cases.items(), done, strict=True)}


def test_unknown_key(runs: dict[str, Run]) -> None:
    run = runs["unknown_key"]
    line = error_line(run.done, "train")
    assert line == f"{run.spec}: tasks[1].wieght: unknown key (check its spelling against docs/SCHEMA.md)"
    assert not run.out.exists()  # nothing half-made


def test_task_with_an_unknown_action(runs: dict[str, Run]) -> None:
    run = runs["unknown_action"]
    line = error_line(run.done, "train")
    assert line.startswith(f"{run.spec}: tasks[1].positive: unknown action 'bought'; declared: "), line


def test_parent_cycle(runs: dict[str, Run]) -> None:
    run = runs["parent_cycle"]
    assert error_line(run.done, "train") == f"{run.spec}: tasks[0].parent: cycle engage -> buy -> engage"


def test_side_feature_column_missing_from_its_file(runs: dict[str, Run]) -> None:
    run = runs["missing_side_column"]
    line = error_line(run.done, "train")
    items = run.spec.parent / "items.csv"
    assert line == f"{items} is missing column(s) ['seller']; found ['item_id', 'brand', 'price', 'cat']"
    assert not run.out.exists()


def test_missing_events_file(runs: dict[str, Run]) -> None:
    run = runs["missing_events"]
    assert error_line(run.done, "train") == f"data file not found: {run.spec.parent / 'events.csv'}"


def test_ingest_checks_the_data_before_the_store(runs: dict[str, Run]) -> None:
    run = runs["ingest_missing_side_column"]
    line = error_line(run.done, "ingest")
    assert line == f"{run.spec.parent / 'users.csv'} is missing column(s) ['age']; found ['user_id', 'city']"
