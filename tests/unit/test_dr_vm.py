"""Mapping the source QEMU's command line to run elsewhere (pure)."""

from pathlib import PurePosixPath

import pytest

from drtool.mechanics.dr_vm import RunLayout, map_command_line
from drtool.errors import DrtoolError

SOURCE = [
    "qemu-system-x86_64", "-M", "pc", "-S", "-nodefaults", "-m", "1024", "-name", "web",
    "-pidfile", "/run/web.pid",
    "-blockdev", "driver=qcow2,node-name=vd0-fmt,file.driver=file,file.filename=/srv/web,,a.qcow2",
    "-device", "virtio-blk-pci,drive=vd0-fmt,id=vd0",
    "-blockdev", '{"driver": "qcow2", "node-name": "vd1-fmt", "file": {"driver": "file", "filename": "/srv/b.qcow2"}}',
    "-device", "virtio-blk-pci,drive=vd1-fmt,id=vd1",
    "-netdev", "tap,id=net0,ifname=tap0", "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
    "-chardev", "socket,id=drtool,path=/run/drtool/web.qmp,server=on,wait=off", "-mon", "chardev=drtool,mode=control",
    "-chardev", "socket,id=qga,path=/run/qga/web.sock,server=on,wait=off",
    "-daemonize",
]
DISKS = {"/srv/web,a.qcow2": "/dr/web/vd0.qcow2", "/srv/b.qcow2": "/dr/web/vd1.qcow2"}
LAYOUT = RunLayout(PurePosixPath("/dr/web/vm"))


def mapped(**kw):
    return map_command_line(SOURCE, DISKS, "/run/drtool/web.qmp", LAYOUT, **kw)


def test_disks_sockets_and_pidfile_move_to_the_dr_side():
    argv = mapped()
    assert "driver=qcow2,node-name=vd0-fmt,file.driver=file,file.filename=/dr/web/vd0.qcow2" in argv
    assert any('"filename":"/dr/web/vd1.qcow2"' in a for a in argv)
    assert "socket,id=drtool,path=/dr/web/vm/drtool.qmp,server=on,wait=off" in argv
    assert "socket,id=qga,path=/dr/web/vm/web.sock,server=on,wait=off" in argv
    assert argv[argv.index("-pidfile") + 1] == "/dr/web/vm/qemu.pid"
    assert argv.count("-daemonize") == 1 and argv[-1] == "-daemonize" and "-S" in argv
    assert not any("/srv/" in a or "/run/" in a for a in argv)


def test_production_failover_keeps_the_network():
    argv = mapped()
    assert "tap,id=net0,ifname=tap0" in argv and "none" not in argv


def test_a_drill_has_no_network_at_all():
    argv = mapped(isolate_network=True)
    assert "-netdev" not in argv and not any("netdev=" in a for a in argv)
    assert argv[argv.index("-nic") + 1] == "none"
    assert "virtio-blk-pci,drive=vd0-fmt,id=vd0" in argv  # disks stay


def test_an_unreplicated_disk_refuses_to_start():
    with pytest.raises(DrtoolError, match="/srv/b.qcow2"):
        map_command_line(SOURCE, {"/srv/web,a.qcow2": "/dr/web/vd0.qcow2"}, "/run/drtool/web.qmp", LAYOUT)


def test_an_unknown_flag_does_not_shift_the_options_after_it():
    argv = [SOURCE[0], "-some-new-flag", *SOURCE[1:]]
    mapped_argv = map_command_line(argv, DISKS, "/run/drtool/web.qmp", LAYOUT)
    assert "-some-new-flag" in mapped_argv and not any("/srv/" in a for a in mapped_argv)


def test_a_source_disk_named_where_drtool_does_not_map_fails_closed():
    """A source image reached through an option drtool does not rewrite must not reach the DR copy."""
    argv = [*SOURCE[:-1], "-fw_cfg", "name=opt/disk,file=/srv/b.qcow2", "-daemonize"]
    with pytest.raises(DrtoolError, match="still names a source disk"):
        map_command_line(argv, DISKS, "/run/drtool/web.qmp", LAYOUT)


def test_a_drill_refuses_when_a_nic_would_survive():
    """A network backend wired up through an option drtool does not drop: no drill rather than a leaky one."""
    argv = [*SOURCE[:-1], "-set", "device.nic9.netdev=net0", "-daemonize"]
    with pytest.raises(DrtoolError, match="network"):
        map_command_line(argv, DISKS, "/run/drtool/web.qmp", LAYOUT, isolate_network=True)


def test_a_console_file_moves_into_the_run_dir_where_the_dr_copy_writes_its_own():
    argv = [*SOURCE[:-1], "-chardev", "file,id=console,path=/var/log/web/console.log", "-serial", "chardev:console",
            "-serial", "file:/var/log/web/ttyS1.log", "-kernel", "/boot/vmlinuz", "-append", "console=ttyS0 quiet"]
    mapped_argv = map_command_line(argv, DISKS, "/run/drtool/web.qmp", LAYOUT)
    assert "file,id=console,path=/dr/web/vm/console.log" in mapped_argv
    assert "file:/dr/web/vm/ttyS1.log" in mapped_argv
    assert mapped_argv[mapped_argv.index("-serial") + 1] == "chardev:console"
    # a kernel command line is one word, kept as it is
    assert mapped_argv[mapped_argv.index("-append") + 1] == "console=ttyS0 quiet"
    assert mapped_argv[mapped_argv.index("-kernel") + 1] == "/boot/vmlinuz"
