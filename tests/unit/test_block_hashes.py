"""Block hashes on real images (qemu-img, qemu-nbd, python3-libnbd): only differing chunks found and copied."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from drtool.mechanics.block_hashes import (
    CHUNK,
    copy_chunks,
    differing_offsets,
    hash_image,
)

from .local_shell import LocalShell

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")


def image(path: Path, writes: list[tuple[int, int]]) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    for offset, pattern in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 4k", str(path)],
                       check=True, capture_output=True)
    return str(path)


def test_hashes_find_exactly_the_differing_chunks_and_the_copy_makes_the_images_equal(tmp_path: Path) -> None:
    shell = LocalShell()
    point = image(tmp_path / "point.qcow2", [(0, 0x11), (3 * CHUNK, 0x22)])
    old = image(tmp_path / "old.qcow2", [(0, 0x11), (3 * CHUNK, 0x23), (5 * CHUNK + 4096, 0x33)])
    differ = differing_offsets(hash_image(shell, point, "qcow2", "point"), hash_image(shell, old, "qcow2", "old"))
    assert differ == [3 * CHUNK, 5 * CHUNK]
    copied = copy_chunks(shell, point, "qcow2", shell, old, "qcow2", differ)
    assert copied == 2 * CHUNK
    assert subprocess.run(["qemu-img", "compare", "-q", point, old], check=False).returncode == 0


def test_a_zeroed_chunk_equals_an_unallocated_one(tmp_path: Path) -> None:
    shell = LocalShell()
    a = image(tmp_path / "a.qcow2", [(CHUNK, 0)])  # written, but zeros
    b = image(tmp_path / "b.qcow2", [])
    assert differing_offsets(hash_image(shell, a, "qcow2", "a"), hash_image(shell, b, "qcow2", "b")) == []
