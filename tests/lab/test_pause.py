"""The checkpoint pause is short because its drain reads the mirrors' bitmaps; it must still miss nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .replication_helpers import drtool_ok

pytestmark = pytest.mark.lab
MiB = 1 << 20


def point_holds(image: str, offset: int, length: int, pattern: int) -> bool:
    result = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", image, "-c",
                             f"read -P 0x{pattern:02x} {offset} {length}"], capture_output=True, text=True, timeout=60)
    return result.returncode == 0 and "Pattern verification failed" not in result.stdout + result.stderr


def test_a_point_taken_right_after_writes_holds_every_one_of_them(lab, lab_vm, tmp_path: Path):  # noqa: ANN001
    """Async mode: each checkpoint follows a write at once, and its point holds that write.

    (The mirror here copies faster than drtool starts, so this mostly shows
    the short drain misses nothing in the common case; the drain's rule
    itself is walked through QEMU's states in tests/unit/test_drain.py.)
    """
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(config, "protect", lab_vm.name)
    for i in range(3):
        offset = (8 + 10 * i) * MiB
        lab_vm.guest_write("vd0", offset, 8 * MiB, 0x61 + i)  # no wait: checkpoint at once
        [entry] = json.loads(drtool_ok(config, "checkpoint", lab_vm.name, "--json").stdout)["results"]
        assert entry["error"] is None, entry
        image = entry["point"]["images"]["vd0"]
        assert point_holds(image, offset, 8 * MiB, 0x61 + i), f"point {entry['point']['id']} lacks write {i}"
        assert entry["quiesced_seconds"] < 1, entry
