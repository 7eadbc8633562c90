#!/usr/bin/env python3
"""What protection costs a real workload: the lab guest times its own writes.

    python bench/bench_guest.py [--mib 256] [--rounds 5] [--iothread] [--json-out PATH] [--quick]

One lab, one Linux guest per setup (drtool/lab/guest.py in bench mode): unprotected,
protected async, protected sync (and, with --iothread, unprotected and async again
with the disks' I/O in an iothread). In each round every guest in turn writes --mib
MiB of zeros with dd (bs=1M, O_DIRECT, conv=fsync) at a fresh place on its disk,
timed inside the guest; the setups take turns in a rotating order, and a protected
guest's mirror is left to catch up before the next one runs. Ratios are to the
unprotected guest of the same I/O setup, in the same run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.lab import Lab, LabVm
from drtool.lab.guest import build_guest, kernel_args

DEFAULT_JSON = REPO / "bench" / "results" / "guest.json"
VCPU = "qemu CPU 0/TCG"  # the guest's vCPU thread (guests run with -name ...,debug-threads=on)
QUIET = 0.35  # as drtool's mirrors: nothing to copy for longer than their 100 ms polling


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# drtool with another mirror buffer size (an experiment: drtool itself fixes it at 32 MiB)
_WITH_BUF_SIZE = ("import sys, drtool.mechanics.replication as r; r.MIRROR_BUF_SIZE = int(sys.argv.pop(1)) << 20; "
                  "from drtool.cli.main import run; run()")


def drtool_ok(config: Path, *args: str, buf_mib: int | None = None) -> None:
    prog = [sys.executable, "-c", _WITH_BUF_SIZE, str(buf_mib)] if buf_mib else [sys.executable, "-m", "drtool"]
    proc = subprocess.run([*prog, "--config", str(config), *args], check=False, capture_output=True,
                          text=True, timeout=1800, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"drtool {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")


def wait_quiet(vm: LabVm, timeout: float = 600) -> float:
    """Seconds until the VM's drtool mirrors have had nothing to copy for QUIET s (0 if none)."""
    started = time.monotonic()
    quiet_since = None
    while True:
        jobs = [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-mirror")]
        if not jobs:
            return 0.0
        if all(j["ready"] and j["offset"] == j["len"] and j["io-status"] == "ok" for j in jobs):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET:
                return quiet_since - started
        else:
            quiet_since = None
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{vm.name}: mirrors not quiet after {timeout} s: {jobs}")
        time.sleep(0.05)


def thread_times(pid: int, prefix: str) -> dict[str, float]:
    """Per thread name of a process (threads of one name summed), from /proc/PID/task/*/schedstat:
    "<prefix> <name> cpu", seconds on a CPU, and "<prefix> <name> waiting", seconds runnable
    but waiting for a CPU (the machine's other work taking it)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            on_cpu, waiting = (int(v) / 1e9 for v in (task / "schedstat").read_text().split()[:2])
        except (OSError, ValueError):
            continue
        for key, value in ((f"{prefix} {name} cpu", on_cpu), (f"{prefix} {name} waiting", waiting)):
            out[key] = out.get(key, 0.0) + value
    return out


def cpu_of(vm: LabVm, replica_dir: Path) -> dict[str, float]:
    """CPU and run-queue seconds so far of the VM's QEMU threads and of its DR target (qemu-storage-daemon)."""
    times = thread_times(vm.pid, "qemu")
    pidfile = replica_dir / "target.pid"
    if pidfile.exists():
        target = thread_times(int(pidfile.read_text()), "target")
        for kind in ("cpu", "waiting"):
            times[f"dr target {kind}"] = sum(v for k, v in target.items() if k.endswith(kind))
    return times


def disk_of(path: Path) -> str:
    """The block device (as /proc/diskstats names it) holding path."""
    dev = os.stat(path).st_dev
    return Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name


def disk_io(device: str) -> dict[str, float]:
    """MiB written and ms spent doing I/O on a block device so far (/proc/diskstats)."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == device:
            return {"mib_written": int(fields[9]) * 512 / (1 << 20), "io_ms": int(fields[12])}
    return {}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after if after[k] - before.get(k, 0.0) >= 0.01}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB the guest writes per round (256)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iothread", action="store_true", help="also unprotected and async with an iothread")
    parser.add_argument("--plain", action="store_true", help="also async without TLS (transport plain)")
    parser.add_argument("--buf-sizes", default="", metavar="MIB,...",
                        help="also async with these mirror buffer sizes (drtool's is 32 MiB)")
    parser.add_argument("--tmpfs", action="store_true",
                        help="the lab (both sites' images) in /dev/shm: the two sites share no disk")
    parser.add_argument("--quick", action="store_true", help="1 round of 128 MiB")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.quick:
        args.mib, args.rounds = 128, 1
    setups = [("unprotected", None, False), ("async", "async", False), ("sync", "sync", False)]
    if args.plain:
        setups += [("async+plain", "async", False)]
    setups += [(f"async+buf{int(mib)}M", "async", False) for mib in args.buf_sizes.split(",") if mib.strip()]
    if args.iothread:
        setups += [("unprotected+iothread", None, True), ("async+iothread", "async", True)]
    guest = build_guest()
    results: dict[str, list[dict]] = {name: [] for name, _, _ in setups}
    root = Path(tempfile.mkdtemp(prefix="drlab-bench-", dir="/dev/shm")) / "lab" if args.tmpfs else None
    try:
        with Lab(root_dir=root, hosts=("site-a", "site-b")) as lab:
            summary = run_rounds(args, lab, guest, setups, results)
    finally:
        if root is not None:
            shutil.rmtree(root.parent, ignore_errors=True)
    print(f"\nguest dd of {args.mib} MiB (O_DIRECT, bs=1M, fsync), timed in the guest; {args.rounds} round(s); "
          + ("the lab in tmpfs" if args.tmpfs else "both sites' images on one disk"))
    print("medians; while the guest writes: its vCPU thread on a CPU and waiting for one, the other QEMU threads'\n"
          "and the DR target's CPU, the host disk's MiB written and busy time")
    print(f"{'setup':<22}{'MiB/s':>8}{'ratio':>7}{'vCPU cpu s':>12}{'vCPU wait s':>13}{'other cpu s':>13}"
          f"{'disk MiB':>10}{'disk busy s':>13}")
    for name, row in summary.items():
        print(f"{name:<22}{row['median_mib_per_s']:>8.1f}{row['ratio_to_unprotected']:>7.2f}"
              f"{row['median_vcpu_cpu_s']:>12.2f}{row['median_vcpu_waiting_s']:>13.2f}{row['median_others_cpu_s']:>13.2f}"
              f"{row['median_disk_mib_written']:>10.0f}{row['median_disk_busy_s']:>13.2f}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"mib": args.mib, "rounds": args.rounds, "kernel": guest.version,
                                         "tmpfs": args.tmpfs,
                                         "summary": summary, "rounds_raw": results}, indent=2))
    print(f"JSON: {args.json_out}")
    return 0


def run_rounds(args: argparse.Namespace, lab: Lab, guest, setups, results) -> dict:
    """Start a guest per setup, protect the protected ones, run the rounds; return the summary."""
    disk_a = f"{args.mib * args.rounds + 16}M"
    device = disk_of(lab.dir)
    vms: dict[str, LabVm] = {}
    for i, (name, mode, iothread) in enumerate(setups):
        vm = lab.add_vm(f"b{i}", "site-a", {"vd0": disk_a, "vd1": "4M"}, guest=guest, iothread=iothread,
                        guest_args=kernel_args("bench", bench_mib=args.mib))
        vm.console.wait_for("BENCH ready", lambda vm=vm: "BENCH ready" in vm.console.lines(), timeout=120)
        vms[name] = vm
        if mode:
            settings = {"dr_host": "site-b", "mode": mode} | ({"transport": "plain"} if "plain" in name else {})
            config = lab.write_config(lab.dir / f"{vm.name}.toml", {vm.name: settings})
            log(f"protecting {name} ({vm.name})")
            buf = re.search(r"\+buf(\d+)M", name)
            drtool_ok(config, "protect", vm.name, buf_mib=int(buf.group(1)) if buf else None)
            wait_quiet(vm)
    for round_no in range(1, args.rounds + 1):
        order = setups[round_no - 1:] + setups[:round_no - 1]
        for name, mode, _ in order:
            vm = vms[name]
            replicas = lab.replica_dir(vm.name)
            cpu_before, io_before = cpu_of(vm, replicas), disk_io(device)
            vm.guest_write("vd1", 0, 512, round_no)  # the guest's go signal for this round
            vm.console.wait_for(f"BENCH round {round_no}", lambda vm=vm, n=round_no: n in vm.console.bench_results(),
                                timeout=1800, poll=0.2)
            mib, seconds = vm.console.bench_results()[round_no]
            cpu_written = cpu_delta(cpu_before, cpu_of(vm, replicas))
            io_written = cpu_delta(io_before, disk_io(device))
            caught_up = wait_quiet(vm) if mode else 0.0
            results[name].append({"round": round_no, "mib": mib, "seconds": seconds,
                                  "mib_per_s": round(mib / seconds, 2) if seconds else None,
                                  "caught_up_after_s": round(caught_up, 2),
                                  "threads_s_while_writing": cpu_written,
                                  "threads_s_to_caught_up": cpu_delta(cpu_before, cpu_of(vm, replicas)),
                                  "disk_while_writing": io_written,
                                  "loadavg_1min": os.getloadavg()[0]})
            log(f"round {round_no} {name}: {mib} MiB in {seconds:.2f} s (guest clock); "
                f"mirror caught up {caught_up:.2f} s later; while writing, s {cpu_written}; "
                f"disk while writing {io_written}")
    summary = {}
    for name, _, iothread in setups:
        rows = results[name]
        rate = statistics.median(r["mib_per_s"] for r in rows)
        base = statistics.median(r["mib_per_s"] for r in results["unprotected+iothread" if iothread else "unprotected"])
        summary[name] = {
            "median_mib_per_s": rate, "ratio_to_unprotected": round(rate / base, 2),
            "median_disk_mib_written": statistics.median(r["disk_while_writing"].get("mib_written", 0) for r in rows),
            "median_disk_busy_s": statistics.median(r["disk_while_writing"].get("io_ms", 0) for r in rows) / 1000,
            "median_vcpu_cpu_s": statistics.median(r["threads_s_while_writing"].get(VCPU + " cpu", 0) for r in rows),
            "median_vcpu_waiting_s": statistics.median(r["threads_s_while_writing"].get(VCPU + " waiting", 0)
                                                       for r in rows),
            "median_others_cpu_s": statistics.median(
                sum(v for k, v in r["threads_s_while_writing"].items() if k.endswith(" cpu") and VCPU not in k)
                for r in rows),
        }  # fmt: skip
    return summary


if __name__ == "__main__":
    sys.exit(main())
