#!/usr/bin/env python3
"""Live against cold planned failover: how long the guest is gone, and how long the move takes.

    python bench/bench_live.py [--rounds 3] [--reference REV | --no-reference] [--json-out PATH]

One lab; in each round lab guests writing numbered records (drtool/lab/guest.py),
protected to site-b, one failed over with `drtool failover --live`, one with the
planned (cold) `drtool failover`, and one with `failover --live` of a reference
drtool (`git archive REV`, default main; every command of that guest runs it), the
kinds taking turns going first. For each:
- downtime: live, the source's STOP event to the destination's RESUME event (drtool's
  report); cold, the failover command's start to the DR VM running (its RTO), which
  does not yet count the guest's boot;
- service gap: host time from the last record the guest acknowledged at the source to
  the first one at the DR site (a cold guest boots and verifies its disks first);
- total move: live, destination started to running; cold, the failover command.
Ratios are live to cold, and live to the reference's live, in the same run. The issue's
goal: live downtime under 0.2 s and total move under 2 s on the lab. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.lab import Lab  # noqa: E402
from drtool.lab.guest import GuestConsole, GuestImage, build_guest, kernel_args  # noqa: E402

DEFAULT_JSON = REPO / "bench" / "results" / "live.json"
DISKS = {"vd0": "4M", "vd1": "4M"}
DOWNTIME_GOAL, MOVE_GOAL = 0.2, 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drtool(config: Path, *args: str, tree: Path = REPO) -> dict:
    """drtool from a source tree (this one, or the reference's) as a subprocess; its JSON."""
    proc = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args, "--json"], check=False,
                          capture_output=True, text=True, timeout=1800, cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if proc.returncode != 0:
        raise RuntimeError(f"drtool {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


class AckWatch:
    """Host times at which ACK lines appear on a console (polled every 5 ms in a thread)."""

    def __init__(self, console: GuestConsole) -> None:
        self.console, self._stop = console, threading.Event()
        self.seen: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            now = time.time()
            for ack in self.console.acks():
                self.seen.setdefault(ack.n, now)

    def stop(self) -> dict[int, float]:
        self._stop.set()
        self._thread.join()
        return self.seen


def load() -> float:
    return os.getloadavg()[0]


def one_move(lab: Lab, guest: GuestImage, name: str, kind: str, reference: Path | None) -> dict:
    live = kind != "cold"
    tree = reference if kind == "live-ref" and reference is not None else REPO
    vm = lab.add_vm(name, "site-a", DISKS, guest=guest, guest_args=kernel_args("write", interval_ms=20))
    try:
        vm.console.wait_acks(1, timeout=120)
        config = lab.write_config(lab.dir / f"{name}.toml", {name: {"dr_host": "site-b"}})
        drtool(config, "protect", name, tree=tree)
        vm.console.wait_acks(len(vm.console.acks()) + 20, timeout=120)
        source_watch = AckWatch(vm.console)
        dr_console = lab.dr_console(name)
        dr_watch = AckWatch(dr_console)
        load_before = load()
        said = drtool(config, "failover", name, "--yes", *(["--live"] if live else []), tree=tree)
        dr_console.wait_acks(3, timeout=180)
        at_source, at_dr = source_watch.stop(), dr_watch.stop()
        last = max(at_source)
        first = min(at_dr)
        gap = at_dr[first] - at_source[last]
        row = {"kind": kind, "command_seconds": said["rto_seconds"], "load": round(load_before, 2),
               "service_gap_seconds": round(gap, 3), "records_lost": max(0, last + 1 - first)}
        if live:
            manifest = json.loads((lab.replica_dir(name) / "manifest.json").read_text())
            row["phases"] = manifest["failover"]["migration"].get("phases")  # where the move's time went
            row |= {"downtime_seconds": said["live"]["downtime_seconds"],
                    "move_seconds": said["live"]["move_seconds"], "ram_bytes": said["live"]["ram_bytes"],
                    "qemu_downtime_seconds": said["live"]["qemu_downtime_seconds"]}
        else:
            row |= {"downtime_seconds": said["rto_seconds"], "move_seconds": said["rto_seconds"]}
        log(f"{name}: {row}")
        return row
    finally:
        pidfile = lab.replica_dir(name) / "vm" / "qemu.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        vm.kill()


def export(rev: str, into: Path) -> str:
    """The tree of a git revision of this repository, unpacked into `into`; its commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", default="main", help="git revision whose live failover is the reference")
    parser.add_argument("--no-reference", action="store_true", help="live and cold only")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    guest = build_guest()
    rows: list[dict] = []
    kinds = ("live", "cold") if args.no_reference else ("live", "live-ref", "cold")
    names = {"live": "lv", "live-ref": "lr", "cold": "cd"}
    with tempfile.TemporaryDirectory(prefix="drtool-ref-") as scratch, Lab(hosts=("site-a", "site-b")) as lab:
        reference = None if args.no_reference else Path(scratch)
        commit = None if reference is None else export(args.reference, reference)
        for i in range(args.rounds):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]  # take turns going first
            for kind in order:
                rows.append(one_move(lab, guest, f"{names[kind]}{i}", kind, reference))
    summary = {}
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        summary[kind] = {key: round(statistics.median(r[key] for r in mine), 3)
                         for key in ("downtime_seconds", "service_gap_seconds", "move_seconds", "command_seconds")}
        summary[kind]["records_lost"] = sum(r["records_lost"] for r in mine)
        summary[kind]["load"] = [r["load"] for r in mine]
    live, cold = summary["live"], summary["cold"]
    keys = ("downtime_seconds", "service_gap_seconds", "move_seconds")
    ratios = {key: round(live[key] / cold[key], 3) for key in keys if cold[key]}
    to_reference = {key: round(live[key] / summary["live-ref"][key], 3) for key in (*keys, "command_seconds")
                    if "live-ref" in summary and summary["live-ref"][key]}
    goals = {"downtime_under_0.2s": live["downtime_seconds"] < DOWNTIME_GOAL,
             "move_under_2s": live["move_seconds"] < MOVE_GOAL}
    print(f"\nlive vs cold planned failover, {args.rounds} round(s) each, medians (s)"
          + (f"; live-ref: failover --live of {args.reference} ({commit[:10]})" if commit else ""))
    print(f"{'kind':<9}{'downtime':>10}{'service gap':>13}{'total move':>12}{'command':>9}{'lost':>6}")
    for kind, row in summary.items():
        print(f"{kind:<9}{row['downtime_seconds']:>10.3f}{row['service_gap_seconds']:>13.3f}"
              f"{row['move_seconds']:>12.3f}{row['command_seconds']:>9.2f}{row['records_lost']:>6}")
    print("live/cold " + ", ".join(f"{k.removesuffix('_seconds')} {v:.3f}" for k, v in ratios.items()))
    if to_reference:
        print("live/live-ref " + ", ".join(f"{k.removesuffix('_seconds')} {v:.3f}" for k, v in to_reference.items()))
    print("load (1-min average before each command): " + "; ".join(
        f"{kind} {', '.join(f'{x:.1f}' for x in row['load'])}" for kind, row in summary.items()))
    print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"rounds": args.rounds, "reference": args.reference, "reference_commit": commit,
                                         "summary": summary, "ratios_live_to_cold": ratios,
                                         "ratios_live_to_reference": to_reference, "goals": goals, "rows": rows},
                                        indent=2))
    print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
