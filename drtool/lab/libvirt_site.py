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

import subprocess
import time
from pathlib import Path

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
