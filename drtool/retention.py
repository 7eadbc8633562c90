"""Which points in time to keep: a VM's `retention` rules, applied after each checkpoint.

A rule keeps one point per interval for a span of time back from now:
"hourly for 24h", "daily for 7d", "weekly for 8w", "every 15m for 6h"
(units m, h, d, w); the rule "all" (alone) keeps every point. A point is kept if it is the newest point of all, or if
for some rule it is at most the rule's span old and the newest point of its
interval bucket, the bucket being floor(epoch seconds / interval) (UTC; daily
buckets start at midnight UTC). Everything else is deleted.

Kept sets only shrink as time passes (a new point can only take over "newest
of its bucket", and spans only slide away from older points), so applying the
rules at every checkpoint gives the same result as applying them once to the
whole history. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from drtool.state.manifest import RecoveryPoint

UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NAMED = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400}
DEFAULT_RETENTION_TEXT = ("hourly for 24h", "daily for 7d")

_RULE_RE = re.compile(
    r"\s*(?:(?P<named>hourly|daily|weekly)|every\s+(?P<n>\d+)\s*(?P<unit>[a-z]*))"
    r"\s+for\s+(?P<span>\d+)\s*(?P<span_unit>[a-z]*)\s*",
    re.IGNORECASE,
)
_EXAMPLE = '"hourly for 24h", "daily for 7d", "every 15m for 6h"'


class RetentionRuleError(ValueError):
    """A rule's text is not understood; the message says why (one line)."""


@dataclass(frozen=True)
class RetentionRule:
    interval: int  # seconds: one point kept per bucket of this length (0: "all")
    span: int  # seconds back from now during which the rule keeps points (0: "all")
    text: str  # as written in the inventory

    @property
    def keeps_all(self) -> bool:
        return self.interval == 0

    def __str__(self) -> str:
        return self.text


KEEP_ALL = "all"


def _seconds(count: str, unit: str, what: str) -> int:
    if not unit:
        raise RetentionRuleError(f"the {what} {count} needs a unit: m, h, d or w (e.g. {count}h)")
    seconds = UNITS.get(unit.lower())
    if seconds is None:
        raise RetentionRuleError(f"unknown {what} unit {unit!r}: use m, h, d or w")
    if int(count) == 0:
        raise RetentionRuleError(f"the {what} must be more than 0")
    return int(count) * seconds


def parse_rule(text: str) -> RetentionRule:
    """'hourly for 24h' -> RetentionRule(3600, 86400); RetentionRuleError if not understood."""
    if text.strip().lower() == KEEP_ALL:
        return RetentionRule(0, 0, text.strip())
    m = _RULE_RE.fullmatch(text)
    if not m:
        raise RetentionRuleError(f"not a retention rule; write it like {_EXAMPLE}")
    if m["named"]:
        interval = NAMED[m["named"].lower()]
    else:
        interval = _seconds(m["n"], m["unit"], "interval")
    span = _seconds(m["span"], m["span_unit"], "span")
    if span < interval:
        raise RetentionRuleError("the span is shorter than the interval: the rule would keep at most one point")
    return RetentionRule(interval, span, text.strip())


def parse_rules(texts: Iterable[str]) -> tuple[RetentionRule, ...]:
    rules = tuple(parse_rule(t) for t in texts)
    if len(rules) > 1 and any(r.keeps_all for r in rules):
        raise RetentionRuleError(f'"{KEEP_ALL}" keeps every point: list it alone')
    return rules


DEFAULT_RETENTION: tuple[RetentionRule, ...] = parse_rules(DEFAULT_RETENTION_TEXT)


def epoch(timestamp: str) -> float | None:
    """A point's ISO 8601 time as epoch seconds (naive times are UTC); None if unreadable."""
    try:
        t = datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def points_to_delete(points: Sequence[RecoveryPoint], rules: Sequence[RetentionRule],
                     now: datetime | float) -> list[str]:
    """The ids of the points the rules do not keep, oldest first.

    `points` in the order they were taken (the manifest's order), which also
    breaks ties between points stamped in the same second. The newest point
    (the last taken, and the newest by time if a clock stepped back) is always
    kept, and so is a point pinned with --keep and any point whose time cannot
    be read (never delete what cannot be dated).
    """
    if not points or any(r.keeps_all for r in rules):
        return []
    now_s = now.timestamp() if isinstance(now, datetime) else float(now)
    dated = [(t, i, p) for i, p in enumerate(points) if (t := epoch(p.time)) is not None]
    keep = {i for i, p in enumerate(points) if epoch(p.time) is None or p.kept}
    keep.add(len(points) - 1)  # the last taken: the image right under the replica's active top
    if dated:  # and the newest by time, should the clock have stepped back since
        keep.add(max(dated, key=lambda d: (d[0], d[1]))[1])
    for rule in rules:
        newest: dict[int, tuple[float, int]] = {}
        for t, i, _ in dated:
            if now_s - t > rule.span:
                continue
            bucket = int(t // rule.interval)
            if bucket not in newest or (t, i) > newest[bucket]:
                newest[bucket] = (t, i)
        keep.update(i for _, i in newest.values())
    return [p.id for i, p in enumerate(points) if i not in keep]
