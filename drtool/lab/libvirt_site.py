"""A libvirtd per lab host (opt-in: Lab(libvirt=True)).

The host's sshd then starts in a private mount namespace (`unshare -m`) where
per-host directories are bind-mounted over /run/libvirt, /var/lib/libvirt,
/etc/libvirt (a copy), /var/cache/libvirt and /var/log/libvirt, and where
virtlogd and libvirtd run first, with pid files. Whoever logs in over SSH sees
that host's libvirtd alone; a domain of the same name can run on two hosts.
Everything runs in the host's network namespace, so the lab's teardown ends it.

/dev/kvm is 0600 root here (no udev): libvirt then probes QEMU again on every
call (~4 s each). In the site's mount namespace a node of its own, group kvm
and 0660, is mounted over it; the machine's /dev/kvm is left as it is. Domains
are `type='qemu'` (TCG) all the same.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from drtool.lab.netns import LabError

LIBVIRT_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "etc": "/etc/libvirt",
                "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}

# $1 the site's libvirt directory; then the command to run there (sshd -D), which replaces this shell.
_SITE_SCRIPT = """set -e
site=$1; shift
mount --make-rprivate /
for pair in run:/run/libvirt lib:/var/lib/libvirt etc:/etc/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "$site/${pair%%:*}" "${pair#*:}"
done
[ -e "$site/etc/libvirtd.conf" ] || cp -a /etc/libvirt/. "$site/etc/"
for pair in run:/run/libvirt lib:/var/lib/libvirt etc:/etc/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mount --bind "$site/${pair%%:*}" "${pair#*:}"
done
mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images
if [ -c /dev/kvm ] && [ ! -e "$site/kvm" ]; then
  mknod -m 660 "$site/kvm" c 10 232 && chgrp kvm "$site/kvm" && mount --bind "$site/kvm" /dev/kvm || true
fi
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -p /run/libvirt/libvirtd.pid
exec "$@"
"""


def site_argv(site_dir: Path, argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own, after that namespace's virtlogd and libvirtd started."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _SITE_SCRIPT, "sh", str(site_dir), *argv]


def in_site(pid: int, argv: list[str]) -> list[str]:
    """argv run in the mount and network namespaces of a lab host's process (its sshd)."""
    return ["nsenter", "-t", str(pid), "-m", "-n", *argv]


def wait_libvirtd(pid: int, host: str, timeout: float = 120.0) -> str:
    """Wait until the host's libvirtd answers; its version ("9.0.0")."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = subprocess.run(in_site(pid, ["virsh", "-c", "qemu:///system", "version", "--daemon"]),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                if "Running against daemon" in line:
                    return line.split()[-1]
            return done.stdout.strip()
        last = done.stderr.strip()
        time.sleep(0.2)
    raise LabError(f"libvirtd on {host} did not answer in {timeout:.0f} s: {last}")


def domain_xml(name: str, images: list[Path], memory_mib: int = 64) -> str:
    """A small TCG domain with virtio disks vda, vdb, ... on qcow2 images (devices virtio-disk0, ...)."""
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>"
        f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, image in enumerate(images))
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{disks}<serial type='pty'/></devices></domain>")


class LabDomain:
    """A persistent libvirt domain on a lab host, with qcow2 disks vda, vdb, ... (devices virtio-disk0, ...)."""

    def __init__(self, lab: Any, name: str, host: str, sizes: tuple[str, ...] = ("32M", "16M")) -> None:
        self.lab, self.name, self.host = lab, name, host
        directory = lab.host_dir(host) / "domains" / name
        directory.mkdir(parents=True, exist_ok=True)
        self.images = [directory / f"vd{chr(ord('a') + i)}.qcow2" for i in range(len(sizes))]
        for image, size in zip(self.images, sizes, strict=True):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True)
        xml = directory / "domain.xml"
        xml.write_text(domain_xml(name, self.images))
        for args in (("define", str(xml)), ("start", name)):
            self.virsh(*args)

    def virsh(self, *args: str) -> str:
        done = self.lab.virsh(self.host, *args)
        if done.returncode != 0:
            raise LabError(f"virsh {' '.join(args)} on {self.host}: {done.stderr.strip()}")
        return str(done.stdout)

    def guest_write(self, disk: int, offset: int, length: int, pattern: int) -> None:
        """Write as the guest would, through the device (HMP qemu-io on virtio-diskN's backend)."""
        device = f"/machine/peripheral/virtio-disk{disk}/virtio-backend"
        # QEMU 7.2 prints qemu-io's result on its stdout: libvirt's log of the domain (see LabVm._qemu_io)
        log = self.lab.host_dir(self.host) / "libvirt" / "log" / "qemu" / f"{self.name}.log"
        start = log.stat().st_size
        reply = self.virsh("qemu-monitor-command", self.name, "--hmp",
                           f"qemu-io -d {device} \"write -P 0x{pattern:02x} {offset} {length}\"")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with log.open("rb") as f:
                f.seek(start)
                out = f.read().decode("utf-8", "replace")
            if re.search(r"^wrote (\d+)/\1 bytes", out, re.MULTILINE):
                return
            if reply.strip() or re.search(r"error|failed", out, re.IGNORECASE):
                break
            time.sleep(0.05)
        raise LabError(f"guest write on {self.name} disk {disk} failed: {(reply + out).strip()}")

    def remove(self) -> None:
        for args in (("destroy", self.name), ("undefine", self.name, "--managed-save")):
            self.lab.virsh(self.host, *args)
