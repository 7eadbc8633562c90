"""Points on a failed-over DR copy that libvirt runs: the same transaction and block-commits, through
virsh qemu-monitor-command on the DR domain; libvirt's pid file of the domain names the witness QEMU;
the persistent definition is re-defined on the new tops (dr_points.py).

The world is test_dr_copy_points.py's chain world after a cold planned failover, turned into a libvirt
domain's: drtool's own QEMU layout has no process (libvirt's QEMU is the DR copy), drtool's monitor socket
refuses, and QMP passes only through Reach.qmp of the DR domain.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import pytest

from drtool.domain import Vm
from drtool.errors import VmUnreachable
from drtool.mechanics import remote
from drtool.mechanics.dr_vm import LIBVIRT_RUN_DIR, dr_run_layout
from drtool.services import checkpoint
from drtool.state.protection import Protection

from .libvirt_live_world import DOMAIN_XML
from .test_dr_copy_points import DR_COPY_PID, ChainQmp, ChainReach, ChainWorld, failed_over
from .test_dr_copy_points import fast as fast  # the autouse fixture, here too
from .world import REPLICAS, Killed, World

LIBVIRT_PIDFILE = str(LIBVIRT_RUN_DIR / "web.pid")
QEMU_GID = 64055


@dataclass
class LibvirtChainWorld(ChainWorld):
    definitions: list[list[str]] = field(default_factory=list)  # the disk sources of each `virsh define`
    opened_dirs: list[tuple[str, str]] = field(default_factory=list)  # (dir, gid) made writable for QEMU

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[0] == "virsh":
            verb = argv[4]
            self.log.append(f"dr virsh {verb}")
            if verb == "define":
                root = ET.fromstring(self.files[argv[5]].decode())
                self.definitions.append([s.get("file") or "" for s in root.iter("source")])
                return 0, "", ""
            return 127, "", f"fake DR libvirt: unexpected virsh {verb}"
        return super().dr_run(argv, stdin)

    def _dr_script(self, script: str, args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if script == remote._RUNNING_PID_SCRIPT:
            if args[0] == LIBVIRT_PIDFILE:  # libvirt's pid file of the running domain
                assert args[1:] == ["qemu-system", "guest=web,"], args
                return (0, f"{DR_COPY_PID}\n", "") if self.dr_vm else (1, "", "")
            if args[0] == str(dr_run_layout(REPLICAS).pidfile):
                return 1, "", ""  # no QEMU of drtool's: libvirt runs the DR copy
        if script.startswith("chgrp"):
            self.opened_dirs.append((args[0], args[1]))
            return 0, "", ""
        return super()._dr_script(script, args, stdin)


class LibvirtChainReach(ChainReach):
    def __init__(self, world: LibvirtChainWorld) -> None:
        super().__init__(world)
        self.domain_sessions: list[tuple[str, str | None]] = []  # (host, domain) of each Reach.qmp

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> Any:
        if socket_path == dr_run_layout(REPLICAS).qmp_socket:
            raise VmUnreachable(f"{label}: no monitor of drtool's at {socket_path}: libvirt runs the DR copy")
        return super().qmp_at(host_name, socket_path, label)

    def qmp(self, vm: Vm) -> Any:
        self.domain_sessions.append((vm.host, vm.libvirt_domain))
        assert vm.libvirt_domain == "web" and vm.host == vm.dr_host, vm  # the DR domain, on the DR host
        return ChainQmp(self.world, self.world.dr_vm_qmp)


def failed_over_under_libvirt() -> tuple[LibvirtChainWorld, LibvirtChainReach, Any]:
    """test_dr_copy_points' cold planned failover, with the VM a libvirt domain the DR host's libvirt runs."""
    base, _, inv = failed_over()
    world = LibvirtChainWorld(**{f: getattr(base, f) for f in ChainWorld.__dataclass_fields__})
    manifest = world.manifest
    world.files[str(REPLICAS / "manifest.json")] = replace(
        manifest, hardware=manifest.hardware | {"libvirt_xml": DOMAIN_XML, "uid": QEMU_GID, "gid": QEMU_GID}
    ).to_json()
    vm = replace(inv.vms["web"], libvirt_domain="web", qmp_socket=None)
    assert isinstance(world, World) and world.dr_vm is not None
    return world, LibvirtChainReach(world), replace(inv, vms={"web": vm})


def test_a_point_on_a_libvirt_dr_copy_goes_through_virsh_and_redefines_the_domain_on_the_new_top() -> None:
    world, reach, inv = failed_over_under_libvirt()
    old_top = world.manifest.disks[0].replica_image
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.error is None and result.point is not None, result
    after = world.manifest
    assert after.disks[0].replica_image == world.dr_vm != old_top and after.state is Protection.FAILED_OVER
    assert reach.domain_sessions and all(d == "web" for _, d in reach.domain_sessions)
    assert len(world.dr_transactions) == 1 and world.commits == 1  # the point, and retention's commit
    assert (str(REPLICAS), str(QEMU_GID)) in world.opened_dirs  # libvirt's QEMU creates the overlay there
    assert world.definitions[-1] == [world.dr_vm]  # the next boot opens the new top, not the frozen one


def test_points_keep_and_all_on_a_libvirt_dr_copy() -> None:
    world, reach, inv = failed_over_under_libvirt()
    [taken] = checkpoint.checkpoint(inv, reach, ["web"], keep=True).results
    assert taken.point is not None and taken.point.kept
    assert taken.point.id in [p.id for p in checkpoint.list_points(inv, reach, "web").points]
    checkpoint.keep_point(inv, reach, "web", taken.point.id, kept=False)
    assert not world.manifest.point(taken.point.id).kept
    time.sleep(0.002)  # point ids are stamped to the millisecond
    [result] = checkpoint.checkpoint(inv, reach, all_vms=True).results
    assert result.point is not None and result.error is None and world.definitions[-1] == [world.dr_vm]


def test_a_libvirt_dr_copy_that_is_not_running_is_refused_with_one_line() -> None:
    world, reach, inv = failed_over_under_libvirt()
    world.dr_vm = None
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is None and "its DR copy is not running there" in (result.error or "")
    assert not world.dr_transactions and world.manifest.pending_point is None


def test_killed_between_the_pending_point_and_the_transaction_libvirts_qemu_witnesses_it_did_not_happen() -> None:
    world, reach, inv = failed_over_under_libvirt()
    world.kill_after_save(lambda raw: bool(raw.get("pending_point")))
    with pytest.raises(Killed):
        checkpoint.checkpoint(inv, reach, ["web"])
    world.revive()
    pending = world.manifest.pending_point
    assert pending is not None and not world.dr_transactions
    top = world.dr_vm
    time.sleep(0.002)
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results  # settles (dropped), then its own point
    assert result.point is not None and result.point.id != pending.point.id
    assert world.manifest.point(pending.point.id) is None and result.point.images["vd0"] == top
    assert world.manifest.disks[0].replica_image == world.dr_vm and world.definitions[-1] == [world.dr_vm]


def test_killed_after_the_transaction_the_point_is_adopted_from_libvirts_qemu_and_the_domain_redefined() -> None:
    world, reach, inv = failed_over_under_libvirt()
    world.dr_faults["transaction"] = "kill-after"
    with pytest.raises(Killed):
        checkpoint.checkpoint(inv, reach, ["web"])
    world.revive()
    pending = world.manifest.pending_point
    assert pending is not None and world.dr_vm == pending.tops["vd0"] and not world.definitions
    listed = checkpoint.list_points(inv, reach, "web")  # read-only: the point stays pending
    assert pending.point.id not in [p.id for p in listed.points]
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None
    assert pending.point.id in [p.id for p in world.manifest.points] or pending.point.id in result.deleted
    assert world.manifest.disks[0].replica_image == world.dr_vm and world.definitions[-1] == [world.dr_vm]


def test_a_failed_define_leaves_the_point_and_says_what_the_next_boot_would_open() -> None:
    world, reach, inv = failed_over_under_libvirt()
    real = world.dr_run

    def refusing(argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:1] == ["virsh"] and argv[4] == "define":
            return 1, "", "error: operation failed: domain 'web' is locked"
        return real(argv, stdin)

    world.dr_run = refusing  # type: ignore[method-assign]
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None and result.exit_code != 0
    assert "still names the old tops" in (result.error or "") and "the next checkpoint defines it" in result.error
    assert world.manifest.disks[0].replica_image == world.dr_vm  # the point stands
