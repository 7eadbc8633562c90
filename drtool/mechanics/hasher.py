"""The chunk hasher drtool runs on a host: each side hashes its own disk, only digests travel.

Like the QMP relay (transport/bridge.py), it is the host's python3 given a
script with `-c`; its request (JSON) comes on stdin, never through a shell.
It reads disks over NBD with libnbd (Debian/Ubuntu: python3-libnbd, Fedora/RHEL:
python3-libnbd), the NBD client library of the libguestfs project:

- a live disk through an NBD export of its own QEMU, on a UNIX socket;
- a frozen image (a point) through `qemu-nbd -r`, started by libnbd itself.

Ranges NBD block status reports as reading zeros (unallocated, or zero
clusters) are not read: the chunk is reported as "0", and drtool compares it
with the digest of zeros. Digests are BLAKE2b (hashlib, in every python3):
16 bytes, faster than SHA-256 in software and collision resistant.

Modes (the request's "mode"):
  hash   {"source", "chunk", "offsets": [..] | null}  -> {"size", "chunks": {offset: hex | "0"}, "read"}
  dirty  {"source", "bitmap"}                           -> {"extents": [[offset, length], ...]}
  copy   {"source", "target", "ranges": [[o, l], ..]}   -> {"copied"}
A source/target is {"unix": PATH, "export": NAME}, {"tcp": HOST, "port": N, "export": NAME}
or {"image": PATH, "format": FMT}, each with optional "tls_psk_file" and "tls_username".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from drtool.errors import RemoteCommandError
from drtool.transport.connections import RemoteShell

DEFAULT_CHUNK = 1 << 20
ZERO = "0"
DIGEST_SIZE = 16

HASHER_SCRIPT = r"""
import hashlib, json, sys, threading, time
from queue import Queue
try:
    import nbd
except ImportError:
    sys.stderr.write("python3 cannot import nbd: install python3-libnbd\n")
    sys.exit(4)

STATE_ZERO = 2
IN_FLIGHT = 8

def connect(spec, contexts=("base:allocation",), writable=False):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if spec.get("tls_psk_file"):
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(spec["tls_psk_file"])
        h.set_tls_username(spec.get("tls_username", "drtool"))
    if "unix" in spec:
        h.set_export_name(spec.get("export", ""))
        h.connect_unix(spec["unix"])
    elif "tcp" in spec:
        h.set_export_name(spec.get("export", ""))
        h.connect_tcp(spec["tcp"], str(spec["port"]))
    else:
        h.connect_systemd_socket_activation(
            ["qemu-nbd", "-r", "-f", spec.get("format", "qcow2"), "--", spec["image"]])
    return h

def extents(h, context, size):
    # [(offset, length, flags)] of the whole disk, as NBD block status reports it
    found = []
    offset = 0
    while offset < size:
        got = []
        def cb(ctx, off, ents, err):
            if ctx == context:
                got.extend(ents)
            return 0
        h.block_status(min(size - offset, 1 << 30), offset, cb)
        if not got:
            raise SystemExit("no block status for %s at %d" % (context, offset))
        for i in range(0, len(got), 2):
            length = min(got[i], size - offset)
            found.append((offset, length, got[i + 1]))
            offset += length
            if offset >= size:
                break
    return found

def zero_chunks(ext, chunk, size):
    # chunks that read as zeros in full, per block status
    nonzero = set()
    for off, length, flags in ext:
        if not flags & STATE_ZERO:
            first, last = off // chunk, (off + length - 1) // chunk
            nonzero.update(range(first, last + 1))
    return {i * chunk for i in range((size + chunk - 1) // chunk) if i not in nonzero}

def do_hash(req):
    h = connect(req["source"])
    size, chunk = h.get_size(), int(req["chunk"])
    zeros = zero_chunks(extents(h, "base:allocation", size), chunk, size)
    offsets = req.get("offsets")
    if offsets is None:
        offsets = range(0, size, chunk)
    todo = [o for o in offsets if o < size]
    out, read = {}, 0
    for o in todo:
        if o in zeros:
            out[str(o)] = "0"
    queue = [o for o in todo if o not in zeros]
    # a reader thread keeps the disk busy while this one hashes (both release the GIL)
    chunks = Queue(IN_FLIGHT)
    def reader():
        try:
            for o in queue:
                chunks.put((o, h.pread(min(chunk, size - o), o)))
        except Exception as e:
            chunks.put(e)
        chunks.put(None)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while True:
        item = chunks.get()
        if item is None:
            break
        if isinstance(item, Exception):
            raise item
        o, data = item
        read += len(data)
        out[str(o)] = hashlib.blake2b(data, digest_size=16).hexdigest()
    thread.join()
    h.shutdown()
    return {"size": size, "chunks": out, "read": read}

def do_dirty(req):
    context = "qemu:dirty-bitmap:" + req["bitmap"]
    h = connect(req["source"], (context,))
    size = h.get_size()
    # qemu reports a dirty range with flag 1
    found = [[o, l] for o, l, f in extents(h, context, size) if f & 1]
    h.shutdown()
    return {"extents": found}

def do_copy(req):
    src = connect(req["source"], ())
    dst = connect(req["target"], ())
    copied = 0
    for off, length in req["ranges"]:
        data = src.pread(length, off)
        dst.pwrite(data, off)
        copied += len(data)
    dst.flush()
    src.shutdown()
    dst.shutdown()
    return {"copied": copied}

req = json.loads(sys.stdin.buffer.read())
started = time.monotonic()
try:
    result = {"hash": do_hash, "dirty": do_dirty, "copy": do_copy}[req["mode"]](req)
except nbd.Error as e:
    sys.stderr.write("nbd: %s\n" % e)
    sys.exit(5)
result["seconds"] = time.monotonic() - started
sys.stdout.write(json.dumps(result))
"""


# The distribution's python3, where python3-libnbd installs its module (a python3
# found earlier in PATH, pyenv's or a venv's, would not have it).
SYSTEM_PYTHON = "/usr/bin/python3"


def hasher_argv() -> list[str]:
    return [SYSTEM_PYTHON, "-c", HASHER_SCRIPT]


def live_disk(socket_path: str, export: str) -> dict[str, Any]:
    return {"unix": socket_path, "export": export}


def image_file(path: str, fmt: str = "qcow2") -> dict[str, Any]:
    return {"image": path, "format": fmt}


@dataclass(frozen=True)
class ChunkHashes:
    size: int
    chunks: dict[int, str]  # offset -> hex digest, or ZERO when block status says it reads zeros
    bytes_read: int
    seconds: float
    wire_bytes: int = 0  # the request and answer's size: what crossed the network for these digests


def run_hasher(shell: RemoteShell, request: dict[str, Any], what: str, timeout: float = 24 * 3600) -> dict[str, Any]:
    """Run the hasher on a host with this request; its JSON answer."""
    result = shell.run(hasher_argv(), stdin=json.dumps(request).encode(), check=False, timeout=timeout)
    if not result.ok:
        detail = result.err.strip().splitlines()
        hint = "install python3-libnbd on the host (drtool hosts check)" if result.exit_status == 4 else None
        raise RemoteCommandError(f"hashing {what} failed (exit {result.exit_status})"
                                 + (f": {detail[-1]}" if detail else ""), hint=hint)
    try:
        answer: dict[str, Any] = json.loads(result.out)
    except ValueError as err:
        raise RemoteCommandError(f"hashing {what}: unreadable answer: {err}") from err
    answer["wire_bytes"] = len(result.stdout) + len(json.dumps(request))
    return answer


def hash_chunks(shell: RemoteShell, source: dict[str, Any], chunk: int, offsets: list[int] | None,
                what: str) -> ChunkHashes:
    answer = run_hasher(shell, {"mode": "hash", "source": source, "chunk": chunk, "offsets": offsets}, what)
    return ChunkHashes(int(answer["size"]), {int(k): str(v) for k, v in answer["chunks"].items()},
                       int(answer["read"]), float(answer["seconds"]), int(answer["wire_bytes"]))


def dirty_extents(shell: RemoteShell, source: dict[str, Any], bitmap: str, what: str) -> list[tuple[int, int]]:
    answer = run_hasher(shell, {"mode": "dirty", "source": source, "bitmap": bitmap}, what, timeout=600)
    return [(int(o), int(n)) for o, n in answer["extents"]]


def copy_ranges(shell: RemoteShell, source: dict[str, Any], target: dict[str, Any],
                ranges: list[tuple[int, int]], what: str) -> int:
    answer = run_hasher(shell, {"mode": "copy", "source": source, "target": target,
                                "ranges": [list(r) for r in ranges]}, what, timeout=3600)
    return int(answer["copied"])
