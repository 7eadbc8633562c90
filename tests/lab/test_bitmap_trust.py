"""Resync's bitmap tier against real QEMU: only the bitmap the manifest names is trusted."""

from __future__ import annotations

import json
import time

import pytest

from .replication_helpers import assert_replicas_identical, drtool_ok, replica_path, wait_in_sync

pytestmark = pytest.mark.lab
MiB = 1 << 20


def manifest_of(lab, vm) -> dict:  # noqa: ANN001
    return json.loads((replica_path(lab, vm, "vd0").parent / "manifest.json").read_text())


def disk_node(vm) -> str:  # noqa: ANN001
    [disk] = [b for b in vm.qmp("query-block") if b.get("qdev", "").startswith("/machine/peripheral/vd0")]
    return str(disk["inserted"]["node-name"])


def drtool_bitmaps(vm) -> list[str]:  # noqa: ANN001
    """drtool's bitmaps, on whichever node holds them (a running job's filter sits above the disk)."""
    return sorted(b["name"] for n in vm.qmp("query-named-block-nodes", flat=True)
                  for b in n.get("dirty-bitmaps", []) if b.get("name", "").startswith("drtool-resync-"))


def test_a_bitmap_the_manifest_does_not_name_is_never_trusted(lab, lab_vm, lab_config):  # noqa: ANN001
    """A persistent drtool bitmap that survived a clean restart, but that no in-sync replica stands behind.

    A full copy killed half-way leaves one (it is added before the copy); so
    may a rotation cut short. The replica lacks what was written before such
    a bitmap began: sending only its blocks would leave the replica silently
    different. The manifest names the bitmap resync may trust; any other
    means comparing all content (the hash tier: the replica was whole once).
    """
    drtool_ok(lab_config, "protect", lab_vm.name)
    recorded = manifest_of(lab, lab_vm)
    assert recorded["bitmap_name"] in drtool_bitmaps(lab_vm) and recorded["bitmap_generation"] == 1, recorded
    lab_vm.guest_write("vd0", 0, 4 * MiB, 0x21)
    wait_in_sync(lab_vm)
    assert json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)["action"] == "none"
    rotated = manifest_of(lab, lab_vm)
    assert rotated["bitmap_generation"] == 2 and drtool_bitmaps(lab_vm) == [rotated["bitmap_name"]], rotated

    lab_vm.kill()  # the trusted bitmap is lost with an unclean stop
    lab_vm.relaunch()
    lab_vm.guest_write("vd0", 8 * MiB, MiB, 0x23)  # the replica lacks this, and nothing tracks it
    lab_vm.qmp("block-dirty-bitmap-add", node=disk_node(lab_vm), name=f"drtool-resync-{time.time_ns()}",
               persistent=True)  # a stray one, as a full copy killed half-way leaves
    lab_vm.guest_write("vd0", 12 * MiB, MiB, 0x24)
    lab_vm.stop()  # clean: the stray bitmap is written to the qcow2, consistent
    lab_vm.relaunch()
    report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    assert report["action"] == "hash", report  # never "bitmap": the stray bitmap misses the 8 MiB write
    assert_replicas_identical(lab, lab_vm)
    after = manifest_of(lab, lab_vm)
    assert after["bitmap_name"] in drtool_bitmaps(lab_vm) and after["bitmap_generation"] == 3, after
