"""Real QEMU command lines mapped for the DR copy (pure): libvirt 9's, -drive if=virtio, rbd, -incoming."""

import json
from pathlib import Path, PurePosixPath

import pytest

from drtool.errors import Refused, UsageError
from drtool.mechanics.command_line import plan_command_line

RUN = PurePosixPath("/dr/web/vm")
# captured from /proc/PID/cmdline of a domain libvirt 9.0.0 started (QEMU 7.2, two qcow2 disks, a NIC, a pty)
LIBVIRT9 = (Path(__file__).parent / "cmdlines" / "libvirt9-two-disks.argv").read_text().splitlines()
LIBVIRT_DISKS = {"/tmp/lvcap/a.qcow2": "/dr/web/vda.qcow2", "/tmp/lvcap/b.qcow2": "/dr/web/vdb.qcow2"}


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def json_values(argv: list[str], option: str) -> list[dict]:
    return [json.loads(v) for v in values(argv, option) if v.startswith("{")]


def test_libvirt9_blockdevs_follow_the_format_node_to_its_file():
    mapped = plan_command_line(LIBVIRT9, LIBVIRT_DISKS, "", RUN)
    nodes = {b["node-name"]: b for b in json_values(mapped.argv, "-blockdev")}
    assert nodes["libvirt-2-storage"]["filename"] == "/dr/web/vda.qcow2"
    assert nodes["libvirt-1-storage"]["filename"] == "/dr/web/vdb.qcow2"
    assert nodes["libvirt-2-format"]["file"] == "libvirt-2-storage"  # a node name, left as it is
    assert not any("/tmp/lvcap" in a for a in mapped.argv)


def test_libvirt9_descriptors_and_the_source_s_files_do_not_reach_the_dr_copy():
    mapped = plan_command_line(LIBVIRT9, LIBVIRT_DISKS, "", RUN)
    argv = mapped.argv
    assert not any("fd=" in a or '"fd"' in a for a in argv)
    assert "socket,id=charmonitor,server=on,wait=off,path=/dr/web/vm/charmonitor.sock" in argv
    assert "socket,id=drtool-qmp,path=/dr/web/vm/drtool.qmp,server=on,wait=off" in argv  # drtool's own monitor
    assert not any("masterKey0" in a for a in argv)  # its key file is in the source's libvirt state
    assert values(argv, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny"]
    assert argv[-1] == "-daemonize" and "-S" in argv
    # the tap libvirt passed in is gone; the NIC, with its MAC, is attached to nothing
    assert "-netdev" not in argv
    nic = next(d for d in json_values(argv, "-device") if d["driver"] == "virtio-net-pci")
    assert "netdev" not in nic and nic["mac"] == "52:54:00:12:34:56"
    said = "\n".join(mapped.changes)
    for expected in ("charmonitor", "hostnet0", "masterKey0", "spawn", "QMP monitor"):
        assert expected in said


def test_libvirt9_drill_keeps_every_device_with_its_nic_on_nothing():
    mapped = plan_command_line(LIBVIRT9, LIBVIRT_DISKS, "", RUN, isolate_network=True)
    drivers = [d["driver"] for d in json_values(mapped.argv, "-device")]
    source_drivers = [d["driver"] for d in json_values(LIBVIRT9, "-device")]
    assert drivers == source_drivers
    assert mapped.argv[-3:] == ["-nic", "none", "-daemonize"]


def test_libvirt9_disk_not_replicated_is_refused_by_its_device_name():
    with pytest.raises(Refused, match=r"virtio-disk1 \(/tmp/lvcap/b.qcow2\)"):
        plan_command_line(LIBVIRT9, {"/tmp/lvcap/a.qcow2": "/dr/web/vda.qcow2"}, "", RUN)


def test_an_excluded_disk_is_left_out_with_its_device_and_nodes():
    mapped = plan_command_line(LIBVIRT9, {"/tmp/lvcap/a.qcow2": "/dr/web/vda.qcow2"}, "", RUN,
                               exclude=("virtio-disk1",))
    assert not any("libvirt-1" in a or "virtio-disk1" in a for a in mapped.argv)
    assert any("libvirt-2-format" in a for a in mapped.argv)
    assert "left out disk virtio-disk1 (excluded in the inventory)" in mapped.changes


def test_excluding_a_disk_the_vm_does_not_have_is_a_usage_error():
    with pytest.raises(UsageError, match="virtio-disk7"):
        plan_command_line(LIBVIRT9, LIBVIRT_DISKS, "", RUN, exclude=("virtio-disk7",))


HAND_RUN = ["qemu-system-x86_64", "-enable-kvm", "-m", "2048", "-name", "db",
            "-drive", "file=/srv/db.qcow2,if=virtio,format=qcow2,cache=none",
            "-qmp", "unix:/run/db.qmp,server=on,wait=off", "-pidfile", "/run/db.pid", "-daemonize"]


def test_a_drive_with_if_virtio_maps_its_file():
    mapped = plan_command_line(HAND_RUN, {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN)
    assert "file=/dr/db/vda.qcow2,if=virtio,format=qcow2,cache=none" in mapped.argv
    assert "unix:/dr/web/vm/drtool.qmp,server=on,wait=off" in mapped.argv
    assert mapped.changes == ()  # nothing but paths changed


def test_a_drive_with_if_virtio_not_replicated_is_refused():
    with pytest.raises(Refused, match="/srv/db.qcow2"):
        plan_command_line(HAND_RUN, {}, "/run/db.qmp", RUN)


RBD = [*HAND_RUN[:-1], "-drive", "file=rbd:pool/db-logs:id=admin,format=raw,if=none,id=drive-logs",
       "-device", "virtio-blk-pci,drive=drive-logs,id=logs", "-daemonize"]


def test_an_rbd_disk_is_refused_with_its_name():
    with pytest.raises(Refused, match=r"logs \(rbd network storage\)"):
        plan_command_line(RBD, {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN)


def test_an_rbd_disk_as_libvirt_writes_it_is_refused_and_can_be_excluded():
    argv = [*LIBVIRT9,
            "-blockdev", '{"driver":"rbd","pool":"vms","image":"web-data","node-name":"libvirt-3-storage"}',
            "-blockdev", '{"node-name":"libvirt-3-format","driver":"raw","file":"libvirt-3-storage"}',
            "-device", '{"driver":"virtio-blk-pci","drive":"libvirt-3-format","id":"virtio-disk2"}']
    with pytest.raises(Refused, match=r"virtio-disk2 \(rbd network storage\)"):
        plan_command_line(argv, LIBVIRT_DISKS, "", RUN, isolate_network=True)
    mapped = plan_command_line(argv, LIBVIRT_DISKS, "", RUN, isolate_network=True, exclude=("virtio-disk2",))
    assert not any("rbd" in a or "libvirt-3" in a for a in mapped.argv)


def test_an_rbd_disk_excluded_leaves_the_drill_without_it():
    mapped = plan_command_line(RBD, {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN,
                               isolate_network=True, exclude=("logs",))
    assert not any("rbd:" in a or "drive-logs" in a for a in mapped.argv)


def test_a_vm_started_with_incoming_boots_from_its_disks_instead():
    argv = [*HAND_RUN[:-1], "-incoming", "tcp:0.0.0.0:4444", "-add-fd", "fd=3,set=2", "-daemonize"]
    mapped = plan_command_line(argv, {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN)
    assert "-incoming" not in mapped.argv and "-add-fd" not in mapped.argv
    assert mapped.changes == ("removed -incoming tcp:0.0.0.0:4444", "removed -add-fd fd=3,set=2")
    assert mapped.argv.count("-daemonize") == 1


@pytest.mark.parametrize("share", [
    ["-virtfs", "local,path=/srv/share,mount_tag=share0,security_model=mapped"],
    ["-fsdev", "local,id=fs0,path=/srv/share,security_model=none", "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=s"],
])
def test_a_shared_host_directory_is_refused(share):
    with pytest.raises(Refused, match="shared host directory"):
        plan_command_line([*HAND_RUN, *share], {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN)


def test_readconfig_is_refused():
    with pytest.raises(Refused, match="-readconfig"):
        plan_command_line([*HAND_RUN, "-readconfig", "/etc/qemu/db.cfg"], {"/srv/db.qcow2": "/dr/db/vda.qcow2"},
                          "/run/db.qmp", RUN)


def test_a_tcp_monitor_of_the_source_is_removed():
    argv = [*HAND_RUN, "-monitor", "telnet:127.0.0.1:5555,server=on,wait=off"]
    mapped = plan_command_line(argv, {"/srv/db.qcow2": "/dr/db/vda.qcow2"}, "/run/db.qmp", RUN)
    assert "-monitor" not in mapped.argv and len(mapped.changes) == 1
