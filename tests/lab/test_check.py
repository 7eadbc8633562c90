"""drtool check against the real lab: replica and source compared as of one instant, while the VM runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm
from drtool.mechanics.link import LINK_TIMEOUT

from .replication_helpers import drtool, drtool_ok, replica_path, wait_in_sync

pytestmark = pytest.mark.lab
KiB, MiB = 1 << 10, 1 << 20


def check_json(config: Path, *args: str, timeout: float = 600) -> tuple[int, dict]:
    result = drtool(config, "check", *args, "--json", timeout=timeout)
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"drtool check exited {result.returncode}: {result.stderr}") from None


class Writer:
    """Guest writes through the device, in a thread, until stopped: a busy disk.

    HMP qemu-io writes would go on while the VM is paused, which a real guest's
    stopped CPUs never do: like a guest, the writer writes only while the VM runs.
    """

    def __init__(self, vm: LabVm, device: str = "vd0", region: int = 48 * MiB) -> None:
        self.vm, self.device, self.region = vm, device, region
        self.stop, self.count, self.failure = threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                if self.vm.status() != "running":
                    time.sleep(0.005)
                    continue
                offset = (n * 1531 * 64 * KiB) % self.region
                self.vm.guest_write(self.device, offset, 64 * KiB, 0x10 + n % 200)
                n += 1
                self.count = n
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.failure.append(err)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_healthy_replica_checks_ok_while_the_guest_writes(lab: Lab, lab_vm: LabVm, lab_config: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    for k in range(8):
        lab_vm.guest_write("vd0", k * 7 * MiB, 256 * KiB, 0xA0 + k)
    wait_in_sync(lab_vm)
    with Writer(lab_vm) as writer:
        time.sleep(0.5)
        code, report = check_json(lab_config, lab_vm.name)
        during = writer.count
    assert not writer.failure, writer.failure
    assert code == 0, report["vms"][0]["summary"]
    [vm] = report["vms"]
    assert vm["status"] == 0 and vm["point"], vm
    [disk] = vm["disks"]
    assert disk["differing"] == [] and disk["compared_bytes"] >= 2 * MiB, disk
    assert during > 5, f"only {during} guest writes happened during the check"
    assert disk["not_compared"] == [], vm  # the pause it took is printed: a figure, not a test
    print(f"busy disk: {during} guest writes during the check, {vm['rounds']} round(s), source paused "
          f"{vm['paused_seconds']} s in all, {disk['compared_bytes']} bytes compared")


def replica_dir(lab: Lab, vm: LabVm) -> Path:
    return lab.host_dir("site-b") / "replicas" / vm.name


def stop_target(lab: Lab, vm: LabVm) -> None:
    """SIGTERM the DR target (it closes its images cleanly) and wait until it is gone."""
    pid = int((replica_dir(lab, vm) / "target.pid").read_text())
    lab.exec("site-b", ["sh", "-c", 'kill "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done', "sh",
                        str(pid)], timeout=30)


def test_a_byte_changed_behind_qemus_back_is_found_in_its_chunk_and_repaired(lab: Lab, lab_vm: LabVm,
                                                                             lab_config: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 8 * MiB, 4 * MiB, 0x5C)
    wait_in_sync(lab_vm)
    # the target stopped, one byte of the replica's top changed with qemu-io, the target back via resync
    stop_target(lab, lab_vm)
    bad = 9 * MiB + 4321
    top = replica_path(lab, lab_vm, "vd0")
    lab.exec("site-b", ["qemu-io", "-f", "qcow2", str(top), "-c", f"write -P 0x99 {bad} 1"], timeout=30)
    drtool_ok(lab_config, "resync", lab_vm.name)

    code, report = check_json(lab_config, lab_vm.name)
    assert code == 2, report
    [disk] = report["vms"][0]["disks"]
    assert disk["differing"] == [[9 * MiB, MiB]], disk

    code, report = check_json(lab_config, lab_vm.name, "--repair")
    assert code == 0, report
    [disk] = report["vms"][0]["disks"]
    assert disk["repaired"] == [[9 * MiB, MiB]] and disk["differing"] == [], disk
    assert lab_vm.guest_read_check("vd0", 8 * MiB, 4 * MiB, 0x5C)  # the source was never touched

    code, report = check_json(lab_config, lab_vm.name)
    assert code == 0 and report["vms"][0]["disks"][0]["differing"] == [], report
    history = json.loads(drtool_ok(lab_config, "check", "--history", lab_vm.name, "--json").stdout)
    assert [e["status"] for e in history["entries"]][-3:] == ["CRITICAL", "OK", "OK"], history


def test_broken_replication_is_critical_and_an_old_point_a_warning(lab: Lab, lab_vm: LabVm, lab_config: Path,
                                                                   tmp_path: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    drtool_ok(lab_config, "checkpoint", lab_vm.name)
    prom = tmp_path / "status.prom"
    drtool_ok(lab_config, "status", lab_vm.name, "--prometheus", str(prom))
    metrics = prom.read_text()
    assert f'drtool_replication_in_sync{{vm="{lab_vm.name}"}} 1' in metrics, metrics
    assert f'drtool_newest_point_age_seconds{{vm="{lab_vm.name}"}}' in metrics, metrics
    time.sleep(2.5)
    code, report = check_json(lab_config, lab_vm.name, "--warn-rpo", "2s", "--crit-rpo", "1h")
    assert code == 1, report
    assert "newest point" in report["vms"][0]["summary"] and report["vms"][0]["newest_point_age"] > 2, report
    nagios = drtool(lab_config, "check", lab_vm.name, "--warn-rpo", "1h", "--nagios")
    assert nagios.returncode == 0 and nagios.stdout.startswith("DRTOOL OK - "), nagios
    assert f"'{lab_vm.name}_differing'=0B" in nagios.stdout.split("|", 1)[1], nagios.stdout

    stop_target(lab, lab_vm)
    code, report = check_json(lab_config, lab_vm.name)
    assert code == 2 and "replication broken" in report["vms"][0]["summary"], report
    drtool_ok(lab_config, "resync", lab_vm.name)


def test_an_unreachable_host_is_unknown(lab: Lab, lab_vm: LabVm, lab_config: Path, tmp_path: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    prom = tmp_path / "drtool.prom"
    lab.isolate("site-b")
    try:
        result = drtool(lab_config, "check", lab_vm.name, "--prometheus", str(prom), timeout=120)
    finally:
        lab.unisolate("site-b")
    assert result.returncode == 3, result.stderr
    assert "could not check" in result.stderr
    assert f'drtool_check_status{{vm="{lab_vm.name}"}} 3' in prom.read_text()


def network_bytes(lab: Lab) -> int:
    """Bytes the kernel counted on every link of the lab's hosts (each direction, both ends: an upper bound)."""
    total = 0
    for host in ("site-a", "site-b"):
        links = json.loads(lab.exec(host, ["ip", "-s", "-j", "link"]).stdout)
        for link in links:
            if link["ifname"] != "lo":
                stats = link["stats64"]
                total += stats["rx"]["bytes"] + stats["tx"]["bytes"]
    return total


def test_checking_a_2gib_disk_sends_under_one_percent_of_it(lab: Lab, tmp_path: Path):
    vm = lab.add_vm("chk-2g", "site-a", {"vd0": "2G"})
    try:
        config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
        for k in range(16):  # 256 MiB of data spread over the disk
            vm.guest_write("vd0", k * 128 * MiB, 16 * MiB, 0x20 + k)
        drtool_ok(config, "protect", vm.name, timeout=900)
        wait_in_sync(vm)
        before = network_bytes(lab)
        code, report = check_json(config, vm.name, timeout=1200)
        sent = network_bytes(lab) - before
        assert code == 0, report
        [disk] = report["vms"][0]["disks"]
        assert disk["compared_bytes"] == 256 * MiB, disk
        assert sent < (2 << 30) // 100, f"{sent} bytes crossed the network for a 2 GiB disk"
        print(f"check of 2 GiB (256 MiB data): {sent} bytes on the network, digests {disk['wire_bytes']} bytes, "
              f"{report['vms'][0]['seconds']} s")
    finally:
        vm.stop()


def rx_bytes(lab: Lab, host: str) -> int:
    links = json.loads(lab.exec(host, ["ip", "-s", "-j", "link"]).stdout)
    return sum(link["stats64"]["rx"]["bytes"] for link in links if link["ifname"] != "lo")


def differing_bytes(source: Path, replica: Path, tmp: Path, chunk: int = 64 * KiB) -> int:
    """Bytes of the chunks in which the two images differ, read with qemu-img (-U: both are open)."""
    raws = []
    for image in (source, replica):
        raw = tmp / f"{image.name}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True,
                       capture_output=True, timeout=120)
        raws.append(raw.read_bytes())
    a, b = raws
    return sum(chunk for o in range(0, max(len(a), len(b)), chunk) if a[o: o + chunk] != b[o: o + chunk])


def test_resync_after_the_source_is_killed_sends_only_what_differs(lab: Lab, lab_vm: LabVm, lab_config: Path,
                                                                   tmp_path: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    # data on both sides, the same; the later writes land in these allocated clusters, so they
    # survive the SIGKILL in the source's image (new clusters would need QEMU's cached metadata)
    lab_vm.guest_write("vd0", 0, 48 * MiB, 0x41)
    wait_in_sync(lab_vm)
    lab.cut_site_link("site-a", "site-b")
    try:  # writes that never reach the replica, then the source dies with its change tracking
        written = [(5 * MiB, MiB), (20 * MiB, 2 * MiB), (40 * MiB + 256 * KiB, 512 * KiB)]
        for k, (offset, length) in enumerate(written):
            lab_vm.guest_write("vd0", offset, length, 0x60 + k)
        lab_vm.kill()
        # The mirror's requests in flight sit in the link relay's TCP socket: held past the link
        # timeout they are dropped. Restored sooner, they could still land on the replica after the
        # kill, and less than `written` would differ (seen once: 512 KiB).
        time.sleep(LINK_TIMEOUT + 5)
    finally:
        lab.restore_site_link("site-a", "site-b")
    lab_vm.relaunch()
    # what a SIGKILL keeps of unflushed writes is up to QEMU's caches: measure what differs now
    differs = differing_bytes(lab_vm.disks["vd0"], replica_path(lab, lab_vm, "vd0"), tmp_path)
    assert differs >= MiB, f"only {differs} bytes differ: the test would show nothing"
    before = rx_bytes(lab, "site-b")
    report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    received = rx_bytes(lab, "site-b") - before
    assert report["action"] == "hash", report
    assert differs <= report["bytes_sent"] <= 1.1 * differs, report
    # the DR host's kernel: the chunks, TCP/TLS framing, and drtool's commands and digests (small)
    assert received < 1.1 * differs + 256 * KiB, f"site-b received {received} bytes for {differs} that differ"
    print(f"hash resync: {differs} bytes differ, {report['bytes_sent']} sent, site-b received {received}; "
          f"{report['detail']}")
    code, checked = check_json(lab_config, lab_vm.name)
    assert code == 0, checked["vms"][0]["summary"]


def test_a_hash_resync_killed_half_way_and_run_again_leaves_the_replica_whole(lab: Lab, lab_vm: LabVm,
                                                                               lab_config: Path):

    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, 48 * MiB, 0x41)
    wait_in_sync(lab_vm)
    lab.cut_site_link("site-a", "site-b")
    try:
        lab_vm.guest_write("vd0", 10 * MiB, 4 * MiB, 0x77)
        lab_vm.kill()
    finally:
        lab.restore_site_link("site-a", "site-b")
    lab_vm.relaunch()
    with Writer(lab_vm, region=40 * MiB) as writer:  # the guest keeps writing through all of it
        first = subprocess.Popen([sys.executable, "-m", "drtool", "--config", str(lab_config), "resync",
                                  lab_vm.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
        report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
        assert report["action"] == "hash", report  # the killed run never left mirrors that look in sync
        code, checked = check_json(lab_config, lab_vm.name)
    assert not writer.failure, writer.failure
    assert code == 0, checked["vms"][0]["summary"]
    assert writer.count > 5


def test_a_check_killed_half_way_is_cleaned_up_by_the_next(lab: Lab, lab_vm: LabVm, lab_config: Path,
                                                            tmp_path: Path):

    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, 32 * MiB, 0x42)
    wait_in_sync(lab_vm)
    first = subprocess.Popen([sys.executable, "-m", "drtool", "--config", str(lab_config), "check", lab_vm.name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(e["id"].startswith("drtool-check") for e in lab_vm.qmp("query-block-exports")):
        assert time.monotonic() < deadline and first.poll() is None, "the check never exported the disk"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    # killed inside a pause or not, the next check resumes the source (the pause was recorded first)
    code, report = check_json(lab_config, lab_vm.name)
    assert code == 0, report["vms"][0]["summary"]
    assert lab_vm.status() == "running"
    assert lab_vm.qmp("query-block-exports") == []
    bitmaps = [b.get("name", "") for n in lab_vm.qmp("query-named-block-nodes", flat=True) for b in n.get("dirty-bitmaps", [])]
    assert not [b for b in bitmaps if b.startswith("drtool-check")], bitmaps
    # no NBD server is left running in the source QEMU: the lab can start one
    lab_vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "probe.sock")}})
    lab_vm.qmp("nbd-server-stop")
