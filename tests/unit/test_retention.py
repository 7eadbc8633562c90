"""Retention rules (drtool.retention), their config key, and deleting points (points.delete_points) on fakes."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from drtool.config import parse_inventory
from drtool.errors import DrtoolError, Refused
from drtool.state.manifest import Manifest, RecoveryPoint, ReplicaDisk
from drtool.mechanics.points import COMMIT_JOB_PREFIX, delete_point, delete_points
from drtool.retention import DEFAULT_RETENTION, RetentionRule, parse_rule, parse_rules, points_to_delete
from drtool.transport.ssh import CommandResult

from .test_config import BASE, CONF, config_error

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday, midnight UTC


def point(pid: str, at: datetime | str, **images: str) -> RecoveryPoint:
    time = at if isinstance(at, str) else at.isoformat(timespec="seconds")
    return RecoveryPoint(pid, time, "paused", 0.1, images or {"vd0": f"/r/{pid}"})


# -- rules -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "interval", "span"), [
    ("hourly for 24h", 3600, 86400),
    ("daily for 7d", 86400, 7 * 86400),
    ("weekly for 8w", 7 * 86400, 56 * 86400),
    ("every 15m for 6h", 900, 6 * 3600),
    ("every 1m for 2m", 60, 120),
    ("  Every 2H  for 2d ", 7200, 2 * 86400),
    ("every 1 m for 1 h", 60, 3600),
])
def test_rules_parse(text, interval, span):
    assert parse_rule(text) == RetentionRule(interval, span, text.strip())


@pytest.mark.parametrize(("text", "problem"), [
    ("hourly", "not a retention rule"),
    ("hourly for", "not a retention rule"),
    ("keep 3", "not a retention rule"),
    ("every m for 1h", "not a retention rule"),
    ("hourly for 24", "the span 24 needs a unit"),
    ("every 15 for 1h", "the interval 15 needs a unit"),
    ("every 15s for 1h", "unknown interval unit 's'"),
    ("hourly for 2y", "unknown span unit 'y'"),
    ("every 0m for 1h", "the interval must be more than 0"),
    ("hourly for 0h", "the span must be more than 0"),
    ("daily for 12h", "the span is shorter than the interval"),
    ("every -5m for 1h", "not a retention rule"),
])
def test_bad_rules_say_why(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_rule(text)


def test_default_is_hourly_for_a_day_and_daily_for_a_week():
    assert DEFAULT_RETENTION == parse_rules(["hourly for 24h", "daily for 7d"])


# -- the config key ----------------------------------------------------------------


def test_retention_key_default_and_value():
    assert parse_inventory(BASE, CONF).vm("web").retention == DEFAULT_RETENTION
    inv = parse_inventory(BASE + 'retention = ["every 15m for 6h", "daily for 30d"]\n', CONF)
    assert [(r.interval, r.span) for r in inv.vm("web").retention] == [(900, 6 * 3600), (86400, 30 * 86400)]


@pytest.mark.parametrize(("edit", "expected"), [
    ('retention = ["hourly for 24"]',
     '[vms.web] retention = ["hourly for 24"]: "hourly for 24": the span 24 needs a unit: m, h, d or w (e.g. 24h)'),
    ('retention = ["hourly for 24h", "fortnightly for 8w"]',
     '[vms.web] retention = ["hourly for 24h", "fortnightly for 8w"]: "fortnightly for 8w": not a retention rule; '
     'write it like "hourly for 24h", "daily for 7d", "every 15m for 6h"'),
    ('retention = "hourly for 24h"',
     '[vms.web] retention = "hourly for 24h": must be a list of rules like ["hourly for 24h", "daily for 7d"]'),
    ("retention = [24]", "[vms.web] retention = [24]: item 24 is not a string"),
    ("retention = []",
     '[vms.web] retention = []: must list at least one rule, like ["hourly for 24h", "daily for 7d"]; '
     "leave the key out for that default"),
])
def test_bad_retention_is_one_line_naming_file_table_key_and_line(edit, expected):
    assert config_error(BASE + edit + "\n") == f"{CONF}: {expected} (line 12)"


# -- which points to delete -----------------------------------------------------------


def test_no_points_and_a_single_point():
    assert points_to_delete([], DEFAULT_RETENTION, T0) == []
    old = point("p1", T0 - timedelta(days=400))
    assert points_to_delete([old], DEFAULT_RETENTION, T0) == []  # the newest is kept, however old


def test_newest_in_each_bucket_within_the_span_is_kept():
    rules = parse_rules(["hourly for 3h"])
    points = [point(f"p{i}", T0 + timedelta(minutes=15 * i)) for i in range(16)]  # 00:00 .. 03:45
    now = T0 + timedelta(hours=4)
    # buckets 00h, 01h, 02h, 03h; the 00h bucket's newest (00:45) is 3h15 old: outside the span
    assert sorted(set(p.id for p in points) - set(points_to_delete(points, rules, now))) == ["p11", "p15", "p7"]


def test_span_boundary_is_inclusive():
    rules = parse_rules(["hourly for 2h"])
    points = [point("a", T0), point("b", T0 + timedelta(hours=1)), point("c", T0 + timedelta(hours=2))]
    assert points_to_delete(points, rules, T0 + timedelta(hours=2)) == []
    assert points_to_delete(points, rules, T0 + timedelta(hours=2, seconds=1)) == ["a"]


def test_rules_add_up():
    rules = parse_rules(["hourly for 2h", "daily for 3d"])
    points = [point("d1", T0 - timedelta(days=1, hours=1)), point("d1b", T0 - timedelta(hours=1, minutes=30)),
              point("h", T0 + timedelta(minutes=10)), point("new", T0 + timedelta(minutes=50))]
    # d1b is the newest of yesterday (daily keeps it), h is not the newest of its hour (new is)
    assert points_to_delete(points, rules, T0 + timedelta(hours=1)) == ["h"]


def test_points_of_the_same_second_are_ordered_as_taken():
    rules = parse_rules(["every 1m for 10m"])
    same = T0.isoformat(timespec="seconds")
    points = [point("first", same), point("second", same), point("later", T0 + timedelta(minutes=5))]
    assert points_to_delete(points, rules, T0 + timedelta(minutes=5)) == ["first"]


def test_tested_points_are_not_special_and_undatable_points_are_kept():
    rules = parse_rules(["every 1m for 5m"])
    points = [replace(point("tested", T0), tested_at=T0.isoformat()), point("junk", "yesterday-ish"),
              point("p2", T0 + timedelta(seconds=30)), point("p3", T0 + timedelta(minutes=2))]
    assert points_to_delete(points, rules, T0 + timedelta(minutes=2)) == ["tested"]


def test_the_last_taken_is_kept_even_if_a_clock_stepped_back():
    rules = parse_rules(["every 1m for 2m"])
    points = [point("a", T0 + timedelta(minutes=1)), point("b", T0 + timedelta(minutes=1, seconds=5)),
              point("after-step", T0)]
    assert points_to_delete(points, rules, T0 + timedelta(minutes=1, seconds=10)) == ["a"]


def test_accepts_epoch_seconds_for_now():
    points = [point("a", T0), point("b", T0 + timedelta(minutes=1))]
    rules = parse_rules(["every 1h for 1h"])
    assert points_to_delete(points, rules, (T0 + timedelta(minutes=2)).timestamp()) == ["a"]


def test_cron_every_15_minutes_for_10_days_stays_bounded():
    """`*/15 * * * * drtool checkpoint --all` with the default rules: take a point, apply retention."""
    kept: list[RecoveryPoint] = []
    most = 0
    now = T0
    for n in range(10 * 24 * 4):
        now = T0 + timedelta(minutes=15 * n, seconds=7)  # a checkpoint takes a few seconds after the minute
        kept.append(point(f"p{n:04d}", now))
        doomed = set(points_to_delete(kept, DEFAULT_RETENTION, now))
        assert kept[-1].id not in doomed
        kept = [p for p in kept if p.id not in doomed]
        most = max(most, len(kept))
    # about 24 hourly + 7 daily + the newest; an hourly bucket's newest can be a day's newest too
    assert 24 + 7 <= len(kept) <= most <= 24 + 1 + 7 + 1 + 1
    ages = [now - datetime.fromisoformat(p.time) for p in kept]
    hours = {int(a / timedelta(hours=1)) for a in ages if a <= timedelta(hours=24)}
    assert set(range(24)) <= hours, "one point per hour over the last day"
    days = {datetime.fromisoformat(p.time).date() for p in kept}
    assert len(days) >= 7 and all(now.date() - d <= timedelta(days=7) for d in days)
    # applying the rules once to the whole history gives the same: incremental deletion loses nothing extra
    history = [point(f"p{n:04d}", T0 + timedelta(minutes=15 * n, seconds=7)) for n in range(10 * 24 * 4)]
    at_once = set(p.id for p in history) - set(points_to_delete(history, DEFAULT_RETENTION, now))
    assert at_once == {p.id for p in kept}


# -- deleting points: a fake replication target with real chain bookkeeping ------------------


class FakeTarget:
    """qemu-storage-daemon's view (nodes, block-commit, events) and the DR host's files (qemu-img, rm)."""

    def __init__(self, backing: dict[str, str | None]) -> None:
        self.backing = dict(backing)  # image -> its backing file (None: a full image)
        self.commits: list[dict] = []
        self.fail_commit_on: set[str] = set()  # top images whose commit fails
        self.jobs: list[dict] = []
        self.removed: list[str] = []
        self._events: list[dict] = []

    # qemu-img / rm through the shell
    def run(self, argv, *, timeout=None, stdin=None, check=True):  # noqa: ANN001
        argv = tuple(argv)
        if argv[:2] == ("qemu-img", "info"):
            image, chain = argv[-1], []
            if image not in self.backing:
                return self._result(argv, 1, "", f"qemu-img: Could not open '{image}'", check)
            while image is not None:
                chain.append({"filename": image, "backing-filename": self.backing[image]})
                image = self.backing[image]
            return self._result(argv, 0, json.dumps(chain), "", check)
        if argv[:2] == ("rm", "-f"):
            for path in argv[3:]:
                self.backing.pop(path, None)
                self.removed.append(path)
            return self._result(argv, 0, "", "", check)
        raise AssertionError(f"unexpected command {argv}")

    @staticmethod
    def _result(argv, rc, out, err, check):  # noqa: ANN001, ANN205
        if check and rc:
            raise DrtoolError(f"{argv[0]} exited {rc}: {err}")
        return CommandResult(argv, rc, out.encode(), err.encode())

    # QMP
    def execute(self, command, args=None, *, timeout=None):  # noqa: ANN001, ANN201
        if command == "query-block-jobs":
            return self.jobs
        if command == "query-named-block-nodes":
            return [{"node-name": f"n:{img}", "drv": "qcow2", "file": img} for img in self.backing]
        if command == "block-commit":
            top, base = args["top-node"][2:], args["base-node"][2:]
            self.commits.append({"top": top, "base": base, "device": args["device"][2:], "job": args["job-id"]})
            if top in self.fail_commit_on:
                self._events.append({"event": "BLOCK_JOB_COMPLETED",
                                     "data": {"device": args["job-id"], "error": "No space left on device"}})
                return {}
            above = next(img for img, b in self.backing.items() if b == top)
            self.backing[above] = base  # the image above top now backs onto base; top..base+1 leave the chain
            self._events.append({"event": "BLOCK_JOB_COMPLETED", "data": {"device": args["job-id"]}})
            return {}
        raise AssertionError(f"unexpected QMP {command}")

    @contextlib.contextmanager
    def subscribe(self, names=()):  # noqa: ANN001, ANN201
        target = self

        class Sub:
            def get(self, timeout=None):  # noqa: ANN001, ANN202
                return target._events.pop(0) if target._events else None

        yield Sub()


def chain_world(devices=("vd0", "vd1"), n_points=4):  # noqa: ANN001, ANN201
    """A manifest with n points on each disk and the matching chains."""
    backing: dict[str, str | None] = {}
    points = []
    for dev in devices:
        backing[f"/r/{dev}.qcow2"] = None
    tops = {dev: f"/r/{dev}.qcow2" for dev in devices}
    for n in range(n_points):
        pid = f"p{n}"
        points.append(point(pid, T0 + timedelta(minutes=n), **dict(tops)))
        for dev in devices:
            overlay = f"/r/{dev}.after-{pid}.qcow2"
            backing[overlay] = tops[dev]
            tops[dev] = overlay
    disks = tuple(ReplicaDisk(dev, f"{dev}-fmt", "qcow2", 1 << 24, f"/src/{dev}.qcow2", tops[dev], dev)
                  for dev in devices)
    manifest = Manifest("web", "kvm1", "kvm2", "async", "tls-psk", "192.0.2.1", 10809, disks,
                        state="protected", points=tuple(points))
    return manifest, FakeTarget(backing)


def chain_of(world: FakeTarget, top: str) -> list[str]:
    out = []
    while top is not None:
        out.append(top)
        top = world.backing[top]
    return out[::-1]


def test_deleting_a_point_commits_the_next_image_into_it():
    manifest, world = chain_world()
    saved: list[Manifest] = []
    after = delete_point(world, world, manifest, "p1", save=saved.append)
    assert [p.id for p in after.points] == ["p0", "p2", "p3"]
    # per disk: p2's image (the overlay made when p1 was taken) went into p1's image, which p2 now names
    assert [(c["top"], c["base"]) for c in world.commits] == [
        ("/r/vd0.after-p1.qcow2", "/r/vd0.after-p0.qcow2"), ("/r/vd1.after-p1.qcow2", "/r/vd1.after-p0.qcow2")]
    assert after.point("p2").images == {"vd0": "/r/vd0.after-p0.qcow2", "vd1": "/r/vd1.after-p0.qcow2"}
    assert world.removed == ["/r/vd0.after-p1.qcow2", "/r/vd1.after-p1.qcow2"]
    for disk in after.disks:
        assert chain_of(world, disk.replica_image) == [
            *(p.images[disk.device] for p in after.points), disk.replica_image]
    assert all(c["device"] == d.replica_image for c, d in zip(world.commits, after.disks))  # the export's root node
    # the point left the manifest (saved) before any commit; then one save per commit
    assert [len(m.points) for m in saved] == [3, 3, 3]
    assert saved[0].point("p2").images["vd0"] == "/r/vd0.after-p1.qcow2"
    assert saved[-1] == after


def test_deleting_the_oldest_and_two_in_a_row():
    manifest, world = chain_world(("vd0",), n_points=5)
    after = delete_points(world, world, manifest, ["p0", "p2", "p1"], save=lambda m: None)
    assert [p.id for p in after.points] == ["p3", "p4"]
    # p1's image is merged into p0's (the full image), then p3's image into it too, in one commit
    assert [(c["top"], c["base"]) for c in world.commits] == [("/r/vd0.after-p2.qcow2", "/r/vd0.qcow2")]
    assert after.point("p3").images["vd0"] == "/r/vd0.qcow2"
    assert chain_of(world, after.disks[0].replica_image) == [
        "/r/vd0.qcow2", "/r/vd0.after-p3.qcow2", "/r/vd0.after-p4.qcow2"]
    assert sorted(world.removed) == ["/r/vd0.after-p0.qcow2", "/r/vd0.after-p1.qcow2", "/r/vd0.after-p2.qcow2"]


def test_the_newest_point_is_never_deleted():
    manifest, world = chain_world()
    with pytest.raises(Refused, match="newest point"):
        delete_point(world, world, manifest, "p3", save=lambda m: pytest.fail("saved"))
    with pytest.raises(DrtoolError, match="no point p9"):
        delete_point(world, world, manifest, "p9", save=lambda m: pytest.fail("saved"))
    assert world.commits == []


def test_an_interrupted_merge_still_running_is_waited_for():
    manifest, world = chain_world()
    world.jobs = [{"device": f"{COMMIT_JOB_PREFIX}0", "type": "commit"}]
    with pytest.raises(Refused, match="still merging"):
        delete_point(world, world, manifest, "p1", save=lambda m: pytest.fail("saved"))


def test_a_failed_commit_leaves_every_listed_point_intact_and_the_next_deletion_finishes():
    manifest, world = chain_world()
    world.fail_commit_on = {"/r/vd1.after-p1.qcow2"}
    saved: list[Manifest] = []
    with pytest.raises(DrtoolError, match="No space left on device"):
        delete_point(world, world, manifest, "p1", save=saved.append)
    state = saved[-1]
    assert [p.id for p in state.points] == ["p0", "p2", "p3"]  # p1 is gone from the manifest
    assert state.point("p2").images == {"vd0": "/r/vd0.after-p0.qcow2", "vd1": "/r/vd1.after-p1.qcow2"}
    for disk in state.disks:  # every image a point names is in its chain, in order
        chain = chain_of(world, disk.replica_image)
        assert [c for c in chain if c in {p.images[disk.device] for p in state.points}] == [
            p.images[disk.device] for p in state.points]
    assert "/r/vd1.after-p0.qcow2" in chain_of(world, state.disks[1].replica_image)  # an orphan, no harm
    # the next deletion merges the orphan too
    world.fail_commit_on = set()
    after = delete_point(world, world, state, "p2", save=saved.append)
    assert [p.id for p in after.points] == ["p0", "p3"]
    for disk in after.disks:
        assert chain_of(world, disk.replica_image) == [
            *(p.images[disk.device] for p in after.points), disk.replica_image]


def test_a_commit_done_but_not_saved_is_repaired_by_the_next_deletion():
    manifest, world = chain_world(("vd0",), n_points=4)
    saved: list[Manifest] = []

    def die_after_first_save(m: Manifest) -> None:
        saved.append(m)
        if len(saved) == 2:  # the commit finished; drtool dies before this save lands
            saved.pop()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        delete_point(world, world, manifest, "p1", save=die_after_first_save)
    state = saved[-1]
    assert state.point("p2").images["vd0"] == "/r/vd0.after-p1.qcow2"  # left the chain, still on disk
    assert "/r/vd0.after-p1.qcow2" not in chain_of(world, state.disks[0].replica_image)
    after = delete_point(world, world, state, "p0", save=saved.append)
    assert [p.id for p in after.points] == ["p2", "p3"]
    assert after.point("p2").images["vd0"] == "/r/vd0.qcow2"
    assert chain_of(world, after.disks[0].replica_image) == [
        "/r/vd0.qcow2", "/r/vd0.after-p2.qcow2", "/r/vd0.after-p3.qcow2"]
    assert "/r/vd0.after-p1.qcow2" not in world.backing  # the stale file was removed


def test_a_chain_that_disagrees_with_the_manifest_stops_deletion():
    manifest, world = chain_world(("vd0",), n_points=3)
    world.backing["/r/vd0.after-p2.qcow2"] = "/r/vd0.after-p0.qcow2"  # p2's image is not in the chain any more
    del world.backing["/r/vd0.after-p1.qcow2"]
    with pytest.raises(DrtoolError):
        delete_point(world, world, manifest, "p0", save=lambda m: None)
    assert world.commits == []


def test_all_keeps_every_point_and_stands_alone():
    points = [point(f"p{i}", T0 + timedelta(seconds=i)) for i in range(5)]
    assert points_to_delete(points, parse_rules(["all"]), T0 + timedelta(days=30)) == []
    assert parse_inventory(BASE + 'retention = ["All"]\n', CONF).vm("web").retention[0].keeps_all
    assert config_error(BASE + 'retention = ["all", "daily for 7d"]\n') == (
        f'{CONF}: [vms.web] retention = ["all", "daily for 7d"]: "all" keeps every point: list it alone (line 12)')


# -- retention after a checkpoint (services.checkpoint.apply_retention) ------------------------


def _vm(rules: list[str]):  # noqa: ANN202
    inv = parse_inventory(BASE + f"retention = {json.dumps(rules)}\n", CONF)
    return inv.vm("web")


def test_apply_retention_deletes_saves_and_reports_a_failure(monkeypatch):
    from drtool.services import checkpoint as service

    manifest, world = chain_world(n_points=4)  # p0..p3, one minute apart from T0
    saved: list[Manifest] = []
    monkeypatch.setattr(service, "save_manifest", lambda dr, vm, m: saved.append(m))
    vm = _vm(["every 2m for 1h"])  # buckets [0,2) [2,4) minutes: p1 and p3 stay
    world.fail_commit_on = {"/r/vd1.after-p0.qcow2"}  # on vd1, merging p1's image into p0's fails
    deleted, failure = service.apply_retention(world, world, vm, manifest, now=T0 + timedelta(minutes=4))
    assert deleted == ("p0", "p2") and "deleting old points failed" in failure and "No space" in failure
    assert [p.id for p in saved[-1].points] == ["p1", "p3"]  # what the DR host holds is consistent
    world.fail_commit_on = set()
    deleted, failure = service.apply_retention(world, world, vm, saved[-1], now=T0 + timedelta(minutes=4))
    assert (deleted, failure) == ((), "")  # nothing more to delete: the orphan waits for the next deletion


def test_apply_retention_keeps_everything_while_a_failover_is_recorded(monkeypatch):
    from drtool.services import checkpoint as service

    manifest, world = chain_world(n_points=3)
    monkeypatch.setattr(service, "save_manifest", lambda dr, vm, m: pytest.fail("saved"))
    failing_over = replace(manifest, failover={"kind": "planned", "steps": ["source-paused"]})
    vm = _vm(["every 1m for 1m"])
    assert service.apply_retention(world, world, vm, failing_over, now=T0 + timedelta(days=1)) == ((), "")
    assert world.commits == []
