"""The original host after a failover: is a QEMU running on the old images (a split brain)?

After an unplanned failover the old primary may come back with its VM
restarting on its own (an init script, libvirt autostart, an operator). Two
copies writing is the split brain every DR tool must catch. The first drtool
command that reaches the old host looks for any QEMU process whose command
line or open files name one of the old images, leaves a marker beside each
image (`<image>.drtool-failed-over`, JSON: which VM, where it runs now, since
when) that drtool's own commands honour, and disables libvirt autostart of a
domain using those images where the host has `virsh`.

The search runs on the host in its python3, the image paths passed as
arguments: /proc/<pid>/cmdline and the /proc/<pid>/fd links, so a VM started
by libvirt (whose images may be passed as fds) is found as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import Refused, RemoteCommandError, UnreachableError
from drtool.state.manifest import Manifest
from drtool.state.protection import Protection
from drtool.state.records import Step
from drtool.transport.connections import Reach, RemoteShell

MARKER_SUFFIX = ".drtool-failed-over"

_FIND_SCRIPT = r"""
import json, os, sys
images = set(sys.argv[1:])
found = []
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        continue
    if not argv or "qemu-system" not in os.path.basename(argv[0]):
        continue
    hits = sorted(i for i in images if any(i in a for a in argv))
    if not hits:
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target in images:
                hits.append(target)
    if hits:
        found.append({"pid": int(pid), "program": os.path.basename(argv[0]), "images": sorted(set(hits))})
print(json.dumps(found))
"""

# $1 marker content; then the images. Writes each marker (0644) beside its image if the image's directory
# exists; then, where virsh answers, disables autostart of every domain whose disks name one of the images.
_MARK_SCRIPT = r"""content=$1; shift
for img in "$@"; do
  d=$(dirname -- "$img")
  [ -d "$d" ] && printf '%s\n' "$content" > "$img.drtool-failed-over"
done
command -v virsh >/dev/null 2>&1 || { echo "no-libvirt"; exit 0; }
doms=$(virsh -q list --all --name 2>/dev/null) || { echo "no-libvirt"; exit 0; }
for dom in $doms; do
  for img in "$@"; do
    if virsh -q domblklist --details "$dom" 2>/dev/null | grep -qF -- "$img"; then
      virsh -q autostart --disable "$dom" >/dev/null 2>&1 && echo "autostart-disabled $dom"
    fi
  done
done
echo done"""


class SplitBrain(Refused):
    """The VM runs at both sites: a QEMU on the original host's old images while the DR copy runs."""


@dataclass(frozen=True)
class QemuOnImages:
    """A QEMU process on the original host that uses the old images."""

    pid: int
    program: str
    images: tuple[str, ...]

    def describe(self, host: str) -> str:
        return f"{self.program} pid {self.pid} on {host} ({', '.join(self.images)})"


@dataclass(frozen=True)
class Marked:
    """What marking the old images did."""

    libvirt: bool  # virsh answered on the host
    autostart_disabled: tuple[str, ...]  # libvirt domains whose autostart drtool turned off


def qemu_on_images(shell: RemoteShell, images: list[str]) -> list[QemuOnImages]:
    """Every QEMU process on the host whose command line or open files name one of `images`."""
    result = shell.run(["python3", "-c", _FIND_SCRIPT, *images], check=False, timeout=30)
    if not result.ok:
        raise RemoteCommandError(f"cannot look for QEMU processes on the old images: {result.err.strip()}")
    return [QemuOnImages(int(p["pid"]), str(p["program"]), tuple(p["images"])) for p in json.loads(result.out)]


def marker_path(image: str) -> PurePosixPath:
    return PurePosixPath(image + MARKER_SUFFIX)


def mark_old_images(shell: RemoteShell, images: list[str], vm: str, runs_on: str, since: str) -> Marked:
    """Leave the failed-over marker beside each old image; disable libvirt autostart where libvirt exists."""
    content = json.dumps({"vm": vm, "runs_on": runs_on, "since": since,
                          "note": "drtool failed this VM over: do not start it here; see drtool status"})
    result = shell.run(["sh", "-c", _MARK_SCRIPT, "sh", content, *images], check=False, timeout=60)
    lines = result.out.split()
    disabled = tuple(lines[i + 1] for i, word in enumerate(lines)
                     if word == "autostart-disabled" and i + 1 < len(lines))
    return Marked("no-libvirt" not in lines, disabled)


def marked_images(shell: RemoteShell, images: list[str]) -> list[str]:
    """The images that carry drtool's failed-over marker."""
    script = 'for i in "$@"; do [ -e "$i.drtool-failed-over" ] && echo "$i"; done; exit 0'
    result = shell.run(["sh", "-c", script, "sh", *images], check=False, timeout=30)
    return [line for line in result.out.splitlines() if line]


def unmark_old_images(shell: RemoteShell, images: list[str]) -> None:
    """Remove the markers (once the VM is back on these images, by drtool's failback)."""
    shell.run(["rm", "-f", "--", *(str(marker_path(i)) for i in images)], timeout=30)


@dataclass(frozen=True)
class OldSite:
    """What the first look at the original host after a failover found."""

    host: str
    reachable: bool
    running: tuple[QemuOnImages, ...] = ()  # QEMU on the old images: a split brain while the DR copy runs
    marked: Marked | None = None  # drtool marked the images just now (None: already marked, or unreachable)

    @property
    def split_brain(self) -> bool:
        return bool(self.running)

    def describe(self) -> str:
        return "; ".join(q.describe(self.host) for q in self.running)


def look_at_old_site(reach: Reach, vm: Vm, manifest: Manifest) -> OldSite | None:
    """After a failover whose DR copy has started: look for QEMU on the old images, mark them.

    None while no DR copy runs (before a failover's dr-started step the
    source legitimately runs), or once the VM is back home.
    """
    record = manifest.failover
    if not manifest.state.failing_over or record is None or not record.done(Step.DR_STARTED):
        return None
    if manifest.state is Protection.FAILING_BACK and manifest.reprotect is not None \
            and manifest.reprotect.done("home-started"):
        return None  # the VM runs on the old images again, by drtool's own failback
    images = [d.source_image for d in manifest.disks]
    try:
        shell = reach.shell(vm.host)
        running = qemu_on_images(shell, images)
        marked = None
        if len(marked_images(shell, images)) < len(images):
            marked = mark_old_images(shell, images, vm.name, vm.dr_host, record.finished_at or record.started_at)
    except (UnreachableError, RemoteCommandError):
        return OldSite(vm.host, False)
    return OldSite(vm.host, True, tuple(running), marked)


def refuse_split_brain(site: OldSite | None, vm: Vm, what: str) -> None:
    """Refuse `what` while a QEMU runs on the old images, naming the process."""
    if site is not None and site.split_brain:
        raise SplitBrain(f"split brain: {vm.name} runs on both sites: {site.describe()}; {what} refused",
                         hint=f"stop that QEMU on {vm.host} (the DR copy on {vm.dr_host} is the one to keep), "
                              "then run the command again")
