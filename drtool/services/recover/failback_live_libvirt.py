"""`drtool recover VM --failback --live` for a libvirt domain: failback_live.py's flow with libvirt at both ends.

The DR copy (the DR host's persistent domain a failover left) is the migration's source, driven through
`virsh qemu-monitor-command` there. Home is the domain still defined at home, started the way the live
failover starts its destination (mechanics/libvirt_migration.py): `virsh create --paused` of its own
definition with `-incoming defer` and the TLS server object in <qemu:commandline>, the key copied for
libvirt's QEMU user. The steps and their records are failback_live.py's; what differs:

  live-home-started  the home domain created paused, incoming (nothing if libvirt runs it already)
  dr-stopped         the DR domain (postmigrate) destroyed and undefined, as a rollback does
  then               the home domain defined again with its clean definition (no qemu:commandline), the key's
                     copy dropped, its autostart restored as the failover recorded it

Undone before the switch, the home domain is destroyed (it stays defined, shut off) and the DR copy runs on.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import Refused
from drtool.mechanics.libvirt_domain import define_source_domain, remove_dr_domain, restore_source_autostart
from drtool.mechanics.libvirt_migration import (
    complete_mirrors_batched,
    create_incoming,
    destroy_domain,
    domain_state,
    drop_migration_tls,
    migration_tls_for_qemu,
    refuse_second_copy,
)
from drtool.state.manifest import Manifest
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.virsh_shell import VirshShellQmp

from .failback_live import LiveFailback


class LibvirtLiveFailback(LiveFailback):
    tls_on_command_line = True

    @property
    def domain(self) -> str:
        assert self.vm.libvirt_domain is not None
        return self.vm.libvirt_domain

    @property
    def definition(self) -> str:
        return str(self.work.manifest.hardware["libvirt_xml"])

    @property
    def home_run_dir(self) -> PurePosixPath:
        return self.vm.source_state_dir / "incoming"

    def refusals(self) -> None:
        if "libvirt_xml" not in self.work.manifest.hardware:
            raise Refused(f"{self.vm.name}'s manifest keeps no libvirt definition to start at home",
                          hint=f"fail back with a reboot: drtool recover {self.vm.name} --failback")
        refuse_second_copy(self.home, self.vm, self.vm.host, self.domain, "fail back")
        super().refusals()

    def start_home(self, tls: bool) -> None:
        if domain_state(self.home, self.vm, self.domain) != "shut off":
            return  # an earlier run's destination
        tls_dir = migration_tls_for_qemu(self.home, self.work.manifest, self.work.layout, self.home_run_dir) \
            if tls else None
        create_incoming(self.home, self.vm, self.vm.host, self.definition, self.home_run_dir, tls_dir)

    def migration_source(self) -> QmpSession:
        """Through one virsh shell on the DR host (~2 ms a command instead of an SSH exec and a virsh each)."""
        label = f"{self.vm.name} (failed over)"
        return self._shell_session(self.dr, self.work.rvm, label) or super().migration_source()

    def migration_home(self) -> QmpSession:
        return self._shell_session(self.home, self.vm, self.vm.name) or super().migration_home()

    def home_session_ahead(self, stack: contextlib.ExitStack) -> Future | None:
        """None: home is libvirt's domain, reached through virsh once it runs (migration_home)."""
        return None

    def _shell_session(self, shell: RemoteShell, vm: Vm, label: str) -> QmpSession | None:
        opener = getattr(shell, "open_stream", None)
        if opener is None:  # a host reached without streams: one virsh per command (VirshQmp)
            return None
        return VirshShellQmp(label, shell, self.domain, vm.libvirt_uri, open_stream=opener)

    def end_reverse_mirrors(self, source: QmpSession, reverse: Manifest) -> None:
        """In few virsh calls (cancel_mirrors' event stream alone takes 0.3 s to start); drops the NBD nodes too."""
        complete_mirrors_batched(source, reverse)

    def quit_dr_copy(self, qmp: QmpSession) -> None:
        """Nothing through QMP: libvirt ends its domain (end_dr_copy), so it knows why it stopped."""

    def end_dr_copy(self) -> None:
        remove_dr_domain(self.dr, self.vm, self.definition)

    def kill_home(self) -> None:
        destroy_domain(self.home, self.vm, self.domain)

    def finish_home(self) -> None:
        define_source_domain(self.home, self.vm, self.definition, always=True)
        drop_migration_tls(self.home, self.home_run_dir)
        restore_source_autostart(self.home, self.vm)
