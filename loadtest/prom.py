"""Reading a Prometheus text exposition (a server's /metrics) in benchmarks and tests."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name`."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is not None and m.group(1) == name:
            yield dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for got, v in samples(text, name) if all(got.get(k) == want for k, want in labels.items()))


def sums_by(text: str, name: str, key: Callable[[dict[str, str]], str]) -> dict[str, int]:
    """The samples of `name` summed per `key(labels)`, as whole counts."""
    out: dict[str, int] = {}
    for labels, value in samples(text, name):
        k = key(labels)
        out[k] = out.get(k, 0) + int(value)
    return out
