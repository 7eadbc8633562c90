"""Drills against the lab, judged by a real Linux guest writing numbered records (see guest_drills.py).

Each drill prints its RPO and RTO (visible with pytest -s) and asserts bounds on them.
The round trip (failover, reprotect, failback) waits for `drtool recover` (issue 8).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pytest

from drtool.lab.guest import Ack, build_guest
from drtool.mechanics.link import LINK_TIMEOUT

from .guest_drills import (
    fail_over_and_verify,
    manifest_of,
    newest_point_age,
    protect_guest,
    run_drtool,
    start_guest_vm,
    stop_dr_copy,
)

pytestmark = pytest.mark.lab
_numbers = itertools.count(1)
RTO_BOUND = 60.0  # s from the failover command to the DR guest's report, on a busy 2-core lab under TCG


@pytest.fixture(scope="module")
def guest():
    return build_guest()


@pytest.fixture
def guest_vm(lab, guest, request, tmp_path):
    """A lab VM running the guest's writer on site-a, its inventory (settings from the test's mark)."""
    mark = request.node.get_closest_marker("inventory")
    settings = dict(mark.kwargs) if mark else {}
    vm = start_guest_vm(lab, guest, f"g{next(_numbers)}-{request.node.name[5:20]}")
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b", **settings}})
    yield vm, config
    stop_dr_copy(lab, vm)


@pytest.mark.inventory(mode="sync")
def test_sync_unplanned_failover_keeps_every_acknowledged_record(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    outcome = fail_over_and_verify(lab, vm, config, "sync-unplanned", vm.name, "--force")
    assert outcome.report.problems() == []
    assert outcome.lost_acknowledged() == []
    assert outcome.rpo_records == 0 and outcome.rto_seconds < RTO_BOUND
    said = outcome.drtool_report
    assert (said["rpo_seconds"], said["rpo_bound"]) == (0, "exact"), said["rpo_reason"]
    assert said["rto_seconds"] < outcome.rto_seconds and "no guest agent" in said["rto_guest_reason"]


@pytest.mark.inventory(mode="sync")
def test_sync_failover_after_the_link_failed_first_says_since_when_and_not_rpo_0(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    cut_at = time.time()
    lab.cut_site_link("site-a", "site-b")
    acked_at_cut = vm.console.last_ack().n
    # sync mode holds the guest's next write for the DR side until the link counts as dead, then the guest
    # writes on unreplicated. The console lags the disks (an ack printed after acked_at_cut was read once
    # left exactly 10 lost against "more than 10"): the first ack after that stall is the anchor, as every
    # record after it was written with the link already down
    stalled = vm.console.wait_for("the writer held by the cut, then 20 writes past it",
                                  lambda: _after_the_stall(vm.console.acks(), acked_at_cut, 20), timeout=180)
    outcome = fail_over_and_verify(lab, vm, config, "sync-link-first", vm.name, "--force", link_up=False)
    assert outcome.report.problems() == []
    print(f"the writer was held {stalled.held:.1f} s (guest clock) at record {stalled.ack.n}", flush=True)
    # the guest saw it: what it wrote after the cut is gone
    assert outcome.report.b.max <= stalled.ack.n, f"the DR copy holds records written after the cut: {outcome.line()}"
    assert outcome.rpo_records >= outcome.last_ack.n - stalled.ack.n >= 20
    said = outcome.drtool_report
    assert said["rpo_bound"] == "unknown" and said["rpo_seconds"] is None and "last heard" in said["rpo_reason"]
    seen = manifest_of(lab, vm)["failover"]["source_seen"]
    heard_at = seen["observed_at"] - seen["heard_ago"]
    assert abs(heard_at - cut_at) < 3, f"the DR host last heard the source at {heard_at}, the link was cut at {cut_at}"


@dataclass(frozen=True)
class _Stall:
    ack: Ack  # the first record acknowledged after the stall
    held: float  # s on the guest's clock since the ack before it


def _after_the_stall(acks: list[Ack], after: int, then: int) -> _Stall | None:
    """The sync write held by a dead link: the first ack above `after` at least half LINK_TIMEOUT after the one
    before it (a writing guest acks every few tens of ms), once `then` more records followed it."""
    for before, ack in itertools.pairwise(acks):
        if ack.n > after and ack.t - before.t >= LINK_TIMEOUT / 2:
            return _Stall(ack, ack.t - before.t) if acks[-1].n >= ack.n + then else None
    return None


def checkpoints_while_writing(vm, config, count: int, every: float = 3.0) -> int:
    """Take `count` points `every` s apart while the guest writes; the last ack before the newest point began."""
    before_last = 0
    for _ in range(count):
        time.sleep(every)
        before_last = vm.console.last_ack().n
        run_drtool(config, "checkpoint", vm.name)
    return before_last


@pytest.mark.inventory(mode="async")
def test_async_unplanned_failover_loses_at_most_the_points_age_in_write_order(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    acked_before_point = checkpoints_while_writing(vm, config, 3)
    vm.console.wait_acks(len(vm.console.acks()) + 30)  # writes after the newest point: they will be lost
    outcome = fail_over_and_verify(lab, vm, config, "async-unplanned", vm.name, "--force")
    ended_age = newest_point_age(lab, vm, time.time())  # later than the failover's look at the source
    age = newest_point_age(lab, vm, outcome.lost_at)
    print(f"newest point {age:.1f} s old when the source was lost", flush=True)
    assert outcome.report.problems() == [], "not a gap-free prefix in write order"
    assert outcome.report.b.max >= acked_before_point, "the point lacks records acknowledged before it was taken"
    assert 0 < outcome.rpo_records and outcome.rpo_seconds <= age + 0.5
    said = outcome.drtool_report
    print(f"drtool: RPO {said['rpo_bound']} {said['rpo_seconds']} s: {said['rpo_reason']}", flush=True)
    # a real upper bound of what the guest lost (its clock stops while a point pauses it: less, never more),
    # the point's age when the DR host found the source gone, before the failover command ended
    assert said["rpo_bound"] == "upper bound" and outcome.rpo_seconds <= said["rpo_seconds"] <= ended_age
    assert outcome.rto_seconds < RTO_BOUND


def test_planned_failover_loses_nothing_and_the_writer_goes_on_at_the_dr_site(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    outcome = fail_over_and_verify(lab, vm, config, "planned", vm.name, disaster=False)
    assert outcome.drtool_report["kind"] == "planned"
    assert outcome.report.problems() == [] and outcome.lost_acknowledged() == []
    dr = lab.dr_console(vm.name)
    first = dr.wait_acks(5)[0]
    assert first.n == outcome.report.next == outcome.report.b.max + 1 > outcome.last_ack.n
    assert outcome.rto_seconds < RTO_BOUND


# ---------------------------------------------------------------- the drills catch a lying drtool


@pytest.mark.inventory(mode="sync")
def test_a_sync_failover_that_starts_from_a_point_is_caught(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    run_drtool(config, "checkpoint", vm.name)
    vm.console.wait_acks(len(vm.console.acks()) + 20)
    outcome = fail_over_and_verify(lab, vm, config, "liar-point-not-latest", vm.name, "--force",
                                   lie="point-not-latest")
    assert outcome.rpo_records >= 20
    assert outcome.lost_acknowledged(), "the drill did not notice lost acknowledged records"


def test_a_planned_failover_that_does_not_pause_the_source_is_caught(lab, guest_vm):
    vm, config = guest_vm
    protect_guest(lab, vm, config)
    outcome = fail_over_and_verify(lab, vm, config, "liar-no-pause", vm.name, disaster=False, lie="no-pause")
    assert outcome.lost_acknowledged(), "the drill did not notice lost acknowledged records"
