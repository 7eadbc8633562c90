"""Replication jobs in every status QEMU can leave them in: cancel and wait by status, each with a deadline."""

from __future__ import annotations

import time

import pytest

from drtool.errors import DrtoolError
from drtool.mechanics.replication import cancel_mirrors, job_id, wait_until_ready
from drtool.state.manifest import Manifest, ReplicaDisk

from .qemu_fakes import FakeJob, FakeJobsQemu


def manifest(disks: int = 2) -> Manifest:
    return Manifest("web", "kvm1", "kvm2", "async", "tls-psk", "10.0.0.2", 10809, tuple(
        ReplicaDisk(f"vd{i}", f"disk{i}", "qcow2", 1 << 20, f"/src/vd{i}.qcow2", f"/dr/vd{i}.qcow2", f"vd{i}")
        for i in range(disks)))


def cancels(qemu: FakeJobsQemu) -> list[str]:
    return [args["device"] for command, args in qemu.executed if command == "block-job-cancel"]


def test_cancel_after_an_interrupted_cancel_dismisses_the_concluded_job_and_cancels_the_other():
    qemu = FakeJobsQemu({job_id(0): FakeJob("concluded"), job_id(1): FakeJob("ready")})
    cancel_mirrors(qemu, manifest())
    assert cancels(qemu) == [job_id(1)]  # a concluded job is never cancelled (QEMU refuses the verb)
    assert qemu.jobs == {}  # both dismissed: a new job with the same id can start


def test_cancel_waits_for_an_aborting_job_then_dismisses_it():
    qemu = FakeJobsQemu({job_id(0): FakeJob("aborting", aborting_polls=3), job_id(1): FakeJob("paused",
                                                                                               io_status="failed")})
    cancel_mirrors(qemu, manifest())
    assert cancels(qemu) == [job_id(1)]
    assert qemu.jobs == {}


def test_cancel_of_a_job_that_never_concludes_fails_at_its_deadline():
    qemu = FakeJobsQemu({job_id(0): FakeJob("aborting", aborting_polls=-1), job_id(1): FakeJob("ready")})
    started = time.monotonic()
    with pytest.raises(DrtoolError, match=rf"{job_id(0)} of web did not end within 0.3 s"):
        cancel_mirrors(qemu, manifest(), timeout=0.3)
    assert time.monotonic() - started < 2


def test_wait_until_ready_fails_at_once_on_a_concluded_job():
    qemu = FakeJobsQemu({job_id(0): FakeJob("concluded", offset=0), job_id(1): FakeJob("ready")})
    with pytest.raises(DrtoolError, match=rf"{job_id(0)} of web ended"):
        wait_until_ready(qemu, manifest(), poll=0.001)


def test_wait_until_ready_fails_when_the_copy_stands_still():
    qemu = FakeJobsQemu({job_id(0): FakeJob("running", offset=100), job_id(1): FakeJob("ready")})
    with pytest.raises(DrtoolError, match="copied nothing for 0.2 s"):
        wait_until_ready(qemu, manifest(), poll=0.01, stall_timeout=0.2)


def test_wait_until_ready_waits_as_long_as_the_copy_moves():
    qemu = FakeJobsQemu({job_id(0): FakeJob("running", offset=0, progress=1 << 14), job_id(1): FakeJob("ready")})
    wait_until_ready(qemu, manifest(), poll=0.001, stall_timeout=0.05)  # 64 polls of steady progress
    assert qemu.jobs[job_id(0)].status == "ready"
