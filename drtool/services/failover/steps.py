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
from drtool.mechanics.dr_vm import dr_run_layout, dr_vm_session, map_recorded, start_vm, vm_pid
from drtool.mechanics.libvirt_domain import (
    domain_name,
    domain_running,
    dr_domain_xml,
    open_to_qemu_group,
    start_domain,
)
from drtool.mechanics.remote import create_overlay, make_dirs
from drtool.state.manifest import Manifest, RecoveryPoint
from drtool.state.records import FailoverRecord, Step
from drtool.state.store import save_manifest
from drtool.transport.connections import Reach

# Test hook: SIGKILL drtool right after this step is recorded. Armed only together with
# DRTOOL_TEST_HOOKS=1, so a stray variable in a production environment does nothing.
FAULT_ENV = "DRTOOL_FAULT_AFTER_STEP"
HOOKS_ENV = "DRTOOL_TEST_HOOKS"


class FailoverSteps:
    """One failover's work against the hosts; subclasses run the steps of one kind."""

    def __init__(self, reach: Reach, vm: Vm, manifest: Manifest) -> None:
        self.reach, self.vm, self.manifest = reach, vm, manifest
        self.dr = reach.shell(vm.dr_host)
        self.layout = TargetLayout(vm.replica_dir)
        self.run_layout = dr_run_layout(vm.replica_dir)
        self._step_started = time.monotonic()

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

    def record_step(self, step: Step, **changes: object) -> None:
        """Record a step as done, with the record's other fields that go with it."""
        record = replace(self.record.with_step(step, time.monotonic() - self._step_started), **changes)  # type: ignore[arg-type]
        self._step_started = time.monotonic()
        self.save_record(record)
        if os.environ.get(HOOKS_ENV) == "1" and os.environ.get(FAULT_ENV) == step.value:
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

    def start_on_dr(self, disks: dict[str, str]) -> None:
        xml = self.manifest.hardware.get("libvirt_xml")
        if xml is not None:  # the DR host's libvirt runs the copy, from the domain's definition
            if not domain_running(self.dr, self.vm, domain_name(xml)):
                make_dirs(self.dr, self.run_layout.run_dir)
                if self.manifest.hardware.get("gid"):
                    open_to_qemu_group(self.dr, self.vm.replica_dir, int(self.manifest.hardware["gid"]))
                mapped = dr_domain_xml(xml, disks, tuple(self.manifest.hardware.get("exclude", ())))
                start_domain(self.dr, self.vm, mapped, self.run_layout.run_dir)
            return
        if vm_pid(self.dr, self.run_layout) is not None:
            return  # started by an earlier run that was killed before recording it
        argv = map_recorded(self.manifest.hardware, disks, self.run_layout, str(self.vm.qmp_socket)).argv
        start_vm(self.dr, argv, self.run_layout)

    def verify(self) -> str:
        """Resume the VM on the DR host and see it run."""
        xml = self.manifest.hardware.get("libvirt_xml")
        if xml is not None:  # libvirt started it running
            if not domain_running(self.dr, self.vm, domain_name(xml)):
                raise DrtoolError(f"libvirt on {self.vm.dr_host} started {domain_name(xml)} but it is not running")
            return "running"
        with dr_vm_session(self.reach, self.vm) as qmp:
            if qmp.execute("query-status")["status"] != "running":
                qmp.execute("cont")
            state = str(qmp.execute("query-status")["status"])
        if state != "running":
            raise DrtoolError(f"{self.vm.name} started on {self.vm.dr_host} but is {state!r}, not running")
        return state
