"""A bitmap catch-up whose completion events never arrive (libvirt's event stream started late) still ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from drtool.errors import DrtoolError, QmpError
from drtool.services.resync import bitmap_backup_round

from .fakes import ExecutesInOrder
from .test_replication_jobs import manifest


class DeafQemu(ExecutesInOrder):
    """Backup jobs that conclude after a few polls; no event ever reaches the subscriber."""

    def __init__(self, polls_to_finish: int = 3, error: str | None = None) -> None:
        self.jobs: dict[str, dict[str, Any]] = {"drtool-catchup0": {"id": "drtool-catchup0", "status": "concluded"}}
        self.polls_to_finish, self.error = polls_to_finish, error
        self.executed: list[tuple[str, Any]] = []

    def execute(self, command: str, args: dict | None = None, *, timeout: float | None = None) -> Any:
        self.executed.append((command, args))
        args = args or {}
        if command == "job-dismiss":
            if args["id"] not in self.jobs or self.jobs[args["id"]]["status"] != "concluded":
                raise QmpError(command, "GenericError", f"Job '{args['id']}' not found or not concluded")
            del self.jobs[args["id"]]
            return {}
        if command == "blockdev-backup":
            assert args["auto-dismiss"] is False and args["job-id"] not in self.jobs
            self.jobs[args["job-id"]] = {"id": args["job-id"], "status": "running", "current-progress": 0,
                                         "polls": 0}
            return {}
        if command == "query-jobs":
            for job in self.jobs.values():
                job["polls"] = job.get("polls", 0) + 1
                if job["polls"] >= self.polls_to_finish and job["status"] == "running":
                    job.update(status="concluded", **{"current-progress": 65536})
                    if self.error:
                        job["error"] = self.error
            return [dict(j) for j in self.jobs.values()]
        raise AssertionError(command)

    @contextlib.contextmanager
    def subscribe(self, names: Any = ()) -> Iterator[Any]:
        class Silent:
            def get(self, timeout: float | None = None) -> None:
                return None
        yield Silent()


def test_the_catch_up_ends_by_polling_when_no_event_comes_and_frees_the_job_ids():
    qemu = DeafQemu()
    assert bitmap_backup_round(qemu, manifest(2), ["disk0", "disk1"], "drtool-resync-1", timeout=10) == 2 * 65536
    assert qemu.jobs == {}  # dismissed, and the leftover of a killed run (catchup0, concluded) dismissed first
    assert qemu.executed[0] == ("job-dismiss", {"id": "drtool-catchup0"})


def test_a_failed_catch_up_says_so():
    with pytest.raises(DrtoolError, match="catching up web failed: Input/output error"):
        bitmap_backup_round(DeafQemu(error="Input/output error"), manifest(1), ["disk0"], "b", timeout=10)
