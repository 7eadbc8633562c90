"""The lab itself works: SSH with its keys, site links that cut and come back, guest
writes that reach the image, isolation that never leaks out through the default route."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import paramiko
import pytest

from drtool.lab import Lab, LabVm, dump_toml
from drtool.lab.netns import list_namespaces

pytestmark = pytest.mark.lab


def ssh(lab: Lab, host: str, command: str) -> str:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.load_host_keys(str(lab.known_hosts))
    client.connect(
        lab.address(host), port=lab.port, username=lab.user, key_filename=str(lab.identity_file),
        allow_agent=False, look_for_keys=False, timeout=5, banner_timeout=5, auth_timeout=5,
    )  # fmt: skip
    try:
        _, stdout, stderr = client.exec_command(command, timeout=10)
        out = stdout.read().decode()
        assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
        return out
    finally:
        client.close()


def test_ssh_with_lab_keys_lands_in_the_hosts_namespace(lab: Lab) -> None:
    out = ssh(lab, "site-a", "hostname; ip -o addr")
    assert f"inet {lab.address('site-a')}/30" in out
    assert f"inet {lab.peer_address('site-b', 'site-a')}/30" in out
    assert lab.address("site-b") not in out  # another namespace, not the root one
    out_b = ssh(lab, "site-b", "ip -o addr")
    assert f"inet {lab.address('site-b')}/30" in out_b


def test_unknown_host_key_is_rejected(lab: Lab, tmp_path: Path) -> None:
    """The known_hosts file is what makes the connection work (RejectPolicy is real)."""
    lines = lab.known_hosts.read_text().splitlines()
    wrong = tmp_path / "known_hosts"
    # site-a's addresses paired with site-b's key
    wrong.write_text(lines[0].split()[0] + " " + " ".join(lines[1].split()[1:]) + "\n")
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.load_host_keys(str(wrong))
    with pytest.raises(paramiko.SSHException):
        client.connect(
            lab.address("site-a"), port=lab.port, username="root", key_filename=str(lab.identity_file),
            allow_agent=False, look_for_keys=False, timeout=5,
        )  # fmt: skip
    client.close()


def test_site_link_cut_and_restore(lab: Lab) -> None:
    b_from_a = lab.peer_address("site-a", "site-b")
    assert lab.can_connect("site-a", b_from_a, 22)
    assert lab.can_connect("site-b", lab.peer_address("site-b", "site-a"), 22)
    assert not lab.can_connect("site-a", lab.address("site-b"), 22, timeout=1)  # only site links join hosts
    lab.cut_site_link("site-a", "site-b")
    try:
        t0 = time.monotonic()
        assert not lab.can_connect("site-a", b_from_a, 22, timeout=2)
        assert not lab.can_connect("site-b", lab.peer_address("site-b", "site-a"), 22, timeout=2)
        assert time.monotonic() - t0 < 1.9  # refused by routing at once, not a timeout
        assert lab.can_connect(None, lab.address("site-b"), 22)  # management link unaffected
    finally:
        lab.restore_site_link("site-a", "site-b")
    assert lab.can_connect("site-a", b_from_a, 22)


def test_guest_write_reaches_the_image(lab_vm: LabVm) -> None:
    assert lab_vm.status() == "running"
    lab_vm.guest_write("vd0", "1M", "64k", 0xAB)
    assert lab_vm.guest_read_check("vd0", "1M", "64k", 0xAB)
    assert not lab_vm.guest_read_check("vd0", "1M", "64k", 0xCD)
    lab_vm.stop()
    assert not lab_vm.alive
    image = str(lab_vm.disks["vd0"])

    def qemu_io(cmd: str) -> str:
        proc = subprocess.run(["qemu-io", "-r", "-f", "qcow2", image, "-c", cmd], capture_output=True, text=True)
        return proc.stdout + proc.stderr

    out = qemu_io("read -P 0xab 1M 64k")
    assert "read 65536/65536 bytes" in out and "Pattern verification failed" not in out, out
    assert "Pattern verification failed" in qemu_io("read -P 0xab 2M 64k")  # the check can fail


def test_vm_left_in_prelaunch(lab: Lab) -> None:
    vm = lab.add_vm("prelaunch", "site-b", {"vd0": "16M", "vd1": "8M"}, start=False)
    try:
        assert vm.status() == "prelaunch"
        assert list(vm.disks) == ["vd0", "vd1"]
        assert vm.qmp_socket.is_socket() and vm.lab_qmp_socket.is_socket()
        devices = {b["qdev"] for b in vm.qmp("query-block")}
        assert devices == {"/machine/peripheral/vd0/virtio-backend", "/machine/peripheral/vd1/virtio-backend"}
    finally:
        vm.kill()
    assert not vm.alive


def test_isolated_host_is_unreachable_at_once(lab: Lab) -> None:
    address = lab.address("site-b")
    assert lab.can_connect(None, address, 22)
    lab.isolate("site-b")
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as failure:
            socket.create_connection((address, 22), timeout=3).close()
        assert time.monotonic() - t0 < 1
        assert failure.value.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH), failure.value
        route = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True)
        assert route.returncode != 0 or route.stdout.startswith("unreachable"), route.stdout  # never via eth0
        assert not lab.can_connect("site-a", lab.peer_address("site-a", "site-b"), 22, timeout=1)
    finally:
        lab.unisolate("site-b")
    assert lab.can_connect(None, address, 22)
    assert lab.can_connect("site-a", lab.peer_address("site-a", "site-b"), 22)


def test_frozen_sshd_accepts_tcp_but_sends_no_banner(lab: Lab) -> None:
    lab.freeze_sshd("site-a")
    try:
        with socket.create_connection((lab.address("site-a"), 22), timeout=2) as sock:
            sock.settimeout(1)
            with pytest.raises(TimeoutError):
                sock.recv(64)
    finally:
        lab.thaw_sshd("site-a")
    assert "ok" in ssh(lab, "site-a", "echo ok")


def test_config_toml_round_trips() -> None:
    data = {
        "hosts": {"site-a": {"address": "198.18.1.2", "port": 22}},
        "vms": {"we b\"x": {"qmp_socket": 'a "b"\\c\n\t\x01\x7fé', "disks": ["vd0", "v,d1"]}},
    }
    assert tomllib.loads(dump_toml(data)) == data


def test_lab_dir_and_vm_names_with_metacharacters() -> None:
    parent = Path(tempfile.mkdtemp(prefix="drlab-"))
    lab = Lab(root_dir=parent / "a b,c'd\"%e", hosts=("h1", "h2"))
    try:
        lab.start()
        vm = lab.add_vm("my vm,1 'x'", "h1")
        vm.guest_write("vd0", 0, 4096, 0x5A)
        assert vm.guest_read_check("vd0", 0, 4096, 0x5A)
        assert "ok" in ssh(lab, "h2", "echo ok")
        config = tomllib.loads(lab.write_config(lab.dir / "drtool.toml").read_text())
        assert config["vms"]["my vm,1 'x'"]["qmp_socket"] == str(vm.qmp_socket)
        assert config["vms"]["my vm,1 'x'"]["dr_host"] == "h2"
        assert config["hosts"]["h2"]["known_hosts"] == str(lab.known_hosts)
    finally:
        problems = lab.stop()
        leftovers = [ns for ns in list_namespaces() if lab.id in ns]
        remaining = list(parent.iterdir())
        shutil.rmtree(parent)
    assert not problems and not leftovers and not remaining
