"""A fake of the job table of a source QEMU, for the replication mechanics' unit tests.

It keeps the rules QEMU 7.2 applies (job-status transitions, verbs allowed per
status) so that the mechanics can be walked through states a real QEMU reaches
only after an interruption: a concluded job left by a cancel that was killed,
a job stuck aborting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from drtool.errors import QmpError

from .fakes import ExecutesInOrder


@dataclass
class FakeJob:
    status: str = "ready"  # created running ready standby paused waiting pending aborting concluded
    length: int = 1 << 20
    offset: int = 1 << 20
    io_status: str = "ok"
    aborting_polls: int = 0  # after a cancel: queries spent "aborting" before "concluded" (-1: forever)
    progress: int = 0  # bytes copied per query while running


class HangGuard(AssertionError):
    """The code under test polled far more than any bounded wait would: it waits forever."""


@dataclass
class FakeJobsQemu(ExecutesInOrder):
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    executed: list[tuple[str, Any]] = field(default_factory=list)
    max_queries: int = 2000

    def execute(self, command: str, args: dict | None = None, *, timeout: float | None = None) -> Any:
        self.executed.append((command, args))
        args = args or {}
        if command in ("query-jobs", "query-block-jobs"):
            self._tick()
            if command == "query-jobs":
                return [{"id": jid, "type": "mirror", "status": j.status} for jid, j in self.jobs.items()]
            return [{"device": jid, "len": j.length, "offset": j.offset, "ready": j.status in ("ready", "standby"),
                     "status": j.status, "paused": j.status == "paused", "io-status": j.io_status,
                     "busy": False, "type": "mirror", "speed": 0} for jid, j in self.jobs.items()]
        if command == "block-job-cancel":
            job = self._job(args["device"])
            if job.status in ("waiting", "pending", "aborting", "concluded", "null"):
                raise QmpError(command, "GenericError",
                               f"Job '{args['device']}' in state '{job.status}' cannot accept command verb 'cancel'")
            job.status = "aborting" if job.aborting_polls else "concluded"
            return {}
        if command == "job-dismiss":
            job = self._job(args["id"])
            if job.status != "concluded":
                raise QmpError(command, "GenericError",
                               f"Job '{args['id']}' in state '{job.status}' cannot accept command verb 'dismiss'")
            del self.jobs[args["id"]]
            return {}
        raise QmpError(command, "CommandNotFound", f"The command {command} has not been found")

    def _job(self, jid: str) -> FakeJob:
        if jid not in self.jobs:
            raise QmpError("job", "DeviceNotActive", f"No active block job with id '{jid}'")
        return self.jobs[jid]

    def _tick(self) -> None:
        polls = sum(1 for c, _ in self.executed if c in ("query-jobs", "query-block-jobs"))
        if polls > self.max_queries:
            raise HangGuard(f"{polls} job queries: this wait has no end")
        for job in self.jobs.values():
            if job.status == "aborting" and job.aborting_polls > 0:
                job.aborting_polls -= 1
                if job.aborting_polls == 0:
                    job.status = "concluded"
            if job.status == "running" and job.progress:
                job.offset = min(job.length, job.offset + job.progress)
                if job.offset == job.length:
                    job.status = "ready"

    @contextlib.contextmanager
    def subscribe(self, names: Any = ()) -> Iterator[_NoEvents]:
        yield _NoEvents()


class _NoEvents:
    def get(self, timeout: float | None = None) -> None:
        time.sleep(min(timeout or 0.0, 0.01))
        return None
