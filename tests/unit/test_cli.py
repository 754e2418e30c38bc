"""The command line as a first-time user meets it: `--version`, help for every flag of every
subcommand, one-line errors instead of tracebacks, `verify-bundle`, and a run trained on a generic
event file with an action map that `evaluate` reads back without being told the map again."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.exporter import write_bundle
from service.cli import COMMANDS, build_parser
from service.cli import main as cli_main
from tests.helpers import tiny_model, tiny_schema

REPO = Path(__file__).resolve().parents[2]


def rankserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_version() -> None:
    done = rankserve("--version")
    assert done.returncode == 0 and done.stdout.startswith("rankserve "), done
    assert done.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_of_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(command)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # help is wrapped: compare without white space
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [a.option_strings or a.dest for a in sub.choices[command]._actions if not a.help]
    assert missing == [], f"{command}: arguments without help: {missing}"
    for action in sub.choices[command]._actions:  # a default worth stating is shown
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = "".join(str(action.default).split())
            assert shown in text or "default" in (action.help or ""), (command, action.dest)


def test_bad_run_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = rankserve("evaluate", "--run", str(tmp_path / "nowhere"))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert "is not a complete run directory" in line and "rankserve train" in line


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    schema = tiny_schema()
    schema_dir = tmp_path / "schema"
    schema.save(schema_dir)
    return write_bundle(tiny_model(schema), schema_dir, {"variant": "twin"}, tmp_path / "bundles", "tiny")


def test_verify_bundle(bundle: Path, tmp_path: Path) -> None:
    done = rankserve("verify-bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["name"] == "tiny" and summary["files_verified"] > 0

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    table = tampered / "tables" / "item_key.npy"
    table.chmod(0o644)
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    done = rankserve("verify-bundle", str(tampered))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "sha256 mismatch for tables/item_key.npy" in done.stderr


def write_events(path: Path, seed: int = 0) -> None:
    """60 users x 40 events over 30 days, with this file's own action names."""
    rng = np.random.default_rng(seed)
    n_users, per_user = 60, 40
    user = np.repeat(np.arange(1, n_users + 1), per_user)
    item = rng.integers(1, 200, user.shape[0])
    day = rng.integers(0, 30, user.shape[0])
    pd.DataFrame({
        "user_id": user,
        "item_id": item,
        "category_id": item % 20,
        "action": rng.choice(["view", "like", "basket"], user.shape[0], p=[0.8, 0.1, 0.1]),
        "timestamp": 1_700_000_000 + day * 86_400 + rng.integers(0, 86_400, user.shape[0]),
    }).to_csv(path, index=False)


def test_evaluate_reads_the_action_map_from_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.csv"
    write_events(events)
    run = tmp_path / "run"
    code = cli_main(["train", "--data", f"events:{events}", "--action-map", "click=view,buy=like,cart=basket",
                     "--out", str(run), "--epochs", "1", "--no-baselines", "--no-progress", "--batch-size", "256"])
    assert code == 0
    # recorded as the run's feature spec: action -> the file values that mean it
    actions = json.loads((run / "config.json").read_text())["feature_spec"]["actions"]
    assert {a: actions[a] for a in ("click", "cart", "buy")} == {"click": ["view"], "cart": ["basket"], "buy": ["like"]}
    capsys.readouterr()
    assert cli_main(["evaluate", "--run", str(run), "--max-queries", "50"]) == 0  # no --action-map needed
    assert "AUC" in capsys.readouterr().out


def test_consume_refuses_a_priority_out_of_range() -> None:
    done = rankserve("consume", "--nice", "25", "--redis-url", "redis://127.0.0.1:1")
    assert done.returncode == 2 and "--nice must be 0-19" in done.stderr and "Traceback" not in done.stderr


def test_recluster_refuses_a_bad_version_name() -> None:
    done = rankserve("recluster", "--bundle", "no-such-bundle", "--version", "v1:x", "--redis-url", "redis://127.0.0.1:1")
    assert done.returncode == 2 and "--version: bad feature-set version" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RANKSERVE_CONFIG": "no-such-config.yaml"}, "RANKSERVE_CONFIG='no-such-config.yaml' is not a file"),
        ({"RANKSERVE_CONFIG": "{bad_yaml}"}, "invalid settings"),
        ({"RANKSERVE_FEATURE_STORE__CLUSTER_NODES": "a:1,b:2"}, "invalid settings"),
        ({"RANKSERVE_RETRIEVAL_STRATEGY": "faiss_gpu"}, "cannot start: faiss_gpu needs a GPU build of faiss"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    import os

    if env.get("RANKSERVE_RETRIEVAL_STRATEGY") == "faiss_gpu":
        import faiss

        if faiss.get_num_gpus() > 0:
            pytest.skip("a GPU is visible: faiss_gpu starts")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("retrieval_strategy: [unclosed\n")
    env = {k: v.replace("{bad_yaml}", str(bad_yaml)) for k, v in env.items()}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(tmp_path), "--http-port", "0",
         "--grpc-port", "0", "--redis-url", "redis://127.0.0.1:1"],
        cwd=REPO, env=base | env, capture_output=True, text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode != 0 and fragment in text and "Traceback" not in text, text[-2000:]


def test_serve_logs_at_the_level_and_format_of_its_settings(tmp_path: Path) -> None:
    import os
    import time

    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(tmp_path), "--http-port", "0",
             "--grpc-port", "0", "--redis-url", "redis://127.0.0.1:1"],
            cwd=REPO, env=base | {"RANKSERVE_LOG_LEVEL": "warning", "RANKSERVE_JSON_LOGS": "false"}, stdout=out,
            stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "no model loaded at startup" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(60)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith(("WARNING ", "ERROR ")) for line in lines), lines  # plain text, no INFO


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (("consume",), {"REDIS_URL": "localhost:6379"}, "invalid settings: url: Value error, url must start with"),
        (("consume", "--timeout", "0", "--redis-url", "redis://127.0.0.1:1"), {},
         "invalid settings: connect_timeout_s: Input should be greater than 0"),
        (("consume", "--redis-url", "redis://127.0.0.1:1"), {"RANKSERVE_EVENT_SHARDS": "abc"},
         "argument --shards: invalid int value: 'abc'"),
        (("consume", "--redis-url", "redis://:pw@127.0.0.1:1", "--timeout", "-1"), {}, "invalid settings: "),
    ],
)
def test_tools_refuse_bad_store_settings_in_one_line(args: tuple[str, ...], env: dict[str, str], fragment: str) -> None:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=base | env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and fragment in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "pw@" not in done.stderr
