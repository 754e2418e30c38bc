"""Fault injection for shadows (a testing aid): `RANKSERVE_SHADOW_FAULT` slows or breaks a shadow.

`sleep:<factor>x` makes a shadow wait factor x the primary's latency; `raise` makes it fail where
a broken model's scorer call would; either may be prefixed by `<shadow>=` to pick one shadow.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


class InjectedFault(RuntimeError):
    """Raised by a shadow under RANKSERVE_SHADOW_FAULT=raise."""


_FAULT_RE = re.compile(
    r"(?:(?P<name>[A-Za-z0-9][A-Za-z0-9_./-]*)=)?(?:sleep:(?P<factor>\d+(?:\.\d+)?)x|(?P<raise>raise))"
)


@dataclass(frozen=True)
class ShadowFault:
    """Per shadow name (None: every shadow): ("sleep", factor of the primary's latency) or ("raise", 0)."""

    rules: Mapping[str | None, tuple[str, float]] = field(default_factory=dict)

    def _rule(self, shadow: str) -> tuple[str, float] | None:
        return self.rules.get(shadow) or self.rules.get(None)

    def delay(self, shadow: str, primary_seconds: float) -> None:
        """A "sleep" rule: wait (no CPU, no lock held) factor x the primary's latency."""
        rule = self._rule(shadow)
        if rule is not None and rule[0] == "sleep":
            time.sleep(rule[1] * primary_seconds)

    def fail(self, shadow: str) -> None:
        """A "raise" rule: raise, where a broken model's scorer call would."""
        rule = self._rule(shadow)
        if rule is not None and rule[0] == "raise":
            raise InjectedFault(f"injected fault in shadow {shadow!r} (RANKSERVE_SHADOW_FAULT)")


def parse_fault(text: str | None) -> ShadowFault:
    """`sleep:<factor>x` | `raise`, optionally `<shadow>=` first, comma-separated; ValueError if malformed."""
    rules: dict[str | None, tuple[str, float]] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = _FAULT_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"bad shadow fault {part!r}: use 'sleep:<factor>x' or 'raise', optionally prefixed by '<shadow>='"
            )
        rules[m["name"]] = ("raise", 0.0) if m["raise"] else ("sleep", float(m["factor"]))
    return ShadowFault(rules)
