"""`make demo`: train, export, ingest, serve and query a model on a fresh clone.

    python -m service.demo --data ../shared/data [--keep-running]

It uses Tmall 2014 from the data root when the files are there; elsewhere it generates a small
synthetic data set (`rankserve synth`) and says so in one line, so the demo runs anywhere. When
the bundle declares request-context features (the synthetic set's `device` and `hour`), the
request sends the context of the chosen user's newest event.

Each step is the real command line (`rankserve train`, `export`, `ingest`, `serve`) run as a
subprocess, so the demo exercises exactly what an operator types. It then ranks a mix of recent
and popular items for the user with the longest history, over REST (httpx) and gRPC,
prints both answers and the equivalent curl / grpcurl commands, and stops the server (unless
`--keep-running`). A second run reuses the trained run and its bundle (`--retrain` to redo them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from models.data.readers import DATASET_FILES, load_spec_dataset, preset_spec, resolve_data_root

log = logging.getLogger("rankserve.demo")

RECENT_ITEMS = 10
# the fallback data set: small enough to generate and train on in a minute, long histories still
SYNTHETIC_SIZE = ("--users", "500", "--items", "5000", "--categories", "100", "--events-per-user", "20:400")
POPULAR_ITEMS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="data root holding tmall_2014/ (default ../shared/data)")
    p.add_argument("--workdir", type=Path, default=Path("."), help="where runs/, bundles/ and data-cache/ go")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (few: the demo takes minutes)")
    p.add_argument("--retrain", action="store_true", help="train and export again even if runs/demo exists")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    p.add_argument("--keep-running", action="store_true", help="leave the server running when the demo ends")
    return p.parse_args(argv)


def cli(*args: str, capture: bool = False) -> str:
    """Run `rankserve <args>` (as `python -m service.cli`) and fail loudly if it fails."""
    cmd = [sys.executable, "-m", "service.cli", *args]
    log.info("$ rankserve %s", " ".join(shlex.quote(a) for a in args))
    proc = subprocess.run(cmd, check=False, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise SystemExit(f"`rankserve {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def choose_data(data_root: Path | None, workdir: Path) -> tuple[str, list[str]]:
    """The demo's data set: Tmall 2014 when its files are under the data root, else a synthetic one.

    Returns the data set's name (also the bundle's) and the `--data` arguments of every command.
    """
    root = resolve_data_root(data_root)
    if (root / DATASET_FILES["tmall"]).is_file():
        return "tmall", ["--data", "tmall", "--data-root", str(root.resolve())]
    synth_dir = (workdir / "data-cache" / "demo-synthetic").resolve()
    log.warning("Tmall 2014 not found under %s: the demo uses a small generated synthetic data set instead", root)
    if not (synth_dir / "meta.json").is_file():  # written last: a complete set
        cli("synth", "--out", str(synth_dir), *SYNTHETIC_SIZE, "--no-progress")
    return "synthetic", ["--data", f"synthetic:{synth_dir}"]


def train_and_export(args: argparse.Namespace, name: str, data_args: list[str]) -> Path:
    run_dir = args.workdir / "runs" / f"demo-{name}"
    bundles = args.workdir / "bundles"
    existing: list[Path] = sorted((bundles / name).glob("[0-9]*"), key=lambda p: int(p.name))
    if args.retrain or not (run_dir / "checkpoint.pt").exists():
        # one negative per positive and larger batches: ~5x less work than the defaults, for a quick demo
        cli("train", *data_args, "--out", str(run_dir), "--epochs", str(args.epochs), "--negatives", "1",
            "--batch-size", "1024", "--no-baselines", "--no-progress")
    elif existing:
        log.info("reusing the trained run %s and bundle %s (--retrain to redo)", run_dir, existing[-1])
        return existing[-1]
    out = cli("export", "--run", str(run_dir), "--out", str(bundles), "--name", name, capture=True)
    return Path(out.strip().splitlines()[-1])


def pick_request(data_args: list[str], context_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """The user with the longest history; candidates: their recent items plus popular ones.

    With `context_names` (the bundle's context features, e.g. device and hour of the synthetic
    set), the request sends the context of the user's newest event.
    """
    spec, root = data_args[1], (Path(data_args[3]) if len(data_args) > 3 else None)
    events = load_spec_dataset(*preset_spec(spec, root)).events
    users, offsets = events.user_offsets()
    k = int(np.argmax(np.diff(offsets)))
    lo, hi = int(offsets[k]), int(offsets[k + 1])
    recent: list[int] = []
    for item in events.item_id[lo:hi][::-1].tolist():  # newest first
        if item not in recent:
            recent.append(item)
        if len(recent) == RECENT_ITEMS:
            break
    items, counts = np.unique(events.item_id, return_counts=True)
    popular = [int(i) for i in items[np.argsort(-counts, kind="stable")] if int(i) not in recent][:POPULAR_ITEMS]
    # rank "the day after the data ends": histories are old (Tmall: 2014), so "now" would age every behaviour
    request_time = int(events.timestamp.max()) + 86_400
    log.info("chose user %d (%d events)", int(users[k]), hi - lo)
    body: dict[str, Any] = {"user_id": int(users[k]), "candidates": recent + popular, "top_n": 10,
                            "request_time": request_time}
    context = {name: _json_value(events.context[name][hi - 1]) for name in context_names if name in events.context}
    if context:
        body["context"] = context
    return body


def _json_value(value: Any) -> Any:
    """A raw context value as plain JSON: text stays text, a whole number becomes an integer."""
    if isinstance(value, str):
        return value
    number = float(value)
    return int(number) if number.is_integer() else number


def context_names(bundle: Path) -> tuple[str, ...]:
    """The bundle's request-context features (none for the Tmall preset)."""
    from export.bundle import open_bundle

    return open_bundle(bundle, verify=False).schema.spec.side.context.names


def start_server(args: argparse.Namespace, bundle: Path, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(bundle.parent.parent),
           "--model-name", bundle.parent.name, "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port)]
    log.info("$ rankserve serve %s  (logs: %s)", " ".join(cmd[4:]), log_path)
    with log_path.open("ab") as out:
        # own session: with --keep-running the server outlives the demo and the terminal's Ctrl-C
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    reason = "not started"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the server exited with code {proc.returncode}; last log lines:\n{tail}")
        try:
            resp = httpx.get(base_url + "/readyz", timeout=2.0)
            if resp.status_code == 200:
                return
            reason = str(resp.json().get("reason"))
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f}s: {reason}")


def query(args: argparse.Namespace, body: dict[str, Any]) -> None:
    """Rank over REST and gRPC; print both answers and the equivalent commands."""
    import grpc
    from google.protobuf import json_format

    from service.transports.grpc.server import pb2, pb2_grpc

    url = f"http://localhost:{args.http_port}"
    resp = httpx.post(f"{url}/v1/rank", json=body, headers={"X-Request-ID": "demo-rest"}, timeout=10.0)
    resp.raise_for_status()
    with grpc.insecure_channel(f"localhost:{args.grpc_port}") as channel:
        reply = pb2_grpc.RankerStub(channel).Rank(
            pb2.RankRequest(**body), metadata=(("x-request-id", "demo-grpc"),), timeout=10.0
        )
    payload = json.dumps(body)
    out = sys.stdout
    out.write("\n== REST: POST /v1/rank ==\n")
    out.write(f"curl -s -X POST {url}/v1/rank -H 'Content-Type: application/json' -d '{payload}'\n\n")
    out.write(json.dumps(resp.json(), indent=2) + "\n")
    out.write("\n== gRPC: rankserve.v1.Ranker/Rank ==\n")
    out.write(f"grpcurl -plaintext -d '{payload}' localhost:{args.grpc_port} rankserve.v1.Ranker/Rank\n\n")
    out.write(json_format.MessageToJson(reply, preserving_proto_field_name=True) + "\n")
    same = [it.item_id for it in reply.items] == [it["item_id"] for it in resp.json()["items"]]
    out.write(f"\nREST and gRPC agree on the ranking: {same}\n")
    out.flush()


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("server did not stop within %.0fs; killing it", timeout)
            proc.kill()
            proc.wait()
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    from service.observability.logging_setup import configure_logging

    args = parse_args(argv)
    configure_logging("INFO", json_logs=False)
    data_root = args.data.resolve() if args.data else None  # before chdir: relative to where we started
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # runs/, bundles/ and the embedded store's data-cache/ live here
    args.workdir = Path(".")

    started = time.monotonic()
    name, data_args = choose_data(data_root, args.workdir)
    bundle = train_and_export(args, name, data_args)
    cli("ingest", *data_args, "--schema", str(bundle), "--activate", "--no-progress")
    body = pick_request(data_args, context_names(bundle))
    log_path = Path("runs") / f"demo-{name}" / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(args, bundle, log_path)
    try:
        wait_ready(f"http://localhost:{args.http_port}", proc, args.ready_timeout, log_path)
        log.info("server ready after %.0fs of demo", time.monotonic() - started)
        query(args, body)
    except BaseException:
        stop_server(proc)
        raise
    if args.keep_running:
        sys.stdout.write(f"\nThe server keeps running (pid {proc.pid}); stop it with: kill {proc.pid}\n")
        return 0
    code = stop_server(proc)
    log.info("server stopped (exit %d); demo took %.0fs", code, time.monotonic() - started)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
