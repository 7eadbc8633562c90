"""Resync's bitmap tier trusts the one persistent bitmap its manifest names, and nothing else."""

from __future__ import annotations

from dataclasses import replace

from drtool.mechanics.replication import distrusting_bitmaps, trusted_bitmap, trusting_bitmap

from .fakes import FakeQmp
from .test_replication_jobs import manifest

OLD, STRAY = "drtool-resync-1000", "drtool-resync-2000"


def qemu(*bitmaps_per_node: list[dict]) -> FakeQmp:
    return FakeQmp({"query-named-block-nodes": [
        {"node-name": f"disk{i}", "dirty-bitmaps": [{"name": "", "count": 0}, *bitmaps]}
        for i, bitmaps in enumerate(bitmaps_per_node)]})


def test_the_recorded_bitmap_is_used_even_beside_a_newer_stray_one():
    m = trusting_bitmap(manifest(), OLD)
    both = [{"name": OLD, "count": 4096}, {"name": STRAY, "count": 512}]
    assert trusted_bitmap(qemu(both, both), m, ["disk0", "disk1"]) == OLD


def test_no_bitmap_is_trusted_while_a_full_copy_runs():
    m = distrusting_bitmaps(trusting_bitmap(manifest(), OLD))
    assert m.bitmap_name == ""
    assert trusted_bitmap(qemu([{"name": OLD, "count": 0}], [{"name": OLD, "count": 0}]), m, ["disk0", "disk1"]) is None


def test_a_stray_bitmap_alone_is_not_trusted():
    m = trusting_bitmap(manifest(), OLD)
    stray = [{"name": STRAY, "count": 512}]
    assert trusted_bitmap(qemu(stray, stray), m, ["disk0", "disk1"]) is None


def test_the_recorded_bitmap_missing_on_one_disk_or_inconsistent_is_not_trusted():
    m = trusting_bitmap(manifest(), OLD)
    assert trusted_bitmap(qemu([{"name": OLD}], []), m, ["disk0", "disk1"]) is None
    broken = [{"name": OLD, "inconsistent": True}]
    assert trusted_bitmap(qemu(broken, broken), m, ["disk0", "disk1"]) is None


def test_each_trusted_bitmap_is_a_new_generation():
    first = trusting_bitmap(manifest(), OLD)
    second = trusting_bitmap(replace(first), STRAY)
    assert (first.bitmap_name, first.bitmap_generation) == (OLD, 1)
    assert (second.bitmap_name, second.bitmap_generation) == (STRAY, 2)
