"""How old what the manifest records is: for decisions that discard or trust data by its age."""

from __future__ import annotations

from datetime import UTC, datetime

from drtool.state.manifest import Manifest
from drtool.state.records import FailoverRecord, Step

# A rollback discards what the VM wrote on the DR host since the failover. Right after a
# planned failover that is a change of mind; past this the DR copy has likely served real
# work, and the rollback needs --force.
ROLLBACK_FORCE_AFTER = 600.0


def dr_copy_age(failover: FailoverRecord, now: datetime | None = None) -> float | None:
    """Seconds the VM has run (and written) on the DR host, or None if it never started there.

    From the failover's finish (the DR copy resumed then); a failover killed after
    starting the DR copy counts from its start: an upper bound, on the safe side.
    """
    if not failover.done(Step.DR_STARTED):
        return None
    since = failover.finished_at or failover.started_at
    if not since:
        return None
    started = datetime.fromisoformat(since)
    return max(0.0, ((now or datetime.now(UTC)) - started).total_seconds())


def point_age(manifest: Manifest | None, now: datetime | None = None) -> float | None:
    """Seconds since the manifest's newest point in time was taken (None: no manifest or no point)."""
    if manifest is None or not manifest.points:
        return None
    taken = datetime.fromisoformat(manifest.points[-1].time)
    return max(0.0, ((now or datetime.now(UTC)) - taken).total_seconds())


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
