"""An unplanned failover: the source is gone and fenced (--force); start from a point or the replicas.

  replication-stopped  the DR target stops: nothing writes to the replicas any more
  dr-started           the VM starts on writable overlays of the chosen point (the point is kept)
"""

from __future__ import annotations

from dataclasses import replace

from drtool.errors import Refused
from drtool.mechanics.dr_target import stop_target
from drtool.mechanics.dr_vm import kill_vm
from drtool.state.manifest import RecoveryPoint, now
from drtool.state.records import Step

from .steps import FailoverSteps

LATEST = "latest"  # --point latest: the replicas as the DR target last wrote them
LATEST_QUIESCE = "unplanned-latest"


class UnplannedFailover(FailoverSteps):
    def run(self) -> None:
        if not self.done(Step.REPLICATION_STOPPED):
            if self.record.converted_from and Step.REPLICATION_STOPPED in self.record.converted_from:
                # the planned run may have started the DR copy on the replicas, paused (-S): it never ran
                # (resumed only once the source is stopped); this one starts on overlays of its point
                kill_vm(self.dr, self.run_layout)
            stop_target(self.dr, self.layout)
            self.record_step(Step.REPLICATION_STOPPED)
        if not self.done(Step.DR_STARTED):
            chosen = self.record.point
            point = self._latest_as_point() if chosen == LATEST else self.manifest.point(chosen or "")
            if point is None:
                raise Refused(f"{self.vm.name} has no point {chosen!r} to start from")
            overlays = self.overlays(point, self.vm.replica_dir / "failover")
            disks = {d.source_image: overlays[d.device] for d in self.manifest.disks if d.device in overlays}
            # disks added after the point (its start reason says so): the copy starts without them
            left_out = tuple(d.source_image for d in self.manifest.disks if d.device not in overlays)
            self.save_record(replace(self.record, point=point.id))
            self.start_on_dr(disks, leave_out=left_out)
            self.record_step(Step.DR_STARTED)

    def _latest_as_point(self) -> RecoveryPoint:
        """The replicas as the (now stopped) target left them, recorded as a point of their own."""
        existing = next((p for p in self.manifest.points if p.quiesce == LATEST_QUIESCE), None)
        if existing is not None:
            return existing  # a re-run
        point = RecoveryPoint(f"latest-{now().replace(':', '').replace('-', '')[:15]}", now(), LATEST_QUIESCE,
                              0.0, {d.device: d.replica_image for d in self.manifest.disks})
        self.save(replace(self.manifest, points=(*self.manifest.points, point)))
        return point
