"""`drtool failover VM --live` for a libvirt domain: live.py's QMP flow, with libvirt running both ends.

The source is driven through `virsh qemu-monitor-command` exactly as live.py
drives a plain QEMU (pause-before-switchover, TLS-PSK, the mirrors completed
and the DR target stopped inside the pause). The destination is a libvirt
domain on the DR host (mechanics/libvirt_migration.py: why not `virsh migrate`):

  destination-started  `virsh create --paused` of the domain's definition on the replica tops, with
                       -incoming defer and the TLS server object through <qemu:commandline>
  migration-started .. dr-started
                       as live.py; the destination resumed with `virsh resume`, so libvirt knows it runs
  source-stopped       the DR domain defined with the clean definition (persistent, as after a cold
                       failover); the source domain's autostart recorded and disabled, the domain
                       destroyed (postmigrate); the link relay goes

Undone before the switch, the destination domain is destroyed (transient: gone
with that) and the source runs on, as live.py does for a plain QEMU.
"""

from __future__ import annotations

import contextlib
import time

from drtool.domain import Vm
from drtool.errors import DrtoolError, Refused
from drtool.mechanics.dr_target import PSK_USER, source_tls_dir
from drtool.mechanics.libvirt_domain import domain_name, stop_source_domain
from drtool.mechanics.libvirt_migration import (
    INCOMING_XML,
    complete_mirrors_batched,
    destroy_domain,
    domain_session,
    domain_state,
    drop_migration_tls,
    make_persistent,
    migration_tls_for_qemu,
    refuse_second_copy,
    start_incoming_domain,
)
from drtool.mechanics.link import stop_link
from drtool.mechanics.migration import ArmedStop, prepare_source
from drtool.state.records import Step
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.virsh_shell import VirshShellQmp

from . import live
from .live import LiveFailover


def libvirt_plan_lines(vm: Vm) -> dict[Step, str]:
    """The steps that differ from a plain QEMU's, for the plan a libvirt domain's live failover shows."""
    run_dir = vm.replica_dir / "vm"
    return {
        Step.DESTINATION_STARTED: f"{vm.dr_host}: virsh create --paused {run_dir / INCOMING_XML} (the domain on the "
                                  "replica tops, -incoming defer through <qemu:commandline>)",
        Step.DR_STARTED: f"{vm.dr_host}: virsh resume {vm.libvirt_domain}: the guest runs on, no reboot",
        Step.SOURCE_STOPPED: f"{vm.dr_host}: virsh define (the DR domain persistent); {vm.host}: autostart "
                             f"disabled, virsh destroy {vm.libvirt_domain} (postmigrate); stop the link relay",
    }


class LibvirtLiveFailover(LiveFailover):
    """live.py's steps with a libvirt domain as the destination, and the source ended as libvirt's."""

    @property
    def domain(self) -> str:
        return domain_name(self.manifest.hardware["libvirt_xml"])

    def refusals(self) -> None:
        if "libvirt_xml" not in self.manifest.hardware:
            raise Refused(f"{self.vm.name}'s manifest keeps no libvirt definition to start on {self.vm.dr_host}",
                          hint=f"run drtool checkpoint {self.vm.name} (it records the definition), then fail over")
        refuse_second_copy(self.dr, self.vm, self.vm.dr_host, self.domain, "fail over")
        super().refusals()

    def start_destination(self, tls: bool) -> None:
        run_dir = self.run_layout.run_dir
        tls_dir = migration_tls_for_qemu(self.dr, self.manifest, self.layout, run_dir) if tls else None
        start_incoming_domain(self.dr, self.vm, self.manifest, run_dir, tls_dir)

    def destination_session(self) -> QmpSession:
        return domain_session(self.dr, self.vm, self.domain, f"{self.vm.name} (failed over)")

    def moving_destination_session(self) -> contextlib.AbstractContextManager[QmpSession]:
        return self.destination_session()

    def open_sessions_ahead(self) -> None:
        """Nothing ahead: the move's source session is a virsh shell (_prepared_source), the destination is
        libvirt's domain, reached through virsh once it runs."""

    def destination_exists(self) -> bool:
        return domain_state(self.dr, self.vm, self.domain) != "shut off"

    def kill_destination(self) -> None:
        destroy_domain(self.dr, self.vm, self.domain)

    def _prepared_source(self, stack: contextlib.ExitStack, tls: bool) -> QmpSession:
        """The source's session for the move through one virsh shell (its pause-window calls cost ~2 ms)."""
        shell = self.reach.shell(self.vm.host)
        opener = getattr(shell, "open_stream", None)
        if opener is None or self.vm.libvirt_domain is None:
            return super()._prepared_source(stack, tls)
        source = stack.enter_context(VirshShellQmp(self.vm.name, shell, self.vm.libvirt_domain, self.vm.libvirt_uri,
                                                   open_stream=opener))
        prepare_source(source, source_tls_dir(self.vm) if tls else None, PSK_USER)
        return source

    def _complete_replication(self, source: QmpSession, stopper: ArmedStop, marks: dict[str, float]) -> None:
        """live.py's pause work in fewer virsh calls (each is a round trip inside the guest's pause)."""
        complete_mirrors_batched(source, self.manifest)
        marks["mirrors_completed"] = marks["nbd_detached"] = time.monotonic()
        stopper.fire()
        stopper.wait()  # the target is gone: its locks on the replicas released
        marks["target_stopped"] = time.monotonic()

    def quit_source(self, qmp: QmpSession) -> None:
        """Nothing through QMP: libvirt ends its domain (finish_source), so it knows why it stopped."""

    def finish_source(self, src: RemoteShell) -> None:
        """The DR domain made persistent, then the source domain kept from autostart and destroyed."""
        make_persistent(self.dr, self.vm, self.manifest, self.run_layout.run_dir)
        drop_migration_tls(self.dr, self.run_layout.run_dir)  # the key's copy for the destination: done with
        stop_source_domain(src, self.vm)
        # libvirt's word, not a process scan: the DR host's QEMU of the same domain name runs already
        # (and in the lab every host sees every process)
        deadline = time.monotonic() + live.SOURCE_QUIT_TIMEOUT
        while (state := domain_state(src, self.vm, self.vm.libvirt_domain or self.domain)) != "shut off":
            if time.monotonic() > deadline:
                raise DrtoolError(f"libvirt domain {self.vm.libvirt_domain} of {self.vm.name} is still {state} on "
                                  f"{self.vm.host} after virsh destroy", hint="stop it, then run the same failover "
                                                                              "again")
            time.sleep(0.2)
        stop_link(src, self.vm)
