#!/usr/bin/env python3
"""What coming home costs: reprotect beside a full copy, restore beside qemu-img convert.

    python bench/bench_recover.py [--size-mib 2048] [--changed 1,10,50] [--json-out bench/results/recover.json]

One lab (site-a: the VM, site-b: the DR host), drtool run as a user runs it
(a subprocess with --json). For each share of the disk changed:

1. a VM with a full disk (written through its device) is protected: the
   initial sync is the full-copy reference (its bytes: the disk's allocation,
   its time: `protect`'s seconds over the same NBD/TLS path);
2. planned failover; the DR copy writes the share (through its device);
3. `drtool recover --reprotect`: bytes sent (mirror + rewind) against the bytes
   changed (goal within 1.1x) and against the full copy, time against the full
   copy's.

Then `drtool recover --restore --to site-a:...` of the final point against
`qemu-img convert -O qcow2` of the same point into the same directory, run on
site-a (it reads the point from the lab's shared filesystem: no network, a
generous reference). Goal: restore rate at least 0.9x of convert's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.lab import Lab
from drtool.lab.vm import qmp_execute

MiB = 1 << 20
DEFAULT_JSON = REPO / "bench" / "results" / "recover.json"
WRITE_STEP = 64 * MiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drtool_json(config: Path, *args: str, timeout: float = 1800) -> tuple[Any, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args, "--json"],
                          check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"drtool {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), took


def device_write(socket: Path, offset: int, length: int, pattern: int) -> None:
    """Writes through the VM's device (HMP qemu-io on its backend), in WRITE_STEP pieces."""
    done = 0
    while done < length:
        n = min(WRITE_STEP, length - done)
        command = f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x{pattern:02x} {offset + done} {n}"'
        reply = qmp_execute(socket, "human-monitor-command", {"command-line": command}, 300)
        if str(reply).strip():
            raise RuntimeError(f"write failed: {reply}")
        done += n


def kill_pidfile(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


def one_share(lab: Lab, size: int, percent: int, workdir: Path) -> dict[str, Any]:
    name = f"br{percent}"
    vm = lab.add_vm(name, "site-a", {"vd0": f"{size // MiB}M"})
    config = lab.write_config(workdir / f"{name}.toml", {name: {"dr_host": "site-b"}})
    replica_dir = lab.replica_dir(name)
    try:
        device_write(vm.lab_qmp_socket, 0, size, 0x11)  # a full disk: the full copy sends all of it
        protected, _ = drtool_json(config, "protect", name)
        full_bytes, full_seconds = int(protected["bytes_in_use"]), float(protected["seconds"])
        drtool_json(config, "failover", name, "--yes")
        changed = size * percent // 100
        device_write(replica_dir / "vm" / "drtool.qmp", 0, changed, 0x22)
        result, wall = drtool_json(config, "recover", name, "--reprotect")
        sent = int(result["sent_bytes"]) + int(result["rewound_bytes"])
        row: dict[str, Any] = {
            "changed_percent": percent, "disk_bytes": size, "changed_bytes": changed,
            "reprotect_sent_bytes": sent, "reprotect_seconds": round(float(result["seconds"]), 2),
            "reprotect_wall_seconds": round(wall, 2), "digest_bytes": int(result["hashed_bytes"]),
            "full_copy_bytes": full_bytes, "full_copy_seconds": round(full_seconds, 2),
            "sent_vs_changed": round(sent / changed, 3) if changed else None,
            "sent_vs_full": round(sent / full_bytes, 3),
            "time_vs_full": round(float(result["seconds"]) / full_seconds, 3),
            "reprotect_step_seconds": result["step_seconds"],
        }
        if percent == 10:
            row |= restore_vs_convert(lab, config, name, replica_dir, workdir)
        return row
    finally:
        kill_pidfile(replica_dir / "vm" / "qemu.pid")
        kill_pidfile(lab.host_dir("site-a") / "drtool" / name / "reverse" / "target.pid")
        kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{name}.link.pid")
        kill_pidfile(replica_dir / "target.pid")
        vm.kill()


def restore_vs_convert(lab: Lab, config: Path, name: str, replica_dir: Path, workdir: Path) -> dict[str, Any]:
    manifest = json.loads((replica_dir / "manifest.json").read_text())
    point = manifest["points"][-1]
    target = lab.host_dir("site-a") / f"{name}-restored.qcow2"
    reference = lab.host_dir("site-a") / f"{name}-converted.qcow2"
    result, _ = drtool_json(config, "recover", name, "--restore", "--point", point["id"], "--to",
                            f"site-a:{target}", "--overwrite")
    disk = result["disks"][0]
    t0 = time.perf_counter()
    lab.exec("site-a", ["qemu-img", "convert", "-U", "-O", "qcow2", point["images"]["vd0"], str(reference)],
             timeout=1800)
    convert_seconds = time.perf_counter() - t0
    restore_rate = disk["virtual_size"] / disk["seconds"]
    convert_rate = disk["virtual_size"] / convert_seconds
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
        reference.unlink()
    return {"restore_seconds": disk["seconds"], "restore_sent_bytes": disk["sent_bytes"],
            "convert_seconds": round(convert_seconds, 2),
            "restore_vs_convert_rate": round(restore_rate / convert_rate, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--changed", default="1,10,50", help="percent of the disk the DR copy changes")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    rows = []
    with Lab(hosts=("site-a", "site-b")) as lab:
        workdir = lab.dir / "bench-recover"
        workdir.mkdir(parents=True, exist_ok=True)
        for percent in (int(p) for p in args.changed.split(",")):
            log(f"{percent}% of {args.size_mib} MiB changed")
            rows.append(one_share(lab, args.size_mib * MiB, percent, workdir))
            log(json.dumps(rows[-1]))
    print(f"{'changed':>8} {'sent MiB':>9} {'x changed':>9} {'x full':>7} {'reprotect s':>11} {'full s':>7} "
          f"{'x time':>7} {'restore/convert':>15}")
    for r in rows:
        ratio = r.get("restore_vs_convert_rate")
        print(f"{r['changed_percent']:>7}% {r['reprotect_sent_bytes'] / MiB:>9.1f} {r['sent_vs_changed'] or 0:>9.3f} "
              f"{r['sent_vs_full']:>7.3f} {r['reprotect_seconds']:>11.2f} {r['full_copy_seconds']:>7.2f} "
              f"{r['time_vs_full']:>7.3f} {ratio if ratio is not None else '-':>15}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size_mib": args.size_mib, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
