"""Helpers for replication tests: run drtool, wait for jobs, compare images."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from drtool.lab import Lab, LabVm


def drtool(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def drtool_ok(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = drtool(config, *args, timeout=timeout)
    assert result.returncode == 0, f"drtool {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result


def status_json(config: Path, vm: str) -> dict:
    [entry] = json.loads(drtool(config, "status", vm, "--json").stdout)["vms"]
    return entry


def drtool_jobs(vm: LabVm) -> list[dict]:
    return [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-mirror")]


# A ready mirror notices new dirty data on its next iteration, up to 100 ms
# (BLOCK_JOB_SLICE_TIME) after a write: "nothing left" must hold for longer than that.
QUIET = 0.35


def wait_in_sync(vm: LabVm, timeout: float = 60) -> None:
    """Until every drtool job is ready with nothing left to copy (through the lab's own monitor)."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while True:
        jobs = drtool_jobs(vm)
        if jobs and all(j["ready"] and j["offset"] == j["len"] and j["io-status"] == "ok" for j in jobs):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET:
                return
        else:
            quiet_since = None
        assert time.monotonic() < deadline, f"jobs not in sync after {timeout} s: {jobs}"
        time.sleep(0.05)


def wait_broken(vm: LabVm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        jobs = drtool_jobs(vm)
        if jobs and all(j["paused"] and j["io-status"] != "ok" for j in jobs):
            return
        assert time.monotonic() < deadline, f"jobs did not pause after {timeout} s: {jobs}"
        time.sleep(0.2)


def replica_path(lab: Lab, vm: LabVm, device: str, dr_host: str = "site-b") -> Path:
    """The replica's active top: what replication writes to now (points freeze the images below it)."""
    directory = lab.host_dir(dr_host) / "replicas" / vm.name
    manifest = directory / "manifest.json"
    if manifest.exists():
        for disk in json.loads(manifest.read_text())["disks"]:
            if disk["device"] == device:
                return Path(disk["replica_image"])
    return directory / f"{device}.qcow2"


def images_identical(source: Path, replica: Path) -> tuple[bool, str]:
    """qemu-img compare, sharing the images with the running QEMUs (-U)."""
    result = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(source), str(replica)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0, result.stdout + result.stderr


def replica_has(replica: Path, offset: int, length: int, pattern: int) -> bool:
    """Read the replica image directly (the target writes through, so the file holds every acked write)."""
    result = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", str(replica), "-c",
                             f"read -P 0x{pattern:02x} {offset} {length}"], capture_output=True, text=True,
                            timeout=60)
    return result.returncode == 0 and "Pattern verification failed" not in result.stdout + result.stderr


def target_connections(lab: Lab, vm: LabVm) -> dict[str, int]:
    """Bytes the DR target received, per NBD connection, as the DR host's kernel counts them (ss).

    qemu-storage-daemon keeps no blockstats for exports, so this is measured
    below QEMU: it includes TLS and NBD framing, a few percent over the data.
    """
    manifest = json.loads((lab.host_dir("site-b") / "replicas" / vm.name / "manifest.json").read_text())
    port = manifest["nbd_port"]
    out = lab.exec("site-b", ["ss", "-Htin", "state", "established", f"( sport = :{port} )"]).stdout
    conns, current = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            current = " ".join(fields[-2:])  # local and peer address:port
        else:
            match = re.search(r"bytes_received:(\d+)", line)
            if match and current:
                conns[current] = int(match.group(1))
    return conns


def bytes_received_since(lab: Lab, vm: LabVm, before: dict[str, int]) -> int:
    """What the target received since `before` on the connections open now."""
    return sum(n - before.get(conn, 0) for conn, n in target_connections(lab, vm).items())


def assert_replicas_identical(lab: Lab, vm: LabVm, devices: tuple[str, ...] = ("vd0",)) -> None:
    """With the VM paused (and the mirrors so quiet), each replica equals its source disk."""
    wait_in_sync(vm)
    vm.qmp("stop")
    try:
        for dev in devices:
            same, detail = images_identical(vm.disks[dev], replica_path(lab, vm, dev))
            assert same, f"{dev}: {detail}"
    finally:
        vm.qmp("cont")
