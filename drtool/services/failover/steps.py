"""What every failover kind does on the DR host, each step recorded in the manifest as it completes."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import DrtoolError
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.dr_vm import dr_run_layout, map_recorded, start_vm
from drtool.mechanics.libvirt_domain import (
    domain_name,
    domain_running,
    dr_domain_xml,
    open_to_qemu_group,
    start_domain,
)
from drtool.mechanics.remote import OwnProcess, create_overlay, make_dirs, stop_process
from drtool.state.manifest import Manifest, RecoveryPoint
from drtool.state.records import FailoverRecord, Step
from drtool.state.store import save_manifest
from drtool.transport.connections import Reach

from .sessions import FailoverSessions

# Test hook: SIGKILL drtool right after this step is recorded. Armed only together with
# DRTOOL_TEST_HOOKS=1, so a stray variable in a production environment does nothing.
FAULT_ENV = "DRTOOL_FAULT_AFTER_STEP"
HOOKS_ENV = "DRTOOL_TEST_HOOKS"


class FailoverSteps:
    """One failover's work against the hosts; subclasses run the steps of one kind."""

    def __init__(self, reach: Reach, vm: Vm, manifest: Manifest, sessions: FailoverSessions | None = None) -> None:
        self.reach, self.vm, self.manifest = reach, vm, manifest
        self.sessions = sessions or FailoverSessions(reach, vm)
        self.dr = reach.shell(vm.dr_host)
        self.layout = TargetLayout(vm.replica_dir)
        self.run_layout = dr_run_layout(vm.replica_dir)
        self._step_started = time.monotonic()
        self._step_seconds: dict[Step, float] = {}

    @property
    def record(self) -> FailoverRecord:
        if self.manifest.failover is None:
            raise DrtoolError(f"{self.vm.name} has no failover record")
        return self.manifest.failover

    def save(self, manifest: Manifest) -> None:
        self.manifest = manifest
        save_manifest(self.dr, self.vm, manifest)

    def save_record(self, record: FailoverRecord, **changes: object) -> None:
        self.save(replace(self.manifest, failover=record, **changes))  # type: ignore[arg-type]

    def done(self, step: Step) -> bool:
        return self.record.done(step)

    def step_done(self, step: Step) -> None:
        """A step's work is done (its time measured); record_steps writes it down."""
        now = time.monotonic()
        self._step_seconds[step] = now - self._step_started
        self._step_started = now

    def record_step(self, *steps: Step, **changes: object) -> None:
        """Record steps as done, in one manifest write, with the record's other fields that go with them."""
        record = self.record
        for step in steps:
            if step not in self._step_seconds:
                self.step_done(step)
            record = record.with_step(step, self._step_seconds.pop(step))
        self.save_record(replace(record, **changes))  # type: ignore[arg-type]
        if os.environ.get(HOOKS_ENV) == "1" and os.environ.get(FAULT_ENV) in {s.value for s in steps}:
            os.kill(os.getpid(), signal.SIGKILL)

    def overlays(self, point: RecoveryPoint, directory: PurePosixPath) -> dict[str, str]:
        """Writable overlays on a point's images (the point itself stays as it is).

        An overlay that exists already belongs to a DR copy an earlier, killed
        run started: it is kept, never created anew under a running VM.
        """
        make_dirs(self.dr, directory)
        overlays = {}
        for device, image in point.images.items():
            overlay = str(directory / f"{device}.qcow2")
            create_overlay(self.dr, image, overlay, keep_existing=True)
            overlays[device] = overlay
        return overlays

    def start_on_dr(self, disks: dict[str, str], stop_first: OwnProcess | None = None,
                    leave_out: tuple[str, ...] = ()) -> None:
        """Start the DR copy on these disks (source image -> image here), paused; stop_first: see start_vm;
        leave_out: source images of disks it runs without (see plan_command_line)."""
        xml = self.manifest.hardware.get("libvirt_xml")
        if xml is not None:  # the DR host's libvirt runs the copy, from the domain's definition
            if stop_first is not None:
                stop_process(self.dr, stop_first.pidfile, stop_first.program, stop_first.marker, 20,
                             stop_first.leftovers)
            if not domain_running(self.dr, self.vm, domain_name(xml)):
                make_dirs(self.dr, self.run_layout.run_dir)
                if self.manifest.hardware.get("gid"):
                    open_to_qemu_group(self.dr, self.vm.replica_dir, int(self.manifest.hardware["gid"]))
                mapped = dr_domain_xml(xml, disks, tuple(self.manifest.hardware.get("exclude", ())))
                start_domain(self.dr, self.vm, mapped, self.run_layout.run_dir)
            return
        argv = map_recorded(self.manifest.hardware, disks, self.run_layout, str(self.vm.qmp_socket),
                            leave_out=leave_out).argv
        start_vm(self.dr, argv, self.run_layout, stop_first=stop_first)  # not again if an earlier run started it

    def verify(self) -> str:
        """Resume the VM on the DR host and see it run."""
        xml = self.manifest.hardware.get("libvirt_xml")
        if xml is not None:  # libvirt started it running
            if not domain_running(self.dr, self.vm, domain_name(xml)):
                raise DrtoolError(f"libvirt on {self.vm.dr_host} started {domain_name(xml)} but it is not running")
            return "running"
        with self.sessions.dr_vm() as qmp:
            if qmp.execute("query-status")["status"] != "running":
                qmp.execute("cont")
                state = str(qmp.execute("query-status")["status"])
            else:
                state = "running"
        if state != "running":
            raise DrtoolError(f"{self.vm.name} started on {self.vm.dr_host} but is {state!r}, not running")
        return state
