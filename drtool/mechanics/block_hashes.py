"""Which blocks of two images on two hosts differ, with only digests crossing the network; and the copy of those.

Each host hashes its own image in chunks with drtool's hasher (hasher.py: the
host's python3 and libnbd, the image opened through `qemu-nbd`, started by
libnbd itself). A chunk that NBD block status reports as reading zeros is not
read: it is "0". drtool compares the digests; the chunks that differ are then
read from one image and written into the other (the hasher's `read` streams
them out on stdout, its `write` takes them on stdin), so only the differing
chunks travel. `write` opens the image writable: nothing else may have it
open (qemu-nbd takes QEMU's image lock).

Used by `drtool recover --reprotect` after an unplanned failover (the old
primary may hold writes newer than the point the DR copy started from) and by
`recover --restore`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from drtool.errors import RemoteCommandError
from drtool.mechanics.hasher import DEFAULT_CHUNK, DIGEST_SIZE, ZERO, hash_chunks, image_file, run_hasher_raw
from drtool.transport.connections import RemoteShell

CHUNK = DEFAULT_CHUNK
__all__ = ["CHUNK", "ZERO", "ImageHashes", "copy_chunks", "differing_offsets", "hash_image"]


@dataclass(frozen=True)
class ImageHashes:
    size: int
    chunks: tuple[str, ...]  # per chunk: a hex digest, or ZERO when it reads as zeros
    wire_bytes: int  # what crossed the network for them


def hash_image(shell: RemoteShell, image: str, fmt: str, what: str, chunk: int = CHUNK) -> ImageHashes:
    hashes = hash_chunks(shell, image_file(image, fmt), chunk, None, what)
    return ImageHashes(hashes.size, tuple(hashes.chunks[offset] for offset in range(0, hashes.size, chunk)),
                       hashes.wire_bytes)


def differing_offsets(a: ImageHashes, b: ImageHashes, chunk: int = CHUNK) -> list[int]:
    """Offsets of the chunks whose content differs (a zero chunk equals a chunk of zeros)."""
    if a.size != b.size:
        raise RemoteCommandError(f"the images differ in size ({a.size} and {b.size} bytes)")
    zero_digests = {ZERO}
    zero_digests |= {_zero_digest(min(chunk, a.size - i * chunk)) for i in (0, len(a.chunks) - 1)}

    def same(x: str, y: str) -> bool:
        return x == y or (x in zero_digests and y in zero_digests)

    return [i * chunk for i, (x, y) in enumerate(zip(a.chunks, b.chunks, strict=False)) if not same(x, y)]


def _zero_digest(length: int) -> str:
    return hashlib.blake2b(bytes(length), digest_size=DIGEST_SIZE).hexdigest()


def copy_chunks(source: RemoteShell, source_image: str, source_format: str, target: RemoteShell,
                target_image: str, target_format: str, offsets: list[int], chunk: int = CHUNK,
                batch: int = 64) -> int:
    """Copy these chunks from one host's image into another's (in batches through drtool); bytes copied."""
    copied = 0
    for start in range(0, len(offsets), batch):
        part = offsets[start:start + batch]
        data = run_hasher_raw(source, {"mode": "read", "source": image_file(source_image, source_format),
                                       "chunk": chunk, "offsets": part}, f"reading {source_image}")
        answer = json.loads(run_hasher_raw(target, {"mode": "write", "target": image_file(target_image, target_format),
                                                    "chunk": chunk, "offsets": part},
                                           f"writing {target_image}", data))
        copied += int(answer["written"])
    return copied
