#!/usr/bin/env python3
"""Benchmark of `drtool check` against its own two-site lab.

    python bench/bench_check.py [--size 2G] [--data 1G] [--rounds 3] [--json-out bench/results/check.json]

One VM on site-a with a qcow2 disk of --size holding --data bytes (written
before QEMU opens it), protected to site-b. Each round, alternating order:

1. `drtool check VM --json` (wall clock and its own seconds), and the bytes the
   kernel counted on every link of both hosts during it (an upper bound of what
   crossed the network: both ends of each link, both directions);
2. the plain read: `qemu-img convert -U` of the same source image on its host
   into QEMU's null-co driver (QEMU's /dev/null: -O raw /dev/null is refused
   for its size), from the page cache and with O_DIRECT (-T none);
3. `qemu-img compare` of the source image with the replica over NBD (the DR
   target's export, through drtool's link relay and TLS key), run on the
   source host: what comparing costs without drtool (the replica crosses the
   network).

It prints a table and writes JSON (every round's numbers). Goals: check rate
>= 0.9 x the plain read rate; network < 1% of the disk. Needs root (the lab).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.lab import Lab  # noqa: E402
from drtool.units import parse_size  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
DEFAULT_JSON = REPO / "bench" / "results" / "check.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drtool(config: Path, *args: str, timeout: float = 3600) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO)
    return proc, time.perf_counter() - t0


def network_bytes(lab: Lab) -> int:
    total = 0
    for host in ("site-a", "site-b"):
        for link in json.loads(lab.exec(host, ["ip", "-s", "-j", "link"]).stdout):
            if link["ifname"] != "lo":
                total += link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
    return total


def timed(lab: Lab, host: str, argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = lab.exec(host, argv, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(hosts=("site-a", "site-b"))
    lab.start()
    rounds: list[dict[str, Any]] = []
    try:
        vm = lab.add_vm("bchk", "site-a", {"vd0": str(args.size)}, start=False)
        vm.stop()  # the image is seeded while no QEMU has it open
        image = vm.disks["vd0"]
        cmds: list[str] = []
        for off in range(0, args.data, 64 * MiB):
            cmds += ["-c", f"write -q -P 0x{0x30 + off // (64 * MiB) % 200:02x} {off} {min(64 * MiB, args.data - off)}"]
        subprocess.run(["qemu-io", "-f", "qcow2", str(image), *cmds], check=True, capture_output=True, timeout=3600)
        vm.relaunch(start=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-check-"))
        config = lab.write_config(workdir / "drtool.toml", {vm.name: {"dr_host": "site-b", "retention": ["all"]}})
        log(f"protecting {vm.name} ({args.size // MiB} MiB, {args.data // MiB} MiB of data)")
        proc, _ = drtool(config, "protect", vm.name)
        if proc.returncode != 0:
            raise RuntimeError(f"protect failed: {proc.stderr}")
        manifest = json.loads((lab.host_dir("site-b") / "replicas" / vm.name / "manifest.json").read_text())
        export = manifest["disks"][0]["export"]
        src_dir = lab.host_dir("site-a") / "drtool" / vm.name
        link = next(src_dir.glob("*.nbd.sock"))
        for r in range(args.rounds):
            order = ("check", "read", "read_direct", "compare") if r % 2 == 0 else ("compare", "read_direct", "read",
                                                                                  "check")
            row: dict[str, Any] = {}
            for what in order:
                log(f"round {r + 1}: {what}")
                if what == "check":
                    before = network_bytes(lab)
                    proc, wall = drtool(config, "check", vm.name, "--json")
                    if proc.returncode != 0:
                        raise RuntimeError(f"check exited {proc.returncode}: {proc.stderr}")
                    result = json.loads(proc.stdout)["vms"][0]
                    row["check_wall_s"] = wall
                    row["check_own_s"] = result["seconds"]
                    row["check_compare_s"] = result["disks"][0]["seconds"]
                    row["check_network_bytes"] = network_bytes(lab) - before
                    row["check_digest_bytes"] = result["disks"][0]["wire_bytes"]
                    row["check_compared_bytes"] = result["disks"][0]["compared_bytes"]
                    row["check_rounds"] = result["rounds"]
                    row["check_source_hash_s"] = result["disks"][0]["source_hash_seconds"]
                    row["check_replica_hash_s"] = result["disks"][0]["replica_hash_seconds"]
                elif what in ("read", "read_direct"):
                    cache = ["-T", "none"] if what == "read_direct" else []
                    row[f"{what}_s"] = timed(lab, "site-a", ["qemu-img", "convert", "-n", "-U", *cache, "-f", "qcow2",
                                                             str(image), "--target-image-opts",
                                                             f"driver=null-co,size={args.size}"])
                else:
                    before = network_bytes(lab)
                    nbd = (f"driver=nbd,server.type=unix,server.path={link},export={export},tls-creds=tls0")
                    row["compare_s"] = timed(lab, "site-a", [
                        "qemu-img", "compare", "-U",
                        "--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={src_dir / 'tls'},username=drtool",
                        "--image-opts", f"driver=qcow2,file.driver=file,file.filename={image}", nbd])
                    row["compare_network_bytes"] = network_bytes(lab) - before
            rounds.append(row)
        drtool(config, "unprotect", vm.name, "--delete-replicas")
    finally:
        problems = lab.stop()
        if problems:
            log("lab teardown: " + "; ".join(problems))

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    data = args.data
    summary = {
        "check_rate_own": data / med("check_own_s"),
        "check_rate_compare_phase": data / med("check_compare_s"),
        "check_rate_wall": data / med("check_wall_s"),
        "read_rate": data / med("read_s"),
        "read_direct_rate": data / med("read_direct_s"),
        "compare_rate": data / med("compare_s"),
        "network_fraction_of_disk": med("check_network_bytes") / args.size,
        "compare_network_fraction_of_disk": med("compare_network_bytes") / args.size,
    }
    summary["ratio_check_own_to_read"] = summary["check_rate_own"] / summary["read_rate"]
    summary["ratio_check_compare_phase_to_read"] = summary["check_rate_compare_phase"] / summary["read_rate"]
    summary["ratio_check_own_to_read_direct"] = summary["check_rate_own"] / summary["read_direct_rate"]
    summary["ratio_check_own_to_compare"] = summary["check_rate_own"] / summary["compare_rate"]
    return {"environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "qemu": subprocess.run(["qemu-img", "--version"], capture_output=True,
                                                   text=True).stdout.splitlines()[:1]},
            "size": args.size, "data": data, "rounds": rounds, "summary": summary}


def med_of(res: dict[str, Any], key: str) -> float:
    return float(statistics.median(r[key] for r in res["rounds"]))


def print_table(res: dict[str, Any]) -> None:
    s, data = res["summary"], res["data"]
    rows = [
        ("drtool check, its own time", f"{data / s['check_rate_own']:.2f} s", f"{s['check_rate_own'] / MiB:.0f} MiB/s"),
        ("  of which comparing (rounds)", f"{data / s['check_rate_compare_phase']:.2f} s",
         f"{s['check_rate_compare_phase'] / MiB:.0f} MiB/s"),
        ("  source host's hasher (live disk via QEMU's NBD export)", f"{med_of(res, 'check_source_hash_s'):.2f} s",
         f"{data / med_of(res, 'check_source_hash_s') / MiB:.0f} MiB/s"),
        ("  DR host's hasher (the point via qemu-nbd)", f"{med_of(res, 'check_replica_hash_s'):.2f} s",
         f"{data / med_of(res, 'check_replica_hash_s') / MiB:.0f} MiB/s"),
        ("drtool check, wall clock", f"{data / s['check_rate_wall']:.2f} s", f"{s['check_rate_wall'] / MiB:.0f} MiB/s"),
        ("plain read (qemu-img convert -> null-co)", f"{data / s['read_rate']:.2f} s", f"{s['read_rate'] / MiB:.0f} MiB/s"),
        ("plain read, O_DIRECT (-T none)", f"{data / s['read_direct_rate']:.2f} s",
         f"{s['read_direct_rate'] / MiB:.0f} MiB/s"),
        ("qemu-img compare over NBD", f"{data / s['compare_rate']:.2f} s", f"{s['compare_rate'] / MiB:.0f} MiB/s"),
        ("ratio check / plain read (goal >= 0.9)", f"{s['ratio_check_own_to_read']:.2f}",
         f"comparing phase alone: {s['ratio_check_compare_phase_to_read']:.2f}; "
         f"vs the O_DIRECT read: {s['ratio_check_own_to_read_direct']:.2f}"),
        ("ratio check / qemu-img compare", f"{s['ratio_check_own_to_compare']:.2f}", "> 1: check is faster"),
        ("network during check (goal < 1%)", f"{100 * s['network_fraction_of_disk']:.3f} % of the disk",
         f"qemu-img compare: {100 * s['compare_network_fraction_of_disk']:.1f} %"),
    ]
    print(f"drtool check benchmark: {res['size'] // MiB} MiB disk, {data // MiB} MiB of data, "
          f"{len(res['rounds'])} round(s), medians; {res['environment']['cpus']} CPUs")
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 * GiB)
    ap.add_argument("--data", type=parse_size, default=GiB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root: the lab creates network namespaces")
    res = run(args)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
