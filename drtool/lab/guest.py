"""A real Linux guest for the lab, built from Debian packages, that judges what drtool promises.

The guest is Debian's cloud kernel (the package `linux-image-cloud-amd64`
depends on) and busybox-static, in a gzip'd newc initramfs whose /init is
guest_init.sh. Nothing binary is kept in the source tree: build_guest()
fetches the kernel package with `apt-get download`, unpacks it with `dpkg -x`
into a cache directory keyed by its version, and writes the initramfs from the
modules, busybox and the script (cached by their content: a rebuild is quick).

On every boot the guest VERIFIES the numbered records on its two disks and
reports on its serial console; then it WRITES records from the one after the
last acknowledged (record n to disk A, then to disk B, O_DIRECT and fsync) and
acknowledges each on the console. GuestConsole reads that console from the
host: what the guest was promised (ACK lines) and what it found (VERIFY lines).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from drtool.lab.netns import LabError

CACHE_DIR = Path(os.environ.get("DRTOOL_LAB_CACHE", "/var/cache/drtool-lab")) / "guest"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")  # from busybox-static (scripts/setup.sh installs it)
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
# virtio is modular in Debian's cloud kernel; insmod order (QEMU-NOTES.md)
MODULES = ("drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
           "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci.ko", "drivers/block/virtio_blk.ko")
CONSOLE_NAME = "console.log"
MEMORY = "256"
T = TypeVar("T")


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel and initramfs on the host, and the kernel's version."""

    kernel: Path
    initrd: Path
    version: str

    def qemu_args(self, console: Path, append: str) -> list[str]:
        """QEMU options that boot this guest with its serial console written to `console`."""
        return [
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(), "-no-reboot",
            "-chardev", f"file,id=console,path={str(console).replace(',', ',,')}", "-serial", "chardev:console",
        ]  # fmt: skip


def kernel_args(mode: str = "write", *, records: int = 0, interval_ms: int = 0, bench_mib: int = 0) -> str:
    """The guest's own kernel command line options (see guest_init.sh)."""
    if mode not in ("write", "verify", "bench"):
        raise LabError(f"guest mode {mode!r}: write, verify or bench")
    return (f"drguest.mode={mode} drguest.records={records} drguest.interval_ms={interval_ms} "
            f"drguest.bench_mib={bench_mib}")


# --------------------------------------------------------------------------- building


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> tuple[str, str]:
    """(package, version) of the real kernel image the metapackage depends on, as apt would install it."""
    depends = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", _run(["apt-cache", "depends", metapackage]), re.MULTILINE)
    if not depends:
        raise LabError(f"apt-cache depends {metapackage} names no linux-image package; run apt-get update")
    package = depends[0]
    candidate = re.search(r"^\s*Candidate:\s*(\S+)", _run(["apt-cache", "policy", package]), re.MULTILINE)
    if not candidate or candidate.group(1) == "(none)":
        raise LabError(f"apt has no candidate version of {package}; run apt-get update")
    return package, candidate.group(1)


def fetch_kernel(cache: Path = CACHE_DIR) -> Path:
    """The unpacked kernel package in the cache (downloaded and unpacked once per version)."""
    package, version = resolve_kernel_package()
    tree = cache / f"{package}_{version.replace(':', '%3a')}"
    if (tree / ".complete").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt drops to _apt for downloads when it can read the directory
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
        [deb] = work.glob("*.deb")
        _run(["dpkg", "-x", str(deb), str(work / "tree")])
        (work / "tree" / ".complete").write_text(f"{package} {version}\n")
        if (tree / ".complete").exists():
            return tree  # another process unpacked it meanwhile: keep theirs (it may be in use)
        shutil.rmtree(tree, ignore_errors=True)  # a half-unpacked one of a process that died
        (work / "tree").rename(tree)
    return tree


def _is_static(binary: Path) -> bool:
    """Whether an ELF64 file has no program interpreter (PT_INTERP): it runs without a libc."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries; mode holds the file type bits."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        pad()
        out.write(data)
        pad()
    return out.getvalue()


def build_initrd(kernel_tree: Path, cache: Path = CACHE_DIR) -> Path:
    """The gzip'd newc initramfs (busybox, the virtio modules, /init), cached by its content."""
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        raise LabError(f"{BUSYBOX} is missing or not static: install busybox-static (scripts/setup.sh does)")
    [modules] = (kernel_tree / "lib" / "modules").iterdir()
    files = [("bin/busybox", 0o100755, BUSYBOX.read_bytes()), ("init", 0o100755, INIT_SCRIPT.read_bytes())]
    files += [(f"lib/modules/{Path(m).name}", 0o100644, (modules / "kernel" / m).read_bytes()) for m in MODULES]
    digest = hashlib.sha256()
    for name, mode, data in files:
        digest.update(f"{name} {mode} {len(data)}\n".encode() + data)
    initrd = cache / f"initrd-{digest.hexdigest()[:16]}.cpio.gz"
    if initrd.exists():
        return initrd
    dirs = [(d, 0o40755, b"") for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp")]
    archive = newc_archive([*dirs, ("dev/console", 0o20600, b""), *files])
    tmp = initrd.with_name(initrd.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    tmp.replace(initrd)
    return initrd


def build_guest(cache: Path = CACHE_DIR) -> GuestImage:
    """Kernel and initramfs of the lab guest, from the cache or built now (needs apt and busybox-static)."""
    tree = fetch_kernel(cache)
    [kernel] = (tree / "boot").glob("vmlinuz-*")
    return GuestImage(kernel, build_initrd(tree, cache), kernel.name.removeprefix("vmlinuz-"))


# --------------------------------------------------------------------------- the console


@dataclass(frozen=True)
class Ack:
    """One record the guest was told is on both disks."""

    n: int
    t: float  # guest uptime, s, when acknowledged


@dataclass(frozen=True)
class DiskFound:
    disk: str
    max: int  # highest complete record
    count: int
    gaps: int  # records missing below max
    first_gap: int
    garbage: int  # sectors that are neither empty nor a valid record
    last_t: float  # guest uptime, s, when the highest record was written (by its boot)
    last_boot: int


@dataclass(frozen=True)
class VerifyReport:
    """What the guest found on its disks at boot."""

    a: DiskFound
    b: DiskFound
    b_ahead: int  # records on B missing from A (B written after A: never allowed)
    next: int  # where this boot's writer starts

    def problems(self) -> list[str]:
        """Broken promises visible from the disks alone: gaps, garbage, B ahead of A."""
        found = []
        for disk in (self.a, self.b):
            if disk.gaps:
                found.append(f"{disk.disk}: {disk.gaps} record(s) missing below {disk.max}, first {disk.first_gap}")
            if disk.garbage:
                found.append(f"{disk.disk}: {disk.garbage} sector(s) of garbage")
        if self.b_ahead:
            found.append(f"disk B holds {self.b_ahead} record(s) that disk A lacks (write order broken)")
        if self.a.max > self.b.max + 1:
            found.append(f"disk A is {self.a.max - self.b.max} records ahead of B (at most 1 may be in flight)")
        return found


_ACK_RE = re.compile(r"^ACK (\d+) t=(\d+)\s*$")
_DISK_RE = re.compile(r"^VERIFY disk=(\w+) max=(\d+) count=(\d+) gaps=(\d+) first_gap=(\d+) garbage=(\d+) "
                      r"last_t=(\d+) last_boot=(\d+)\s*$")
_DONE_RE = re.compile(r"^VERIFY done b_ahead=(\d+) next=(\d+)\s*$")
_BENCH_RE = re.compile(r"^BENCH round=(\d+) mib=(\d+) cs=(\d+)\s*$")


class GuestConsole:
    """The guest's serial console as QEMU writes it to a file on the host."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            text = self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line.rstrip("\r") for line in text.split("\n")[:-1]]  # a partial last line is not yet said

    def acks(self) -> list[Ack]:
        return [Ack(int(m.group(1)), int(m.group(2)) / 100) for line in self.lines() if (m := _ACK_RE.match(line))]

    def last_ack(self) -> Ack | None:
        acks = self.acks()
        return acks[-1] if acks else None

    def errors(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("GUEST error")]

    def verify_report(self) -> VerifyReport | None:
        disks: dict[str, DiskFound] = {}
        for line in self.lines():
            if m := _DISK_RE.match(line):
                disk, top, count, gaps, first_gap, garbage, last_t, last_boot = m.groups()
                disks[disk] = DiskFound(disk, int(top), int(count), int(gaps), int(first_gap), int(garbage),
                                        int(last_t) / 100, int(last_boot))
            elif (m := _DONE_RE.match(line)) and {"vda", "vdb"} <= disks.keys():
                return VerifyReport(disks["vda"], disks["vdb"], int(m.group(1)), int(m.group(2)))
        return None

    def bench_results(self) -> dict[int, tuple[int, float]]:
        """round -> (MiB, seconds) of the guest's own timed dd (drguest.mode=bench)."""
        return {int(m.group(1)): (int(m.group(2)), int(m.group(3)) / 100)
                for line in self.lines() if (m := _BENCH_RE.match(line))}

    def wait_for(self, what: str, check: Callable[[], T | None], timeout: float = 60.0, poll: float = 0.05) -> T:
        """Poll until check() returns something truthy; return it. Raise LabError with the console's tail."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if errors := self.errors():
                raise LabError(f"the guest reported {errors[0]!r} while waiting for {what}")
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines()[-10:])
                raise LabError(f"no {what} on the guest console {self.path} after {timeout:g} s; last lines:\n{tail}")
            time.sleep(poll)

    def wait_verify(self, timeout: float = 60.0) -> VerifyReport:
        return self.wait_for("VERIFY report", self.verify_report, timeout)

    def wait_acks(self, at_least: int, timeout: float = 60.0) -> list[Ack]:
        def enough() -> list[Ack] | None:
            acks = self.acks()
            return acks if len(acks) >= at_least else None

        return self.wait_for(f"{at_least} ACK lines", enough, timeout)


def console_in(run_dir: Path) -> GuestConsole:
    """The console of a guest whose QEMU runs from run_dir: drtool maps the chardev's file into its run dir."""
    return GuestConsole(Path(run_dir) / CONSOLE_NAME)
