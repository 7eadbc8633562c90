"""Drills against the lab, judged by a real Linux guest writing numbered records (see guest_drills.py).

Each drill prints its RPO and RTO (visible with pytest -s) and asserts bounds on them.
The round trip (failover, reprotect, failback) waits for `drtool recover` (issue 8).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from drtool.lab.guest import build_guest

from .guest_drills import fail_over_and_verify, protect_guest, start_guest_vm, stop_dr_copy

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
