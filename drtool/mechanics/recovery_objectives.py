"""RPO and RTO of a failover, from what drtool can actually know.

An unplanned failover happens after the source is gone, so drtool cannot ask
it what it wrote last. What the DR host saw is the evidence: whether the
source's replication connections are still open (the source never closed
them: its link or its host failed) and when the DR host last received on them,
and when a replica was last written. observe_source() reads that on the DR
host before the target is stopped; recovery_objectives() turns it into the RPO
the failover reports, saying whether it is exact, an upper bound, or unknown.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from drtool.state.manifest import Manifest, RecoveryPoint
from drtool.transport.connections import RemoteShell

# Run on the DR host: its clock, the replication connections (ss) and the replicas' mtimes.
_OBSERVE = r"""
import json, os, re, subprocess, sys, time
port, images = sys.argv[1], sys.argv[2:]
now = time.time()
out = subprocess.run(["ss", "-Htin", "state", "established", "( sport = :%s )" % port],
                     capture_output=True, text=True).stdout
lastrcv = [int(m) for m in re.findall(r"lastrcv:(\d+)", out)]
mtimes = []
for image in images:
    try:
        mtimes.append(os.stat(image).st_mtime)
    except OSError:
        pass
print(json.dumps({"now": now, "open": len(lastrcv), "heard_ago": min(lastrcv) / 1000 if lastrcv else None,
                  "write_ago": now - max(mtimes) if mtimes else None}))
"""


@dataclass(frozen=True)
class SourceSeen:
    """What the DR host saw of the source when an unplanned failover began."""

    observed_at: float  # epoch s, drtool's clock (the ages below are the DR host's own differences)
    open_connections: int  # replication connections from the source still established
    heard_ago: float | None  # s since the DR host last received on them (None: none open)
    write_ago: float | None  # s since a replica was last written

    @property
    def last_seen_ago(self) -> float | None:
        """s before observed_at that the source was last known alive and connected."""
        agos = [a for a in (self.heard_ago, self.write_ago) if a is not None]
        return min(agos) if agos else None

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> SourceSeen | None:
        return cls(**record) if record else None


def observe_source(dr: RemoteShell, manifest: Manifest) -> SourceSeen | None:
    """Read the evidence on the DR host; None if it cannot be read (the failover goes on without it)."""
    images = [d.replica_image for d in manifest.disks]
    result = dr.run(["python3", "-c", _OBSERVE, str(manifest.nbd_port), *images], check=False, timeout=30)
    observed_at = time.time()  # after the probe: the ages then reach back a little further (an upper bound)
    if not result.ok:
        return None
    try:
        seen = json.loads(result.out)
        return SourceSeen(observed_at, int(seen["open"]), seen["heard_ago"], seen["write_ago"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Objectives:
    rpo_seconds: float | None
    rpo_bound: str  # exact | upper bound | unknown
    rpo_reason: str
    rto_seconds: float  # command start to the DR copy running
    rto_guest_seconds: float | None  # to the guest answering (needs a guest agent)
    rto_guest_reason: str


def _point_age(point: RecoveryPoint, at: float) -> float:
    return at - datetime.fromisoformat(point.time).timestamp()


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%H:%M:%S")


def rpo(manifest: Manifest, kind: str, point: RecoveryPoint | None, seen: SourceSeen | None
        ) -> tuple[float | None, str, str]:
    """(seconds, bound, reason) of what the DR copy may lack."""
    if kind == "planned":
        return 0.0, "exact", "the source was paused and the mirrors drained into the final point"
    if point is None:
        return None, "unknown", "no starting point recorded"
    latest = point.quiesce == "unplanned-latest"
    if latest and manifest.mode == "sync":
        if seen is None:
            return None, "unknown", "the DR host's view of the source could not be read"
        if seen.open_connections == 0:
            return 0.0, "exact", ("the DR host saw the source close its replication connections: the link was up "
                                  "until the source was lost, and sync mode had every acknowledged write here")
        lost_at = seen.observed_at - (seen.heard_ago or 0.0)
        return None, "unknown", (f"the DR host last heard from the source at {_clock(lost_at)} "
                                 f"({seen.heard_ago:.1f} s before the failover) and never saw it go away: the link "
                                 "or the source's host failed then; writes the source made after that, if it ran "
                                 "on, are lost")
    if latest:
        return None, "unknown", "async replicas as last written: not a consistent point, their age is unknown"
    if seen is None or seen.last_seen_ago is None:
        return None, "unknown", "the DR host's view of the source could not be read"
    last_seen = seen.observed_at - seen.last_seen_ago
    seen_age = max(0.0, round(_point_age(point, last_seen), 1))
    # The source acknowledged writes after the last one the DR host received (async: the replication lag),
    # so the point's age when last seen is not a bound; its age when the source was known gone is.
    last_write = (f"the DR host last received from the source at {_clock(last_seen)}, when the point was "
                  f"{seen_age:g} s old; the source went on writing for the replication lag after that")
    if seen.open_connections:
        return None, "unknown", (f"at least {seen_age:g} s by the hosts' clocks (the guest's own clock may count "
                                 f"less: it stops while the VM is paused and may lag under emulation): {last_write}, "
                                 "and the DR host never saw the source go away (the link or its host failed): "
                                 "writes it made after that, if it ran on, are lost")
    gone_age = max(seen_age, round(_point_age(point, seen.observed_at), 1))
    return gone_age, "upper bound", (f"the point's age when the DR host found the source's connections closed "
                                     f"({_clock(seen.observed_at)}): {last_write}")


def recovery_objectives(manifest: Manifest, kind: str, point: RecoveryPoint | None, seen: SourceSeen | None,
                        rto_seconds: float) -> Objectives:
    seconds, bound, reason = rpo(manifest, kind, point, seen)
    agent = any("org.qemu.guest_agent" in arg for arg in manifest.hardware.get("argv", ()))
    guest_reason = ("the VM has a guest agent channel, but drtool does not query it yet: the time until the "
                    "guest answers is not measured" if agent else
                    "the VM has no guest agent: the time until the guest answers is not measured")
    return Objectives(seconds, bound, reason, round(rto_seconds, 3), None, guest_reason)
