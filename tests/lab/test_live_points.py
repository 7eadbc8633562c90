"""Points and retention on the chain a live failover left running on the DR host, judged by the real guest.

After `failover --live` the DR copy's QEMU runs on the replica tops and takes
the points itself (drtool/mechanics/dr_points.py): a point holds every record
the guest acknowledged before the checkpoint, retention merges the older one
away through the running QEMU, the reverse bitmap survives the snapshots (the
reprotect sends only what the DR copy wrote), and after the live failback the
point is still a point of the DR chain and a checkpoint at home works.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm
from drtool.lab.guest import Ack, build_guest

from .guest_drills import manifest_of, protect_guest, run_drtool, start_guest_vm, stop_dr_copy
from .test_guest_round_trip import kill_home_qemu, kill_pidfile

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def guest():
    return build_guest()


def records_in(image: str, tmp_path: Path) -> dict[int, str]:
    """Record number -> boot id, read from an image (and its backing chain) as the guest wrote them."""
    raw = tmp_path / "read.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(raw)], check=True, timeout=120)
    data = raw.read_bytes()
    raw.unlink()
    records = {}
    for sector in range(len(data) // 512):
        fields = data[sector * 512:(sector + 1) * 512].decode(errors="replace").split()
        if len(fields) == 8 and fields[0] == "DRREC" and fields[7] == "CERD" and int(fields[1]) == sector:
            records[sector] = fields[2]
    return records


def assert_point_holds(lab: Lab, vm: LabVm, point_id: str, acked: Ack, tmp_path: Path) -> None:
    [point] = [p for p in manifest_of(lab, vm)["points"] if p["id"] == point_id]
    for device, image in point["images"].items():
        records = records_in(image, tmp_path)
        missing = [n for n in range(1, acked.n + 1) if n not in records]
        assert not missing, f"point {point_id} {device} ({image}) lacks acknowledged records {missing[:5]}"


def checkpoint(config: Path, vm: LabVm) -> dict:
    return json.loads(run_drtool(config, "checkpoint", vm.name, "--json").stdout)["results"][0]


def test_points_and_retention_on_the_live_failed_over_chain_and_home_again(lab, guest, tmp_path):
    started = time.monotonic()
    vm = start_guest_vm(lab, guest, "lpts")
    # one point a week: the second checkpoint lets the first go (unless a week's bucket ends between the two)
    config = lab.write_config(tmp_path / "drtool.toml",
                              {vm.name: {"dr_host": "site-b", "retention": ["weekly for 1w"]}})
    try:
        protect_guest(lab, vm, config)
        run_drtool(config, "failover", vm.name, "--live", "--yes")
        vm.process.wait(30)
        dr = lab.dr_console(vm.name)
        dr.wait_acks(10, timeout=120)

        acked_first = dr.last_ack()
        first = checkpoint(config, vm)
        assert first["error"] is None and first["point"]["quiesce"] == "drained", first
        first_images = first["point"]["images"]
        dr.wait_acks(len(dr.acks()) + 10, timeout=120)  # the guest writes on, above the point
        acked = dr.last_ack()
        second = checkpoint(config, vm)
        window = [a for a in dr.acks() if a.n >= acked.n]  # the guest's acks while the checkpoint ran
        gaps = sorted(b.t - a.t for a, b in itertools.pairwise(window))
        print(f"\ncheckpoints on the DR copy: I/O held {first['quiesced_seconds']:.3f} s and "
              f"{second['quiesced_seconds']:.3f} s (the transaction); guest's gaps between acks while the second "
              f"ran: median {gaps[len(gaps) // 2] if gaps else 0:.2f} s, largest {max(gaps, default=0):.2f} s "
              f"({len(window)} acks)", flush=True)
        assert second["error"] is None and second["deleted"] == [first["point"]["id"]], second
        point_id = second["point"]["id"]
        manifest = manifest_of(lab, vm)
        assert [p["id"] for p in manifest["points"]] == [point_id]
        # the second point's own images were merged down into the first's files, which now hold its view
        assert manifest["points"][0]["images"] == first_images
        for device, image in second["point"]["images"].items():
            assert not Path(image).exists(), f"{device}: {image} was merged away but its file stays"
        for disk in manifest["disks"]:
            chain = json.loads(subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                                               disk["replica_image"]], check=True, capture_output=True,
                                              text=True).stdout)
            assert [c["filename"] for c in chain] == [disk["replica_image"], first_images[disk["device"]]]
        assert_point_holds(lab, vm, point_id, acked, tmp_path)
        assert acked_first.n < acked.n

        reprotected = json.loads(run_drtool(config, "recover", vm.name, "--reprotect", "--json").stdout)
        assert reprotected["method"] == "bitmap", "the reverse bitmap did not survive the points"
        assert 0 < reprotected["sent_bytes"] < reprotected["disk_bytes"], reprotected
        dr.wait_acks(len(dr.acks()) + 5, timeout=180)
        run_drtool(config, "recover", vm.name, "--failback", "--live")
        vm.console.wait_acks(5, timeout=120)

        listed = json.loads(run_drtool(config, "points", vm.name, "--json").stdout)
        assert point_id in [p["id"] for p in listed["points"]]
        assert_point_holds(lab, vm, point_id, acked, tmp_path)  # untouched by the way home
        home = checkpoint(config, vm)
        assert home["error"] is None and home["point"]["quiesce"] == "paused", home
        after = manifest_of(lab, vm)
        assert after["state"] == "protected" and [p["id"] for p in after["points"]][-1] == home["point"]["id"]
        print(f"test_live_points (live): {time.monotonic() - started:.1f} s", flush=True)
    finally:
        _clean(lab, vm)


def test_a_point_taken_after_a_cold_failover_comes_home_with_every_record(lab, guest, tmp_path):
    """Cold planned failover (the guest reboots at DR), a point on the DR copy, then home by reprotect and cold
    failback: the reprotect rewinds the old disks to that point, not the final one (a sync=top mirror would
    miss what the DR copy wrote below its new top), and the guest at home finds every record it was promised."""
    started = time.monotonic()
    vm = start_guest_vm(lab, guest, "lptc")
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    try:
        protect_guest(lab, vm, config)
        run_drtool(config, "failover", vm.name, "--yes")
        vm.process.wait(30)
        dr = lab.dr_console(vm.name)
        dr.wait_verify(timeout=180)
        dr.wait_acks(10, timeout=120)
        taken = checkpoint(config, vm)
        assert taken["error"] is None and taken["point"]["quiesce"] == "drained", taken
        dr.wait_acks(len(dr.acks()) + 10, timeout=120)
        reprotected = json.loads(run_drtool(config, "recover", vm.name, "--reprotect", "--json").stdout)
        assert (reprotected["method"], reprotected["point"]) == ("hashes", taken["point"]["id"]), reprotected
        dr.wait_acks(len(dr.acks()) + 5, timeout=180)
        run_drtool(config, "recover", vm.name, "--failback")
        promised = dr.last_ack()
        home = vm.console.wait_verify(timeout=180)
        assert home.problems() == [], home
        assert home.b.max >= promised.n, f"acknowledged at the DR site up to {promised.n}, home has {home.b.max}"
        listed = json.loads(run_drtool(config, "points", vm.name, "--json").stdout)
        assert taken["point"]["id"] in [p["id"] for p in listed["points"]]
        assert checkpoint(config, vm)["error"] is None
        print(f"\ntest_live_points (cold): {time.monotonic() - started:.1f} s", flush=True)
    finally:
        _clean(lab, vm)


def _clean(lab: Lab, vm: LabVm) -> None:
    """What the round trip started outside the lab's own processes."""
    kill_home_qemu(vm)
    kill_pidfile(lab.host_dir("site-a") / "drtool" / vm.name / "reverse" / "target.pid")
    kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{vm.name}.link.pid")
    kill_pidfile(lab.replica_dir(vm.name) / "target.pid")
    stop_dr_copy(lab, vm)
