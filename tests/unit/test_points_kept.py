"""Points an operator keeps, and drills that pick (or take) their point: against the unit-test world."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from drtool.errors import UsageError
from drtool.retention import parse_rules, points_to_delete
from drtool.services import checkpoint, drill
from drtool.state.manifest import RecoveryPoint

from .world import protected_world

NOW = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)


def point(minutes_ago: int, kept: bool = False) -> RecoveryPoint:
    at = (NOW - timedelta(minutes=minutes_ago)).isoformat()
    return RecoveryPoint(f"p{minutes_ago}", at, "paused", 0.1, {"vd0": f"/r/{minutes_ago}"}, kept=kept)


def test_retention_never_deletes_a_kept_point():
    rules = parse_rules(["hourly for 2h"])
    old = [point(60 * 24 * 30), point(60 * 24 * 30 - 5, kept=True), point(50), point(40), point(1)]
    assert points_to_delete(old, rules, NOW) == ["p43200", "p50", "p40"]  # p43195 is kept
    assert points_to_delete([dataclasses.replace(p, kept=True) for p in old], rules, NOW) == []


def test_checkpoint_keep_and_points_keep_pin_against_retention():
    world, reach, inv = protected_world()
    [taken] = checkpoint.checkpoint(inv, reach, ["web"], keep=True).results
    assert taken.point is not None and taken.point.kept and world.manifest.points[-1].kept
    first = taken.point.id
    listed = checkpoint.keep_point(inv, reach, "web", first, kept=False)
    assert [p.kept for p in listed.points] == [False] and not world.manifest.point(first).kept
    checkpoint.keep_point(inv, reach, "web", first)
    assert world.manifest.point(first).kept
    with pytest.raises(UsageError, match="no point 'p-none'"):
        checkpoint.keep_point(inv, reach, "web", "p-none")


def test_a_drill_without_points_takes_one_first_and_says_so():
    world, reach, inv = protected_world()
    assert world.manifest.points == ()
    result = drill.test_failover(inv, reach, "web")
    assert result.point_chosen == "taken" and [p.id for p in world.manifest.points] == [result.point]
    assert world.source_status == "running"  # paused for the point, resumed
    drill.cleanup_test(inv, reach, "web")
    checkpoint.checkpoint(inv, reach, ["web"])
    newest = world.manifest.points[-1].id
    again = drill.test_failover(inv, reach, "web")
    assert (again.point_chosen, again.point) == ("newest", newest)
    drill.cleanup_test(inv, reach, "web")
    first = world.manifest.points[0].id
    named = drill.test_failover(inv, reach, "web", first)
    assert (named.point_chosen, named.point) == ("named", first)
