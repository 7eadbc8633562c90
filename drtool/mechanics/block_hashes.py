"""Which blocks of two images on two hosts differ, with only digests crossing the network; and the copy of those.

Each host hashes its own image in chunks (BLAKE2b, 16 bytes) with its
python3 and libnbd (python3-libnbd), opening the image read-only through
`qemu-nbd` (socket activation, started by libnbd itself). A chunk that NBD
block status reports as reading zeros is not read: it is "0". drtool compares
the digests; the chunks that differ are then read from one image and written
into the other (`read` streams them out on stdout, `write` takes them on
stdin), so only the differing chunks travel. `write` opens the image writable:
nothing else may have it open (qemu-nbd takes QEMU's image lock).

Used by `drtool recover --reprotect` after an unplanned failover: the old
primary may hold writes newer than the point the DR copy started from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from drtool.errors import RemoteCommandError
from drtool.transport.connections import RemoteShell

CHUNK = 1 << 20
ZERO = "0"
# The distribution's python3, where python3-libnbd installs its module.
SYSTEM_PYTHON = "/usr/bin/python3"

_SCRIPT = r"""
import hashlib, json, sys
try:
    import nbd
except ImportError:
    sys.stderr.write("python3 cannot import nbd: install python3-libnbd\n")
    sys.exit(4)
req = json.loads(sys.stdin.buffer.readline())
h = nbd.NBD()
h.add_meta_context("base:allocation")
argv = ["qemu-nbd", "-f", req["format"]] + ([] if req["mode"] == "write" else ["-r"]) + ["--", req["image"]]
h.connect_systemd_socket_activation(argv)
size, chunk = h.get_size(), int(req.get("chunk", 1 << 20))
if req["mode"] == "hash":
    nonzero = set()
    off = 0
    while off < size:
        got = []
        def cb(ctx, o, ents, err):
            if ctx == "base:allocation":
                got.extend(ents)
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            sys.exit("no block status at %d" % off)
        for i in range(0, len(got), 2):
            length = min(got[i], size - off)
            if not got[i + 1] & 2:
                nonzero.update(range(off // chunk, (off + length - 1) // chunk + 1))
            off += length
            if off >= size:
                break
    out = []
    for i in range((size + chunk - 1) // chunk):
        o = i * chunk
        if i not in nonzero:
            out.append("0")
        else:
            out.append(hashlib.blake2b(h.pread(min(chunk, size - o), o), digest_size=16).hexdigest())
    sys.stdout.write(json.dumps({"size": size, "chunks": out}))
elif req["mode"] == "read":
    for o in req["offsets"]:
        sys.stdout.buffer.write(h.pread(min(chunk, size - o), o))
    sys.stdout.buffer.flush()
elif req["mode"] == "write":
    done = 0
    for o in req["offsets"]:
        n = min(chunk, size - o)
        data = sys.stdin.buffer.read(n)
        if len(data) != n:
            sys.exit("short data at %d: %d of %d bytes" % (o, len(data), n))
        h.pwrite(data, o)
        done += n
    h.flush()
    sys.stdout.write(json.dumps({"written": done}))
h.shutdown()
"""


@dataclass(frozen=True)
class ImageHashes:
    size: int
    chunks: tuple[str, ...]  # per chunk: a hex digest, or ZERO when it reads as zeros
    wire_bytes: int  # what crossed the network for them


def _run(shell: RemoteShell, request: dict[str, object], what: str, stdin: bytes = b"") -> bytes:
    payload = json.dumps(request).encode() + b"\n" + stdin
    result = shell.run([SYSTEM_PYTHON, "-c", _SCRIPT], stdin=payload, check=False, timeout=24 * 3600)
    if not result.ok:
        detail = [line for line in result.err.strip().splitlines() if line.strip()]
        raise RemoteCommandError(f"{what} failed (exit {result.exit_status})" + (f": {detail[-1]}" if detail else ""),
                                 hint="install python3-libnbd on the host" if result.exit_status == 4 else None)
    return result.stdout


def hash_image(shell: RemoteShell, image: str, fmt: str, what: str, chunk: int = CHUNK) -> ImageHashes:
    out = _run(shell, {"mode": "hash", "image": image, "format": fmt, "chunk": chunk}, f"hashing {what}")
    answer = json.loads(out)
    return ImageHashes(int(answer["size"]), tuple(answer["chunks"]), len(out))


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
    return hashlib.blake2b(bytes(length), digest_size=16).hexdigest()


def copy_chunks(source: RemoteShell, source_image: str, source_format: str, target: RemoteShell,
                target_image: str, target_format: str, offsets: list[int], chunk: int = CHUNK,
                batch: int = 64) -> int:
    """Copy these chunks from one host's image into another's (in batches through drtool); bytes copied."""
    copied = 0
    for start in range(0, len(offsets), batch):
        part = offsets[start:start + batch]
        data = _run(source, {"mode": "read", "image": source_image, "format": source_format, "chunk": chunk,
                             "offsets": part}, f"reading {source_image}")
        answer = json.loads(_run(target, {"mode": "write", "image": target_image, "format": target_format,
                                          "chunk": chunk, "offsets": part}, f"writing {target_image}", data))
        copied += int(answer["written"])
    return copied
