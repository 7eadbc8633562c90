"""RPO and RTO a failover reports, from what the DR host saw of the source (pure)."""

from dataclasses import replace
from datetime import datetime

from drtool.mechanics.recovery_objectives import SourceSeen, recovery_objectives
from drtool.state.manifest import Manifest, RecoveryPoint, ReplicaDisk

DISK = ReplicaDisk("vd0", "vd0-fmt", "qcow2", 1 << 26, "/srv/vd0.qcow2", "/dr/web/vd0.qcow2", "vd0")
T0 = datetime.fromisoformat("2026-11-26T10:00:00+00:00").timestamp()
POINT = RecoveryPoint("p1", "2026-11-26T10:00:00+00:00", "paused", 0.4, {"vd0": "/dr/web/p1-vd0.qcow2"})
LATEST = RecoveryPoint("latest-1", "2026-11-26T10:01:00+00:00", "unplanned-latest", 0.0, {"vd0": "/dr/web/vd0.qcow2"})


def manifest(mode: str, argv=("qemu-system-x86_64",)) -> Manifest:
    return Manifest("web", "kvm1", "kvm2", mode, "tls-psk", "10.0.0.2", 10809, (DISK,), points=(POINT,),
                    state="protected", hardware={"argv": list(argv)})


def test_planned_is_exact_zero():
    goals = recovery_objectives(manifest("async"), "planned", POINT, None, 5.04)
    assert (goals.rpo_seconds, goals.rpo_bound, goals.rto_seconds) == (0.0, "exact", 5.04)


def test_sync_is_zero_only_when_the_dr_host_saw_the_source_close_its_connections():
    closed = SourceSeen(T0 + 100, open_connections=0, heard_ago=None, write_ago=3.0)
    goals = recovery_objectives(manifest("sync"), "unplanned", LATEST, closed, 9.0)
    assert (goals.rpo_seconds, goals.rpo_bound) == (0.0, "exact") and "link was up" in goals.rpo_reason
    silent = SourceSeen(T0 + 100, open_connections=2, heard_ago=42.5, write_ago=43.0)
    goals = recovery_objectives(manifest("sync"), "unplanned", LATEST, silent, 9.0)
    assert (goals.rpo_seconds, goals.rpo_bound) == (None, "unknown")
    assert "42.5 s before the failover" in goals.rpo_reason and "never saw it go away" in goals.rpo_reason
    assert recovery_objectives(manifest("sync"), "unplanned", LATEST, None, 9.0).rpo_bound == "unknown"


def test_async_is_the_points_age_when_the_source_was_known_gone_not_when_it_was_last_seen():
    # the failover began 100 s after the point; the last replicated write came 96.5 s after it, but the source
    # acknowledged writes it had not replicated yet (the lag) until it died, some time before the probe
    seen = SourceSeen(T0 + 100, open_connections=0, heard_ago=None, write_ago=3.5)
    goals = recovery_objectives(manifest("async"), "unplanned", POINT, seen, 9.0)
    assert (goals.rpo_seconds, goals.rpo_bound) == (100.0, "upper bound")
    assert "when the point was 96.5 s old" in goals.rpo_reason and "replication lag" in goals.rpo_reason


def test_async_with_the_connections_still_open_is_unknown_at_least_the_age_last_heard():
    silent = SourceSeen(T0 + 100, open_connections=1, heard_ago=1.0, write_ago=3.5)
    goals = recovery_objectives(manifest("async"), "unplanned", POINT, silent, 9.0)
    assert (goals.rpo_seconds, goals.rpo_bound) == (None, "unknown")
    assert goals.rpo_reason.startswith("at least 99 s") and "never saw the source go away" in goals.rpo_reason


def test_async_replicas_as_last_written_have_no_known_age():
    seen = SourceSeen(T0 + 100, 0, None, 3.5)
    assert recovery_objectives(manifest("async"), "unplanned", LATEST, seen, 9.0).rpo_bound == "unknown"


def test_rto_to_the_guest_says_why_it_is_not_measured():
    plain = recovery_objectives(manifest("async"), "planned", POINT, None, 5.0)
    assert plain.rto_guest_seconds is None and "no guest agent" in plain.rto_guest_reason
    argv = ("qemu-system-x86_64", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
    agent = recovery_objectives(manifest("async", argv), "planned", POINT, None, 5.0)
    assert "does not query it yet" in agent.rto_guest_reason
