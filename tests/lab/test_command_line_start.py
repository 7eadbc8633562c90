"""A mapped command line starts a real QEMU: libvirt 9's (descriptors, sandbox, JSON blockdevs) and a drill's."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath

import pytest

from drtool.mechanics.command_line import plan_command_line

LIBVIRT9 = (Path(__file__).parent.parent / "unit" / "cmdlines" / "libvirt9-two-disks.argv").read_text().splitlines()


def qmp(path: Path, *commands: str) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        stream = sock.makefile("rw")
        stream.readline()
        replies = []
        for command in ("qmp_capabilities", *commands):
            stream.write(json.dumps({"execute": command}) + "\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())) and "error" not in reply:
                pass
            replies.append(reply)
        return replies[1:]


@pytest.mark.parametrize("drill", [False, True], ids=["failover", "drill"])
def test_libvirt9_command_line_starts_on_replicas_with_its_disks_and_nic(tmp_path: Path, drill: bool):
    images = {}
    for source, name in (("/tmp/lvcap/a.qcow2", "vda"), ("/tmp/lvcap/b.qcow2", "vdb")):
        images[source] = str(tmp_path / f"{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", images[source], "64M"], check=True)
    argv = plan_command_line(LIBVIRT9, images, "", PurePosixPath(tmp_path), isolate_network=drill).argv
    argv[argv.index("-vnc") + 1] = "none"  # the host may have another VM on display :0
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "qemu.pid").read_text())
    try:
        status, blocks, nics = qmp(tmp_path / "drtool.qmp", "query-status", "query-block", "query-pci")
        assert status["return"]["status"] == "prelaunch"  # -S: drtool resumes it once checked
        files = {b["device"] or b["qdev"]: b["inserted"]["file"] for b in blocks["return"] if "inserted" in b}
        assert sorted(files.values()) == sorted(images.values())
        devices = {d["qdev_id"] for bus in nics["return"] for d in bus["devices"]}
        # the NIC is there in a drill too (attached to nothing): the drill starts what a failover will
        assert {"net0", "virtio-disk0", "virtio-disk1", "balloon0", "video0"} <= devices
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
