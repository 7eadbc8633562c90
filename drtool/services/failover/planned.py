"""A planned failover: the source answers, so nothing it wrote is lost (RPO 0).

  source-paused        QMP stop on the source (recorded as a pause of drtool's first)
  final-point          the mirrors drained, a point of every disk
  replication-stopped  jobs cancelled (never completed: the source keeps its disks),
                       NBD nodes and the link relay gone, the DR target stopped
  source-stopped       the source QEMU quits: never two running copies
  dr-started           the VM starts on the DR host on the replicas, above the final point

Stopping replication is the point of no return. Before it, a failure resumes
the source and undoes the records of the pause and the final point with it: a
re-run pauses and drains again and takes a new final point, trusting no old
record while the source may have run. From it on, the source stays paused (it
must never run unreplicated); a re-run finishes, --rollback resumes it, and
`--force` finishes from the final point if the source died.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from drtool.errors import DrtoolError, QmpError, Refused, UnreachableError
from drtool.mechanics.hardware import source_qemu_alive
from drtool.mechanics.libvirt_domain import stop_source_domain
from drtool.mechanics.link import stop_link_and_target
from drtool.mechanics.pausing import resume_source, take_consistent_point, target_session
from drtool.mechanics.replication import cancel_mirrors, detach_target, query_jobs
from drtool.state.manifest import now
from drtool.state.records import SourcePause, Step
from drtool.transport.qmp import QmpSession

from .steps import FailoverSteps

SOURCE_QUIT_TIMEOUT = 30.0


class PlannedFailover(FailoverSteps):
    def run(self) -> None:
        if not self.done(Step.REPLICATION_STOPPED):
            try:
                self._pause_and_final_point()
                self._stop_replication()
            except DrtoolError as err:
                paused = self._give_back_source()
                if not paused:
                    raise
                raise DrtoolError(f"{err.message}; {self.vm.name} stays paused on {self.vm.host}: {paused}",
                                  hint=f"run drtool failover {self.vm.name} again to finish, or --rollback to "
                                       "resume it") from err
            except BaseException:
                self._give_back_source()
                raise
        if not self.done(Step.SOURCE_STOPPED):
            self._stop_source()
            self.manifest = replace(self.manifest, source_pause=None)  # saved with the step: nothing to resume
            self.record_step(Step.SOURCE_STOPPED)
        if not self.done(Step.DR_STARTED):
            self.start_on_dr({d.source_image: d.replica_image for d in self.manifest.disks})
            self.record_step(Step.DR_STARTED)

    def _pause_and_final_point(self) -> None:
        """Re-establish both, whatever an earlier run recorded: the source paused, a point after its last write."""
        with self.reach.qmp(self.vm) as qmp:
            status = str(qmp.execute("query-status")["status"])
            jobs = query_jobs(qmp, self.manifest)
            if len(jobs) < len(self.manifest.disks):
                self._require_final_point_stands(status)
                return
            if any(j.broken for j in jobs.values()):
                raise Refused(f"replication of {self.vm.name} is broken: a planned failover now would lose writes",
                              hint=f"undo this failover (drtool failover {self.vm.name} --rollback), run drtool "
                                   f"resync {self.vm.name}, then fail over again")
            paused_now = status == "running"
            if paused_now:
                self._pause(qmp)
            elif not self.done(Step.SOURCE_PAUSED):
                # paused by an earlier run killed before it recorded the step, or by someone else (left so)
                was = "running" if self.manifest.source_pause is not None else status
                self.record_step(Step.SOURCE_PAUSED, source_was=was)
            if paused_now or not self.done(Step.FINAL_POINT):
                with target_session(self.reach, self.vm) as target:
                    manifest, _ = take_consistent_point(self.reach, qmp, target, self.manifest, self.vm, self.dr,
                                                        "final", "failover")
                self.manifest = manifest
                self.record_step(Step.FINAL_POINT, point=manifest.points[-1].id)

    def _pause(self, qmp: QmpSession) -> None:
        """Record the pause, then pause: if drtool dies in between, the record makes it resumed or finished."""
        self.save_record(self.record.without(Step.SOURCE_PAUSED, Step.FINAL_POINT),
                         source_pause=SourcePause("failover", now()))
        qmp.execute("stop")
        self.record_step(Step.SOURCE_PAUSED, source_was="running")

    def _require_final_point_stands(self, status: str) -> None:
        """An earlier run began stopping replication: go on only if nothing was written since its final point."""
        if status == "running" or not self.done(Step.FINAL_POINT):
            raise Refused(f"replication of {self.vm.name} was stopped half-way by an earlier failover, and the "
                          "source " + ("has run since" if status == "running" else "has no final point"),
                          hint=f"undo it (drtool failover {self.vm.name} --rollback), then fail over again")

    def _stop_replication(self) -> None:
        with self.reach.qmp(self.vm) as qmp:
            if query_jobs(qmp, self.manifest):
                cancel_mirrors(qmp, self.manifest)
            detach_target(qmp, self.manifest)
        stop_link_and_target(self.reach.shell(self.vm.host), self.vm, self.dr, self.layout)  # both ends at once
        self.record_step(Step.REPLICATION_STOPPED)

    def _give_back_source(self) -> str:
        """After a failure before the point of no return: resume the source, and forget the pause and final point.

        Only while every mirror job still exists (they track what the guest
        writes from now on); with replication half-stopped the source stays
        paused, and a re-run or --rollback decides. "" when the source runs
        (or was not paused by drtool), else why it stays paused.
        """
        try:
            with self.reach.qmp(self.vm) as qmp:
                if len(query_jobs(qmp, self.manifest)) < len(self.manifest.disks):
                    return "replication was being stopped, and it must not run unreplicated"
            if self.record.source_was == "running" or self.manifest.source_pause is not None:
                resume_source(self.reach, self.vm)
        except (DrtoolError, OSError) as err:
            return f"it could not be resumed ({err})"
        with contextlib.suppress(DrtoolError, OSError):  # if this fails, the next run finds the source running
            self.save_record(self.record.without(Step.SOURCE_PAUSED, Step.FINAL_POINT), source_pause=None)
        return ""

    def _stop_source(self) -> None:
        """Quit the source QEMU and see its process gone: only then may the DR copy start."""
        src = self.reach.shell(self.vm.host)  # unreachable now: stop here, the user decides (--force)
        if self.vm.libvirt_domain is not None:
            stop_source_domain(src, self.vm)  # destroyed, and not started again with its host
        else:
            with contextlib.suppress(UnreachableError, QmpError), self.reach.qmp(self.vm) as qmp:
                qmp.execute("quit")  # it may be gone already: a re-run after the quit
        deadline = time.monotonic() + SOURCE_QUIT_TIMEOUT
        while source_qemu_alive(src, self.vm):
            if time.monotonic() > deadline:
                raise DrtoolError(f"the source QEMU of {self.vm.name} still runs on {self.vm.host} after quit; "
                                  "the VM was not started on the DR host",
                                  hint="stop it, then run the same failover again")
            time.sleep(0.2)
