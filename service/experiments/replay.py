"""`rankserve replay`: re-send recorded requests to a running service at a target rate.

For offline shadow A/B of a new bundle: point a service whose experiments give an arm the new
bundle as a shadow at the requests recorded in a shadow sink (each record carries its request,
with the effective `request_time`, so the history cut is the same), or at a JSONL file of
`RankRequest` objects. Requests are sent open-loop at `--rate` per second (at most
`--concurrency` in flight), until `--max-requests` are sent, `--max-seconds` pass, or the input
ends (`--loop` starts it over). Prints a JSON summary: sent, ok, errors, latency p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.experiments.sinks import read_jsonl, read_stream

log = logging.getLogger("rankserve.replay")

REQUEST_FIELDS = ("user_id", "candidates", "top_n", "request_time", "debug", "context")


def requests_from(records: Iterator[dict[str, Any]]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(original request id, RankRequest body) from sink records or plain RankRequest lines.

    A sink holds one record per (request, shadow): each request is sent once.
    """
    seen: set[str] = set()
    for r in records:
        body = r.get("request") if isinstance(r.get("request"), dict) else r
        if not isinstance(body, dict) or "user_id" not in body or "candidates" not in body:
            continue
        rid = r.get("request_id") if "request" in r else None
        if isinstance(rid, str):
            if rid in seen:
                continue
            seen.add(rid)
        yield (rid if isinstance(rid, str) else None), {k: body[k] for k in REQUEST_FIELDS if body.get(k) is not None}


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


async def replay(
    url: str,
    requests: list[tuple[str | None, dict[str, Any]]],
    *,
    rate: float,
    max_requests: int,
    max_seconds: float,
    concurrency: int,
    timeout_s: float,
    loop_input: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send `requests` to `url` (REST) and return the summary."""
    import httpx

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    arms: Counter[str] = Counter()
    models: Counter[str] = Counter()
    sent = 0
    slots = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    deadline = started + max_seconds

    async def send(client: httpx.AsyncClient, rid: str | None, body: dict[str, Any]) -> None:
        extra = {"x-request-id": f"replay-{rid}"[:128]} if rid else {}
        t0 = time.perf_counter()
        try:
            resp = await client.post("/v1/rank", content=orjson.dumps(body), headers=extra)
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
            return
        finally:
            slots.release()
        if resp.status_code == 200:
            latencies.append((time.perf_counter() - t0) * 1000)
            doc = resp.json()
            arms[str(doc.get("arm"))] += 1
            models[str(doc.get("model"))] += 1
        else:
            errors[str(resp.status_code)] += 1

    base_headers = {"content-type": "application/json", **(headers or {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=base_headers, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        i = 0
        while sent < max_requests and requests:
            if i == len(requests):
                if not loop_input:
                    break
                i = 0
            due = started + sent / rate  # open loop: the schedule does not wait for answers
            now = time.perf_counter()
            if due > deadline or now > deadline:
                break
            if due > now:
                await asyncio.sleep(due - now)
            await slots.acquire()  # at most `concurrency` in flight; a slow server lowers the achieved rate
            rid, body = requests[i]
            tasks.append(asyncio.create_task(send(client, rid, body)))
            sent += 1
            i += 1
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return {
        "url": url,
        "sent": sent,
        "ok": len(latencies),
        "errors": dict(errors),
        "seconds": round(elapsed, 3),
        "target_rate": rate,
        "achieved_rate": round(sent / elapsed, 2) if elapsed > 0 else None,
        "latency_ms": {"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                       "p99": _percentile(latencies, 99), "max": round(max(latencies), 3) if latencies else None},
        "arms": dict(arms),
        "models": dict(models),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sink", type=Path, help="a shadow sink directory (or one of its .jsonl files)")
    src.add_argument("--requests", type=Path, help="a JSONL file of RankRequest objects")
    src.add_argument("--stream-url", help="a Redis Stream sink: redis:// URL (key: --stream-key)")
    p.add_argument("--stream-key", default="rankserve:shadow", help="key of the Redis Stream sink")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's REST base URL")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--max-requests", type=int, default=1000, help="stop after this many (default 1000)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop after this long (default 60)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds")
    p.add_argument("--loop", action="store_true", help="start the input over when it ends")
    p.add_argument("--arm", help="force this arm (X-Rankserve-Arm); needs RANKSERVE_ADMIN_TOKEN in the environment")


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.max_requests < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        log.error("--rate, --max-requests, --concurrency and --max-seconds must be positive")
        return 2
    headers: dict[str, str] = {}
    if args.arm:
        token = os.environ.get("RANKSERVE_ADMIN_TOKEN")
        if not token:
            log.error("--arm needs the admin token in RANKSERVE_ADMIN_TOKEN (never on the command line)")
            return 2
        headers = {"x-rankserve-arm": args.arm, "authorization": f"Bearer {token}"}
    try:
        if args.stream_url:
            records = read_stream(args.stream_url, args.stream_key)
        else:
            records = read_jsonl(args.sink or args.requests)
        requests = list(requests_from(records))
    except (FileNotFoundError, OSError) as exc:
        log.error("cannot read the requests: %s", exc)
        return 1
    if not requests:
        log.error("no requests to replay")
        return 1
    summary = asyncio.run(replay(
        args.url.rstrip("/"), requests, rate=args.rate, max_requests=args.max_requests, max_seconds=args.max_seconds,
        concurrency=args.concurrency, timeout_s=args.timeout, loop_input=args.loop, headers=headers,
    ))
    summary["input_requests"] = len(requests)
    sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if summary["ok"] == summary["sent"] else 1
