"""A rollback says how old the DR copy's discarded writes are, and past a threshold wants --force."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import pytest

from drtool.domain import Vm
from drtool.errors import Refused
from drtool.services.failover.rollback import discarded_writes
from drtool.state.ages import ROLLBACK_FORCE_AFTER, dr_copy_age
from drtool.state.records import FailoverKind, FailoverRecord, Step

from .test_replication_jobs import manifest

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
VM = Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath("/dr/web"))


def failed_over(ago: float, steps: tuple[Step, ...] = tuple(Step)) -> FailoverRecord:
    at = (datetime.now(UTC) - timedelta(seconds=ago)).isoformat(timespec="seconds")
    return FailoverRecord(FailoverKind.PLANNED, at, steps, finished_at=at)


def test_the_dr_copy_age_counts_from_the_failover_finish():
    record = FailoverRecord(FailoverKind.PLANNED, "2026-11-27T11:00:00+00:00", (Step.DR_STARTED,),
                            finished_at="2026-11-27T11:30:00+00:00")
    assert dr_copy_age(record, NOW) == 1800
    record = replace(record, finished_at=None)  # killed after starting the DR copy: from the start, the safe side
    assert dr_copy_age(record, NOW) == 3600
    assert dr_copy_age(FailoverRecord(FailoverKind.PLANNED, "2026-11-27T11:00:00+00:00", (Step.SOURCE_PAUSED,)),
                       NOW) is None


def test_a_recent_rollback_says_how_old_the_discarded_writes_are():
    m = replace(manifest(), failover=failed_over(300))
    said = discarded_writes(VM, m.failover, force=False)
    assert said == "writes made by the VM on the DR host over the last 5 min are discarded"


def test_an_old_rollback_needs_force():
    m = replace(manifest(), failover=failed_over(ROLLBACK_FORCE_AFTER + 3600))
    with pytest.raises(Refused, match="web has run on kvm2 for 70 min: a rollback discards everything"):
        discarded_writes(VM, m.failover, force=False)
    assert "over the last 70 min" in discarded_writes(VM, m.failover, force=True)


def test_a_failover_that_never_started_the_dr_copy_discards_nothing():
    m = replace(manifest(), failover=failed_over(99999, (Step.SOURCE_PAUSED,)))
    assert discarded_writes(VM, m.failover, force=False).startswith("the VM never ran on the DR host")
