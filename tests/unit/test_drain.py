"""wait_drained's rule, walked through the states a paused source's mirror passes (values as QEMU 7.2 shows them)."""

from __future__ import annotations

from typing import Any

from drtool.mechanics.replication import job_id, wait_drained

from .fakes import ExecutesInOrder
from .test_replication_jobs import manifest

MiB = 1 << 20


class DrainingQemu(ExecutesInOrder):
    """Each poll (bitmaps, then jobs) reads the next (dirty bytes, len, offset) of a script; the last repeats."""

    def __init__(self, script: list[tuple[int, int, int]]) -> None:
        self.script = script
        self.polls = 0
        self.state = script[0]

    def execute(self, command: str, args: dict | None = None, *, timeout: float | None = None) -> Any:
        if command == "query-named-block-nodes":
            self.state = self.script[min(self.polls, len(self.script) - 1)]
            self.polls += 1
            return [{"node-name": "disk0", "dirty-bitmaps": [{"name": "", "count": self.state[0]},
                                                              {"name": "drtool-resync-1", "count": 7 * MiB}]}]
        if command == "query-block-jobs":
            dirty, length, offset = self.state
            return [{"device": job_id(0), "len": length, "offset": offset, "ready": True, "status": "ready",
                     "paused": False, "io-status": "ok"}]
        raise AssertionError(command)


def drained_after(script: list[tuple[int, int, int]]) -> int:
    """How many polls wait_drained took to say "drained"."""
    qemu = DrainingQemu(script)
    assert wait_drained(qemu, manifest(1), ["disk0"], timeout=2, poll=0)
    return qemu.polls


def test_a_stale_len_equal_to_offset_does_not_hide_dirty_blocks():
    # the write is in the mirror's bitmap; len/offset still show the last iteration's "nothing left"
    assert drained_after([(2 * MiB, 10 * MiB, 10 * MiB), (2 * MiB, 10 * MiB, 10 * MiB),
                          (0, 12 * MiB, 10 * MiB), (0, 12 * MiB, 12 * MiB)]) == 5


def test_a_copy_in_flight_keeps_it_waiting_though_the_bitmap_is_clean():
    # the iteration cleared the bits when it started the copy, after setting len above offset
    assert drained_after([(0, 12 * MiB, 10 * MiB), (0, 12 * MiB, 11 * MiB), (0, 12 * MiB, 12 * MiB)]) == 4


def test_offset_past_a_stale_len_is_not_done():
    assert drained_after([(0, 10 * MiB, 11 * MiB), (0, 10 * MiB, 11 * MiB), (0, 11 * MiB, 11 * MiB)]) == 4


def test_it_must_hold_twice_in_a_row_and_named_bitmaps_do_not_count():
    assert drained_after([(0, 5 * MiB, 5 * MiB)]) == 2
    assert drained_after([(0, 5 * MiB, 5 * MiB), (MiB, 5 * MiB, 5 * MiB), (0, 6 * MiB, 6 * MiB)]) == 4


def test_it_gives_up_at_its_deadline():
    qemu = DrainingQemu([(MiB, 5 * MiB, 5 * MiB)])
    assert not wait_drained(qemu, manifest(1), ["disk0"], timeout=0.05, poll=0.001)
