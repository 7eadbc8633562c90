"""A planned failover: the source answers, so nothing it wrote is lost (RPO 0).

  source-paused        QMP stop on the source (recorded as a pause of drtool's first)
  final-point          the mirrors drained, a point of every disk
  replication-stopped  jobs cancelled (never completed: the source keeps its disks),
                       NBD nodes and the link relay gone, the DR target stopped
  source-stopped       the source QEMU quits: never two running copies
  dr-started           the VM starts on the DR host on the replicas, above the final point

One QMP session per monitor serves the whole failover (sessions.py), and the
steps share manifest writes where the rule "recorded before it is done"
allows: the failover, the pause and the pending final point are written in
one go before the QMP stop; the pause and the point are recorded done
together; the DR copy starts, paused (-S), while the source quits, and is
resumed only once the source is gone and both steps are recorded.

Stopping replication is the point of no return. Before it, a failure resumes
the source and undoes the records of the pause and the final point with it: a
re-run pauses and drains again and takes a new final point, trusting no old
record while the source may have run. From it on, the source stays paused (it
must never run unreplicated); a re-run finishes, --rollback resumes it, and
`--force` finishes from the final point if the source died.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import replace

from drtool.errors import DrtoolError, QmpError, Refused, RemoteCommandError, UnreachableError
from drtool.mechanics.dr_target import stop_target, target_process
from drtool.mechanics.hardware import read_hardware, source_qemu_alive
from drtool.mechanics.libvirt_domain import stop_source_domain
from drtool.mechanics.link import stop_link
from drtool.mechanics.pausing import DRAIN_TIMEOUT, resume_source
from drtool.mechanics.points import point_transaction, prepare_point, take_point
from drtool.mechanics.remote import wait_gone
from drtool.mechanics.replication import cancel_mirrors, current_nodes, detach_target, query_jobs, wait_drained
from drtool.state.manifest import now
from drtool.state.records import SourcePause, Step
from drtool.transport.qmp import QmpSession

from .sessions import in_background
from .steps import FailoverSteps

SOURCE_QUIT_TIMEOUT = 30.0


class PlannedFailover(FailoverSteps):
    # work in the background (sessions.in_background), each waited for where its result is needed
    _source_pid: Future | None = None  # the source QEMU's pid, looked up while the failover runs
    _source_gone: Future | None = None  # waits, from before the quit, until that process has ended
    _dr_start: Future | None = None  # the target stopped and the DR copy started paused, once replication stopped
    _link_stop: Future | None = None  # the link relay on the source host stopped

    @property
    def _libvirt(self) -> bool:
        return self.manifest.hardware.get("libvirt_xml") is not None

    def run(self) -> None:
        if not self._libvirt and not self.done(Step.SOURCE_STOPPED):
            src = self.reach.shell(self.vm.host)
            self._source_pid = in_background(lambda: read_hardware(src, self.vm)["pid"])
        try:
            self._run()
        finally:  # nothing is left half-way in the background (a source not quit is not waited for)
            for work in (self._dr_start, self._link_stop):
                if work is not None:
                    with contextlib.suppress(BaseException):
                        work.exception()

    def _run(self) -> None:
        if not self.done(Step.REPLICATION_STOPPED):
            try:
                with self.sessions.source() as qmp:
                    self._pause_and_final_point(qmp)
                    self._stop_replication(qmp)
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
        elif not (self.done(Step.SOURCE_STOPPED) and self.done(Step.DR_STARTED)):
            self._stop_link_and_start_dr()  # again: an earlier run may have been killed before either ended
        if self.done(Step.SOURCE_STOPPED) and self.done(Step.DR_STARTED):
            return
        if self._libvirt:
            self._stop_source_then_start_dr()
            return
        if not self.done(Step.SOURCE_STOPPED):
            self._stop_source()
            self.step_done(Step.SOURCE_STOPPED)
        for work in (self._dr_start, self._link_stop):
            if work is not None:
                work.result()
        self.step_done(Step.DR_STARTED)
        self.manifest = replace(self.manifest, source_pause=None)  # saved with the steps: nothing to resume
        self.record_step(Step.SOURCE_STOPPED, Step.DR_STARTED)

    def _stop_link_and_start_dr(self) -> None:
        """In the background once replication is stopped: the link relay stopped; the target stopped and, in the
        same round trip, the DR copy started paused (-S: no guest code runs until verify resumes it)."""
        src = self.reach.shell(self.vm.host)
        self._link_stop = in_background(lambda: stop_link(src, self.vm))
        if self._libvirt:  # libvirt starts its domain running: the target now, the domain once the source is gone
            stop_target(self.dr, self.layout)
        elif not self.done(Step.DR_STARTED):
            self._dr_start = in_background(self._start_dr_paused)

    def _start_dr_paused(self) -> None:
        self.start_on_dr({d.source_image: d.replica_image for d in self.manifest.disks},
                         stop_first=target_process(self.layout))
        self.sessions.prefetch(self.sessions.DR_VM)  # opened while the source quits and the steps are recorded

    def _stop_source_then_start_dr(self) -> None:
        """libvirt starts a domain running: only once the source is gone."""
        if not self.done(Step.SOURCE_STOPPED):
            self._stop_source()
            self.manifest = replace(self.manifest, source_pause=None)
            self.record_step(Step.SOURCE_STOPPED)
        if self._link_stop is not None:
            self._link_stop.result()
        self.start_on_dr({d.source_image: d.replica_image for d in self.manifest.disks})
        self.record_step(Step.DR_STARTED)

    def _pause_and_final_point(self, qmp: QmpSession) -> None:
        """Re-establish both, whatever an earlier run recorded: the source paused, a point after its last write.

        The pause (before the QMP stop) and the pending final point (before its
        snapshot transaction) are recorded in one manifest write, with the
        failover itself on a first run; both are recorded done in the next.
        """
        status = str(qmp.execute("query-status")["status"])
        jobs = query_jobs(qmp, self.manifest)
        if len(jobs) < len(self.manifest.disks):
            self._require_final_point_stands(status)
            return
        if any(j.broken for j in jobs.values()):
            raise Refused(f"replication of {self.vm.name} is broken: a planned failover now would lose writes",
                          hint=f"undo this failover (drtool failover {self.vm.name} --rollback), run drtool "
                               f"resync {self.vm.name}, then fail over again")
        running = status == "running"
        if not running and self.done(Step.SOURCE_PAUSED) and self.done(Step.FINAL_POINT):
            return  # paused since its final point: a re-run after a kill
        pause: SourcePause | None
        source_was: str | None
        if running:
            source_was, pause = "running", SourcePause("failover", now())
        elif self.done(Step.SOURCE_PAUSED):
            source_was, pause = self.record.source_was, self.manifest.source_pause
        else:  # paused by an earlier run killed before it recorded the step, or by someone else (left so)
            source_was = "running" if self.manifest.source_pause is not None else status
            pause = self.manifest.source_pause
        nodes = current_nodes(qmp, self.manifest)
        record = self.record.without(*((Step.SOURCE_PAUSED,) if running else ()), Step.FINAL_POINT)
        pending = prepare_point(replace(self.manifest, failover=record, source_pause=pause), self.layout, "final", 0)
        self.save(pending)
        with self.sessions.target() as target:
            try:
                actions = point_transaction(target, pending)
            except DrtoolError:
                self._forget_pending()
                raise
            if running:
                qmp.execute("stop")
                self.step_done(Step.SOURCE_PAUSED)
            if not wait_drained(qmp, pending, nodes, DRAIN_TIMEOUT):
                self._forget_pending()
                raise DrtoolError(f"the mirrors of {self.vm.name} did not drain within {DRAIN_TIMEOUT:g} s; "
                                  "no final point taken",
                                  hint=f"see drtool status {self.vm.name}: the link or the DR storage may be stalled")
            try:
                taken = take_point(target, pending, actions)
            except QmpError:  # refused: nothing switched, but QEMU may have left the new files behind
                self._forget_pending()
                raise
        point = replace(taken.points[-1], time=now())
        self.manifest = replace(taken, points=(*taken.points[:-1], point))
        self.record_step(Step.SOURCE_PAUSED, Step.FINAL_POINT, point=point.id, source_was=source_was)

    def _forget_pending(self) -> None:
        """The final point surely did not happen: its record and any file QEMU left go."""
        pending = self.manifest.pending_point
        if pending is None:
            return
        with contextlib.suppress(DrtoolError):  # else the next load settles it from what is on disk
            self.dr.run(["rm", "-f", "--", *pending.tops.values()], timeout=30)
            self.save(replace(self.manifest, pending_point=None))

    def _require_final_point_stands(self, status: str) -> None:
        """An earlier run began stopping replication: go on only if nothing was written since its final point."""
        if status == "running" or not self.done(Step.FINAL_POINT):
            raise Refused(f"replication of {self.vm.name} was stopped half-way by an earlier failover, and the "
                          "source " + ("has run since" if status == "running" else "has no final point"),
                          hint=f"undo it (drtool failover {self.vm.name} --rollback), then fail over again")

    def _stop_replication(self, qmp: QmpSession) -> None:
        """The mirrors cancelled and the NBD nodes gone: the source writes to the replicas no more.

        The relay, the target and the DR copy's start follow in the background;
        a re-run does them again, so the step is recorded at once.
        """
        if query_jobs(qmp, self.manifest):
            cancel_mirrors(qmp, self.manifest)
        detach_target(qmp, self.manifest)
        self._stop_link_and_start_dr()
        if self._source_pid is not None:  # from before the quit, so that its end is seen at once
            self._source_gone = in_background(self._wait_source_gone)
        self.record_step(Step.REPLICATION_STOPPED)

    def _give_back_source(self) -> str:
        """After a failure before the point of no return: resume the source, and forget the pause and final point.

        Only while every mirror job still exists (they track what the guest
        writes from now on); with replication half-stopped the source stays
        paused, and a re-run or --rollback decides. "" when the source runs
        (or was not paused by drtool), else why it stays paused.
        """
        paused_by_drtool = self.record.source_was == "running" or self.manifest.source_pause is not None
        try:
            with self.sessions.source() as qmp:
                if len(query_jobs(qmp, self.manifest)) < len(self.manifest.disks):
                    return "replication was being stopped, and it must not run unreplicated"
                if paused_by_drtool:
                    resume_source(self.reach, self.vm, qmp)
        except (DrtoolError, OSError) as err:
            if not paused_by_drtool and not self.record.steps:
                return ""  # nothing was paused or recorded: nothing to give back
            return f"it could not be resumed ({err})"
        with contextlib.suppress(DrtoolError, OSError):  # if this fails, the next run finds the source running
            self.save_record(self.record.without(Step.SOURCE_PAUSED, Step.FINAL_POINT), source_pause=None)
        return ""

    def _wait_source_gone(self) -> bool:
        """Whether the source QEMU ended within SOURCE_QUIT_TIMEOUT (it may be gone already)."""
        assert self._source_pid is not None
        try:
            pid = int(self._source_pid.result())
        except RemoteCommandError as err:
            if "no QEMU process" in err.message:
                return True
            raise
        return wait_gone(self.reach.shell(self.vm.host), pid, str(self.vm.monitor), SOURCE_QUIT_TIMEOUT)

    def _stop_source(self) -> None:
        """Quit the source QEMU and see its process gone: only then may the DR copy run."""
        src = self.reach.shell(self.vm.host)  # unreachable now: stop here, the user decides (--force)
        if self.vm.libvirt_domain is not None:
            stop_source_domain(src, self.vm)  # destroyed, and not started again with its host
            gone = not source_qemu_alive(src, self.vm, wait_gone=SOURCE_QUIT_TIMEOUT)
        else:
            gone_later = self._source_gone or in_background(self._wait_source_gone)
            with contextlib.suppress(UnreachableError, QmpError), self.sessions.source() as qmp:
                qmp.execute("quit")  # it may be gone already: a re-run after the quit
            self.sessions.drop(self.sessions.SOURCE)
            gone = gone_later.result()
        if not gone:
            raise DrtoolError(f"the source QEMU of {self.vm.name} still runs on {self.vm.host} after quit; "
                              f"the VM was not resumed on {self.vm.dr_host}",
                              hint="stop it, then run the same failover again")
