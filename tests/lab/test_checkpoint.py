"""drtool checkpoint / points and retention against the real lab: points on the DR target's qemu-storage-daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path, PurePosixPath

import pytest

from drtool.mechanics.dr_target import TargetLayout
from drtool.errors import ExitCode
from drtool.lab.vm import qmp_execute
from drtool.state.manifest import Manifest
from drtool.mechanics.points import prepare_point, take_point
from drtool.transport.qmp import local_qmp

from .replication_helpers import (
    assert_replicas_identical,
    drtool,
    drtool_ok,
    replica_has,
    wait_broken,
    wait_in_sync,
)

pytestmark = pytest.mark.lab
KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512


# ----------------------------------------------------------------------------- helpers


def replica_dir(lab, vm) -> Path:  # noqa: ANN001
    return lab.host_dir("site-b") / "replicas" / vm.name


def manifest_of(lab, vm) -> dict:  # noqa: ANN001
    return json.loads((replica_dir(lab, vm) / "manifest.json").read_text())


def write_manifest(lab, vm, manifest: Manifest) -> None:  # noqa: ANN001
    """As drtool would (atomically, 0600): the test is root on the DR host too."""
    path = replica_dir(lab, vm) / "manifest.json"
    tmp = path.with_name("manifest.json.test-tmp")
    tmp.write_bytes(manifest.to_json())
    tmp.chmod(0o600)
    os.replace(tmp, path)


def checkpoint(config: Path, vm) -> dict:  # noqa: ANN001
    """One `drtool checkpoint VM --json` that must work; its result entry."""
    [entry] = json.loads(drtool_ok(config, "checkpoint", vm.name, "--json").stdout)["results"]
    assert entry["point"] is not None and entry["error"] is None, entry
    return entry


def top_of(lab, vm, device: str) -> str:  # noqa: ANN001
    """The replica's active top: the image replication writes to (the manifest's replica_image)."""
    return next(d["replica_image"] for d in manifest_of(lab, vm)["disks"] if d["device"] == device)



def exported_files(lab, vm) -> dict[str, str]:  # noqa: ANN001
    """What the DR target exports, asked on its own monitor: export name -> image file of its node."""
    sock = replica_dir(lab, vm) / "target.qmp"
    nodes = {n["node-name"]: n for n in qmp_execute(sock, "query-named-block-nodes", {"flat": True}, 10)}
    exports = qmp_execute(sock, "query-block-exports", None, 10)
    return {e["id"]: nodes[e["node-name"]]["file"] for e in exports}


def read_sectors(image: str, count: int, tmp: Path) -> bytes:
    raw = tmp / f"{Path(image).name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, str(raw)], check=True,
                   capture_output=True, timeout=60)
    data = raw.read_bytes()[: count * SECTOR]
    raw.unlink()
    return data


def counter(data: bytes, pattern: int) -> int:
    """Leading sectors holding the pattern; every later one must still be zero (no hole, no reordering)."""
    full, empty = bytes([pattern]) * SECTOR, bytes(SECTOR)
    sectors = [data[i: i + SECTOR] for i in range(0, len(data), SECTOR)]
    n = next((i for i, s in enumerate(sectors) if s != full), len(sectors))
    assert all(s == empty for s in sectors[n:]), f"sector after the first {n} written ones is not empty"
    return n


@pytest.fixture
def two_disk_vm(lab, request):  # noqa: ANN001, ANN201
    vm = lab.add_vm(f"c{os.getpid() % 1000}-{request.node.name[5:17]}", "site-a", {"vd0": "16M", "vd1": "16M"})
    yield vm
    vm.stop()


# ----------------------------------------------------------------------------- tests


def test_checkpoint_an_idle_vm_then_points_are_frozen(lab, lab_vm, tmp_path):
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(config, "protect", lab_vm.name)
    region = (MiB, 64 * KiB)
    lab_vm.guest_write("vd0", *region, 0xAA)  # A
    wait_in_sync(lab_vm)  # idle: nothing left to send when the point is taken
    p1 = checkpoint(config, lab_vm)
    assert p1["point"]["quiesce"] == "paused"
    assert 0 < p1["quiesced_seconds"] < 1.0, p1
    assert lab_vm.status() == "running"  # resumed
    listed = json.loads(drtool_ok(config, "points", lab_vm.name, "--json").stdout)
    [p] = listed["points"]
    assert p["id"] == p1["point"]["id"] and p["quiesce"] == "paused" and p["tested_at"] is None
    assert p["time"] == p1["point"]["time"] and listed["space"][p["id"]] > 0

    # A point's content is frozen: A, point 1, B over it, point 2, then C without a point.
    lab_vm.guest_write("vd0", *region, 0xBB)
    p2 = checkpoint(config, lab_vm)["point"]
    image1, image2 = Path(p1["point"]["images"]["vd0"]), Path(p2["images"]["vd0"])
    assert image1 != image2 and image1.parent == image2.parent == replica_dir(lab, lab_vm)
    assert replica_has(image1, *region, 0xAA)
    assert replica_has(image2, *region, 0xBB)
    wait_in_sync(lab_vm)
    top = Path(top_of(lab, lab_vm, "vd0"))
    assert top not in (image1, image2) and replica_has(top, *region, 0xBB)
    lab_vm.guest_write("vd0", *region, 0xCC)
    wait_in_sync(lab_vm)
    assert replica_has(top, *region, 0xCC)  # replication goes on into the top...
    assert replica_has(image2, *region, 0xBB)  # ...never into a point's image
    assert replica_has(image1, *region, 0xAA)
    assert exported_files(lab, lab_vm) == {"export0": str(top)}
    assert_replicas_identical(lab, lab_vm)


def test_write_order_across_two_disks_holds_in_every_point(lab, two_disk_vm, tmp_path):
    """A writer puts sector n on vd0, then sector n on vd1: no point may hold vd1's n without vd0's.

    The lab's guest writes go through HMP and would go on while the VM is
    paused, which a real guest's stopped CPUs never do: the writer asks the lab
    monitor that the VM runs before each pair and writes nothing while it is
    paused. That models a guest unable to issue I/O while stopped; what remains
    is a pair issued just before the pause, which QMP stop drains and drtool's
    wait for quiet mirrors covers.
    """
    vm = two_disk_vm
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(config, "protect", vm.name)
    stop, written, failure = threading.Event(), [0], []

    def writer() -> None:
        try:
            n = 0
            while not stop.is_set() and n < 16 * MiB // SECTOR:
                if vm.status() != "running":
                    time.sleep(0.005)
                    continue
                vm.guest_write("vd0", n * SECTOR, SECTOR, 0xA5)
                vm.guest_write("vd1", n * SECTOR, SECTOR, 0x5A)
                n += 1
                written[0] = n
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            failure.append(err)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    points = []
    try:
        while len(points) < 3 or written[0] < 20:
            time.sleep(0.3)
            assert not failure, failure
            points.append(checkpoint(config, vm)["point"])
            assert len(points) < 8, f"the writer made no progress: {written[0]} pairs"
    finally:
        stop.set()
        thread.join(30)
    assert not failure, failure
    n = written[0]
    counts = []
    for p in points:
        vd0 = counter(read_sectors(p["images"]["vd0"], n + 8, tmp_path), 0xA5)
        vd1 = counter(read_sectors(p["images"]["vd1"], n + 8, tmp_path), 0x5A)
        assert vd1 <= vd0 <= vd1 + 1, f"point {p['id']}: vd0 has {vd0} writes, vd1 {vd1}"
        counts.append(vd0)
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"no progress between points: {counts}"
    assert_replicas_identical(lab, vm, ("vd0", "vd1"))


def test_retention_deletes_older_points_of_the_same_minute(lab, two_disk_vm, tmp_path):
    vm = two_disk_vm
    config = lab.write_config(tmp_path / "drtool.toml",
                              {vm.name: {"dr_host": "site-b", "retention": ["every 1m for 2m"]}})
    drtool_ok(config, "protect", vm.name)
    common = (8 * MiB, 64 * KiB)
    taken, deleted = [], []
    for k in range(4):
        vm.guest_write("vd0", k * MiB, 64 * KiB, 0x30 + k)  # its own region, kept by every later point
        vm.guest_write("vd1", k * MiB, 64 * KiB, 0x40 + k)
        vm.guest_write("vd0", *common, 0x50 + k)  # overwritten each time: only this point has 0x50+k
        entry = checkpoint(config, vm)
        taken.append(entry["point"])
        deleted += entry["deleted"]
    # kept: the newest point of each minute (all are within 2 minutes), and the newest
    by_minute = {}
    for k, p in enumerate(taken):
        by_minute[p["time"][:16]] = (k, p["id"])
    expect_kept = sorted(by_minute.values())
    assert len(expect_kept) < 4, "four checkpoints spread over four minutes?"
    listed = json.loads(drtool_ok(config, "points", vm.name, "--json").stdout)
    assert [p["id"] for p in listed["points"]] == [pid for _, pid in expect_kept]
    assert sorted(deleted) == sorted(p["id"] for p in taken if p["id"] not in dict(expect_kept).values())
    # no file left behind but the kept points' images and the active tops
    manifest = manifest_of(lab, vm)
    in_use = {img for p in manifest["points"] for img in p["images"].values()}
    in_use |= {d["replica_image"] for d in manifest["disks"]}
    assert {str(f) for f in replica_dir(lab, vm).glob("*.qcow2")} == in_use
    # each kept point still holds exactly what was written before it
    for (k, pid), p in zip(expect_kept, manifest["points"]):
        assert p["id"] == pid
        vd0, vd1 = Path(p["images"]["vd0"]), Path(p["images"]["vd1"])
        assert replica_has(vd0, *common, 0x50 + k), f"point {k} lost its data"
        for j in range(4):
            assert replica_has(vd0, j * MiB, 64 * KiB, 0x30 + j if j <= k else 0), (k, j)
            assert replica_has(vd1, j * MiB, 64 * KiB, 0x40 + j if j <= k else 0), (k, j)
    vm.guest_write("vd0", *common, 0x99)
    vm.guest_write("vd1", 15 * MiB, MiB, 0x98)
    assert_replicas_identical(lab, vm, ("vd0", "vd1"))
    assert replica_has(Path(manifest["points"][-1]["images"]["vd0"]), *common, 0x50 + expect_kept[-1][0])


def test_a_point_left_pending_is_settled_either_way(lab, two_disk_vm, tmp_path):
    vm = two_disk_vm
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(config, "protect", vm.name)
    layout = TargetLayout(PurePosixPath(replica_dir(lab, vm)))
    vm.guest_write("vd0", 0, 64 * KiB, 0x11)
    first = checkpoint(config, vm)["point"]

    # 1. drtool died after writing the pending manifest, before the snapshot, or the snapshot
    #    transaction failed after creating vd0's overlay: settling drops the point and that file.
    settled = Manifest.from_json((replica_dir(lab, vm) / "manifest.json").read_bytes(), "test")
    tops = {d.device: d.replica_image for d in settled.disks}
    pending = prepare_point(settled, layout, "paused", 0.0)
    stray = pending.pending_point.tops["vd0"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", tops["vd0"], "-F", "qcow2", stray], check=True)
    write_manifest(lab, vm, pending)
    drtool_ok(config, "resync", vm.name)
    after = manifest_of(lab, vm)
    assert after["pending_point"] is None and [p["id"] for p in after["points"]] == [first["id"]]
    assert {d["device"]: d["replica_image"] for d in after["disks"]} == tops
    assert not Path(stray).exists()
    assert exported_files(lab, vm) == {"export0": tops["vd0"], "export1": tops["vd1"]}
    vm.guest_write("vd0", 2 * MiB, 64 * KiB, 0x22)
    assert_replicas_identical(lab, vm, ("vd0", "vd1"))

    # 2. drtool died after the snapshot, before saving the settled manifest; then the target died too.
    #    The restarted target must export the new tops, never the point's images below them.
    vm.guest_write("vd0", 0, 64 * KiB, 0x33)
    vm.guest_write("vd1", 0, 64 * KiB, 0x34)
    vm.qmp("stop")
    try:
        wait_in_sync(vm)
        settled = Manifest.from_json((replica_dir(lab, vm) / "manifest.json").read_bytes(), "test")
        pending = prepare_point(settled, layout, "paused", 0.0)
        write_manifest(lab, vm, pending)
        with local_qmp("test target", str(layout.qmp_socket)) as target:
            take_point(target, pending)  # ...and the settled manifest is never written
    finally:
        vm.qmp("cont")
    point_images = {d.device: d.replica_image for d in settled.disks}  # the old tops: the point's images now
    new_tops = pending.pending_point.tops
    os.kill(int((replica_dir(lab, vm) / "target.pid").read_text()), signal.SIGKILL)
    report = json.loads(drtool_ok(config, "resync", vm.name, "--json").stdout)
    assert report["target_restarted"], report
    after = manifest_of(lab, vm)
    assert after["pending_point"] is None
    assert {d["device"]: d["replica_image"] for d in after["disks"]} == new_tops
    assert [p["id"] for p in after["points"]] == [first["id"], pending.pending_point.point.id]
    assert after["points"][-1]["images"] == point_images
    assert exported_files(lab, vm) == {"export0": new_tops["vd0"], "export1": new_tops["vd1"]}
    vm.guest_write("vd0", 0, 64 * KiB, 0x44)
    vm.guest_write("vd1", 0, 64 * KiB, 0x45)
    assert_replicas_identical(lab, vm, ("vd0", "vd1"))
    assert replica_has(Path(point_images["vd0"]), 0, 64 * KiB, 0x33), "a point's image took writes after it"
    assert replica_has(Path(point_images["vd1"]), 0, 64 * KiB, 0x34), "a point's image took writes after it"
    assert replica_has(Path(new_tops["vd0"]), 0, 64 * KiB, 0x44)
    assert replica_has(Path(first["images"]["vd0"]), 0, 64 * KiB, 0x11)

    # 3. points are still taken and deleted on the restarted target, whose backing nodes it named itself
    lab.write_config(config, {vm.name: {"dr_host": "site-b", "retention": ["every 1m for 1m"]}})
    last = checkpoint(config, vm)
    kept = manifest_of(lab, vm)["points"]
    assert last["deleted"], "no point of the same minute was deleted"
    assert set(last["deleted"]) | {p["id"] for p in kept} == {
        first["id"], pending.pending_point.point.id, last["point"]["id"]}
    assert replica_has(Path(kept[-1]["images"]["vd0"]), 0, 64 * KiB, 0x44)
    assert replica_has(Path(kept[-1]["images"]["vd1"]), 0, 64 * KiB, 0x45)
    assert_replicas_identical(lab, vm, ("vd0", "vd1"))


def test_a_failed_snapshot_that_left_its_overlay_is_not_adopted(lab, lab_vm, tmp_path):
    """QEMU does not delete the image a failed blockdev-snapshot-sync transaction created.

    take_consistent_point leaves the pending manifest behind when the
    transaction fails, so the next drtool settles it: with one disk, the
    leftover overlay (backed by the top) looks exactly like a snapshot that
    worked. The running target, which never switched, is the only witness.
    """
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(config, "protect", lab_vm.name)
    layout = TargetLayout(PurePosixPath(replica_dir(lab, lab_vm)))
    settled = Manifest.from_json((replica_dir(lab, lab_vm) / "manifest.json").read_bytes(), "test")
    pending = prepare_point(settled, layout, "paused", 0.0)
    leftover = pending.pending_point.tops["vd0"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", settled.disks[0].replica_image, "-F", "qcow2",
                    leftover], check=True)
    write_manifest(lab, lab_vm, pending)
    drtool_ok(config, "resync", lab_vm.name)
    after = manifest_of(lab, lab_vm)
    exported = exported_files(lab, lab_vm)["export0"]
    assert after["disks"][0]["replica_image"] == exported, (
        f"the manifest's top is {after['disks'][0]['replica_image']} but the target writes to {exported}, "
        f"the image of point {after['points'][-1]['id'] if after['points'] else '-'}")
    assert after["points"] == []


def test_checkpoint_refusals(lab, tmp_path):
    lab_vm = lab.add_vm(f"r{os.getpid() % 1000}-prot", "site-a", {"vd0": "16M"})
    try:
        _refusals(lab, lab_vm, tmp_path)
    finally:
        lab_vm.stop()


def _refusals(lab, lab_vm, tmp_path):  # noqa: ANN001, ANN202
    idle = lab.add_vm(f"u{os.getpid() % 1000}-unprot", "site-a", {"vd0": "16M"})
    try:
        config = lab.write_config(tmp_path / "drtool.toml",
                                  {lab_vm.name: {"dr_host": "site-b"}, idle.name: {"dr_host": "site-b"}})
        refused = drtool(config, "checkpoint", idle.name)
        assert refused.returncode == ExitCode.REFUSED, refused
        assert f"{idle.name} is not protected" in refused.stderr and f"drtool protect {idle.name}" in refused.stderr
        drtool_ok(config, "protect", lab_vm.name)
        every = json.loads(drtool_ok(config, "checkpoint", "--all", "--json").stdout)["results"]
        by_vm = {r["vm"]: r for r in every}
        assert by_vm[lab_vm.name]["point"] is not None and by_vm[lab_vm.name]["exit_code"] == 0
        assert by_vm[idle.name]["point"] is None and "skipped" in by_vm[idle.name]["error"]
        assert by_vm[idle.name]["exit_code"] == 0
    finally:
        idle.stop()
    points_before = manifest_of(lab, lab_vm)["points"]
    lab.cut_site_link("site-a", "site-b")
    try:
        lab_vm.guest_write("vd0", 0, MiB, 0x66)
        wait_broken(lab_vm, timeout=30)
        broken = drtool(config, "checkpoint", lab_vm.name)
        assert broken.returncode == ExitCode.REFUSED, broken
        assert "broken" in broken.stderr and f"drtool resync {lab_vm.name}" in broken.stderr, broken.stderr
        assert manifest_of(lab, lab_vm)["points"] == points_before
        assert lab_vm.status() == "running"
    finally:
        lab.restore_site_link("site-a", "site-b")
