"""Progress of long work: rich bars on a terminal, plain lines otherwise (cron, logs)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from drtool.mechanics.replication import DiskProgress
from drtool.units import human_size

from .output import Output

PLAIN_EVERY = 2.0  # seconds between plain progress lines


class SyncProgress:
    """A ProgressCallback for replication jobs: per disk and total, bytes, rate, ETA."""

    def __init__(self, output: Output, title: str) -> None:
        self._out = output
        self._title = title
        self._rich = output.stderr.is_terminal and not output.json_mode and not output.quiet
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last_plain = 0.0
        self._first: tuple[float, int] | None = None  # (time, bytes done) at the first report
        self._finished_said = False

    def __enter__(self) -> SyncProgress:
        if self._rich:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeRemainingColumn(), console=self._out.stderr, transient=False,
            )
            self._progress.start()
        return self

    def __call__(self, disks: Sequence[DiskProgress]) -> None:
        total = sum(d.total for d in disks)
        done = sum(d.done for d in disks)
        if self._progress is not None:
            for d in [*disks, DiskProgress("total", total, done, all(x.ready for x in disks))]:
                if d.device not in self._tasks:
                    self._tasks[d.device] = self._progress.add_task(f"{self._title} {d.device}", total=d.total)
                self._progress.update(self._tasks[d.device], total=max(d.total, 1), completed=d.done)
            return
        now = time.monotonic()
        if self._first is None:
            self._first = (now, done)
        finished = all(d.ready for d in disks)
        if (finished and not self._finished_said) or (not finished and now - self._last_plain >= PLAIN_EVERY):
            self._last_plain = now
            self._finished_said = finished
            first_time, first_done = self._first
            elapsed = now - first_time
            # no rate before there is one to tell (the first line would say "0 B/s")
            rate = f" at {human_size((done - first_done) / elapsed)}/s" if elapsed >= 1.0 else ""
            pct = 100.0 * done / total if total else 100.0
            per_disk = ", ".join(f"{d.device} {human_size(d.done)}/{human_size(d.total)}" for d in disks)
            self._out.info(f"{self._title}: {pct:5.1f}% {human_size(done)}/{human_size(total)}"
                           f"{rate} ({per_disk})" + (" in sync" if finished else ""))

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
