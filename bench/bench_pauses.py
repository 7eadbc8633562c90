#!/usr/bin/env python3
"""Where the user waits: checkpoint pause, planned failover RTO, resync after a short cut.

    python bench/bench_pauses.py [--rounds 3] [--json-out bench/results/pauses.json] [--plain]

One lab (site-a: the VMs, site-b: the DR host), drtool run as a user runs it
(a subprocess with --json). Each figure comes with a reference measured in the
same run, on the same lab, and their ratio (see bench/README.md):

1. checkpoint pause of an idle VM: the `quiesced_seconds` drtool reports,
   against a bare QMP stop + cont through drtool's own SSH-bridged monitor
   session (the floor of any pause). Goal: pause < 0.1 s.
2. planned failover RTO: `rto_seconds` of `drtool failover --yes`, and its
   steps, against a cold start of the same QEMU command line on the DR host up
   to QMP cont (the irreducible part of an RTO). Goal: RTO < 5 s.
3. resync after a short cut: the link is cut for 30 s (--cut-seconds), 3 MiB
   written, the jobs pause; the link comes back and `drtool resync` runs. Against `drtool resync` with
   nothing to do (its fixed cost). Goal: under 3 s plus the transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.config import load_inventory  # noqa: E402
from drtool.lab import Lab, LabVm  # noqa: E402
from drtool.mechanics.dr_vm import RunLayout, map_command_line  # noqa: E402
from drtool.transport.connections import Connections  # noqa: E402

MiB = 1 << 20
DEFAULT_JSON = REPO / "bench" / "results" / "pauses.json"
GOALS = {"checkpoint pause": 0.1, "planned failover RTO": 5.0, "resync after a short cut": 3.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drtool_json(config: Path, *args: str, timeout: float = 600) -> tuple[Any, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args, "--json"],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"drtool {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), took


def wait_jobs(vm: LabVm, *, broken: bool, timeout: float = 60) -> None:
    """Until every drtool job is paused and failed (broken) or in sync with nothing left for 0.35 s."""
    deadline, since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        jobs = [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-mirror")]
        if broken and jobs and all(j["paused"] and j["io-status"] != "ok" for j in jobs):
            return
        if not broken and jobs and all(j["ready"] and j["offset"] == j["len"] and j["io-status"] == "ok" for j in jobs):
            since = since or time.monotonic()
            if time.monotonic() - since >= 0.35:
                return
        else:
            since = None
        time.sleep(0.05)
    raise RuntimeError(f"{vm.name}: jobs not {'broken' if broken else 'in sync'} after {timeout} s")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Bench:
    def __init__(self, lab: Lab, workdir: Path, rounds: int, cut_seconds: float = 30.0) -> None:
        self.lab, self.workdir, self.rounds, self.cut_seconds = lab, workdir, rounds, cut_seconds
        self.results: dict[str, Any] = {}
        self.started_dr_vms: list[Path] = []

    def config(self, vm: LabVm, **settings: Any) -> Path:
        return self.lab.write_config(self.workdir / f"{vm.name}.toml", {vm.name: {"dr_host": "site-b", **settings}})

    def protected_vm(self, name: str, **settings: Any) -> tuple[LabVm, Path]:
        vm = self.lab.add_vm(name, "site-a", {"vd0": "64M"})
        config = self.config(vm, **settings)
        drtool_json(config, "protect", vm.name)
        vm.guest_write("vd0", 0, 4 * MiB, 0x11)
        wait_jobs(vm, broken=False)
        return vm, config

    # ------------------------------------------------------------------ 1. checkpoint pause

    def checkpoint_pause(self) -> None:
        vm, config = self.protected_vm("bench-ck", retention=["all"])
        pauses, walls, refs = [], [], []
        with Connections(load_inventory(config)) as reach:
            target = load_inventory(config).vms[vm.name]
            for i in range(self.rounds * 2):
                vm.guest_write("vd0", (8 + i) * MiB, 64 << 10, 0x20 + i)
                wait_jobs(vm, broken=False)  # idle disks: nothing left to send
                report, wall = drtool_json(config, "checkpoint", vm.name)
                [entry] = report["results"]
                pauses.append(float(entry["quiesced_seconds"]))
                walls.append(wall)
                with reach.qmp(target) as qmp:  # the same path drtool's pause takes: SSH bridge to the monitor
                    t0 = time.perf_counter()
                    qmp.execute("stop")
                    qmp.execute("cont")
                    refs.append(time.perf_counter() - t0)
        self.record("checkpoint pause", pauses, refs, "bare QMP stop + cont through drtool's SSH-bridged monitor",
                    wall=walls)

    # ------------------------------------------------------------------ 2. planned failover RTO

    def failover_rto(self) -> None:
        rtos, walls, refs, steps = [], [], [], []
        for i in range(self.rounds):
            vm, config = self.protected_vm(f"bench-fo{i}")
            report, wall = drtool_json(config, "failover", vm.name, "--yes", timeout=300)
            rtos.append(float(report["rto_seconds"]))
            walls.append(wall)
            replica_dir = self.lab.host_dir("site-b") / "replicas" / vm.name
            self.started_dr_vms.append(replica_dir / "vm" / "qemu.pid")
            manifest = json.loads((replica_dir / "manifest.json").read_text())
            steps.append(manifest["failover"].get("step_seconds", {}))
            refs.append(self.cold_start(manifest["hardware"], vm, i))
        self.record("planned failover RTO", rtos, refs, "cold start of the same QEMU command line on the DR host "
                    "to QMP cont", wall=walls, steps=steps)

    def cold_start(self, hardware: dict[str, Any], vm: LabVm, i: int) -> float:
        """The VM's own command line started on site-b on copies of its disks, paused (-S), then QMP cont."""
        layout = RunLayout(PurePosixPath(self.lab.host_dir("site-b") / f"bench-cold{i}"))
        Path(layout.run_dir).mkdir(parents=True, exist_ok=True)
        disks = {}
        for device, image in vm.disks.items():
            copy = Path(layout.run_dir) / f"{device}.qcow2"
            subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
            disks[str(image)] = str(copy)
        argv = map_command_line(hardware["argv"], disks, hardware["qmp_socket"], layout)
        t0 = time.perf_counter()
        self.lab.exec("site-b", argv, timeout=60)
        while not Path(layout.qmp_socket).exists():
            time.sleep(0.01)
        from drtool.lab.vm import qmp_execute

        qmp_execute(Path(layout.qmp_socket), "cont", None, 30)
        took = time.perf_counter() - t0
        pid = int(Path(layout.pidfile).read_text())
        os.kill(pid, signal.SIGKILL)
        return took

    # ------------------------------------------------------------------ 3. resync after a short cut

    def resync_after_cut(self) -> None:
        times, walls, refs, sent = [], [], [], []
        vm, config = self.protected_vm("bench-rs")
        for i in range(self.rounds):
            self.lab.cut_site_link("site-a", "site-b")
            cut_at = time.monotonic()
            try:
                vm.guest_write("vd0", (16 + 4 * i) * MiB, 3 * MiB, 0x40 + i)
                wait_jobs(vm, broken=True)
                # long enough for QEMU's own NBD reconnect back-off to grow (1, 2, 4, 8, 16 s)
                time.sleep(max(0.0, self.cut_seconds - (time.monotonic() - cut_at)))
            finally:
                self.lab.restore_site_link("site-a", "site-b")
            report, wall = drtool_json(config, "resync", vm.name)
            if report["action"] != "resumed":
                raise RuntimeError(f"resync after a short cut did {report['action']!r}, not 'resumed'")
            times.append(float(report["seconds"]))
            walls.append(wall)
            sent.append(int(report["bytes_sent"]))
            idle, idle_wall = drtool_json(config, "resync", vm.name)
            assert idle["action"] == "none", idle
            refs.append(idle_wall)
        self.record("resync after a short cut", walls, refs, "drtool resync with nothing to do (its fixed cost)",
                    own_seconds=times, bytes_sent=sent)

    # ------------------------------------------------------------------

    def record(self, name: str, values: list[float], refs: list[float], reference: str, **extra: Any) -> None:
        self.results[name] = {"median": median(values), "reference": reference, "reference_median": median(refs),
                              "ratio": median(values) / median(refs), "goal": GOALS[name], "values": values,
                              "reference_values": refs, **extra}
        log(f"{name}: median {median(values):.3f} s, reference {median(refs):.3f} s")

    def cleanup(self) -> None:
        for pidfile in self.started_dr_vms:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def table(results: dict[str, Any], plain: bool) -> str:
    rows = [("measure", "median", "goal", "met", "reference (median)", "ratio")]
    for name, r in results.items():
        rows.append((name, f"{r['median']:.3f} s", f"< {r['goal']:g} s", "yes" if r["median"] < r["goal"] else "NO",
                     f"{r['reference']}: {r['reference_median']:.3f} s", f"{r['ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, r in results.items():
        for step_set in r.get("steps", [])[:1]:
            lines.append(f"{name} steps (first round): " + ", ".join(f"{k} {v:.2f} s" for k, v in step_set.items()))
        if "wall" in r:
            lines.append(f"{name}: drtool wall clock median {median(r['wall']):.2f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plain", action="store_true", help="(the table is always plain text)")
    parser.add_argument("--only", choices=("checkpoint", "failover", "resync"), action="append")
    parser.add_argument("--cut-seconds", type=float, default=30.0, help="how long the link stays cut (resync)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_pauses.py needs root (the lab makes network namespaces)", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    lab = Lab(hosts=("site-a", "site-b"))
    lab.start()
    bench = Bench(lab, lab.dir / "bench-pauses", args.rounds, args.cut_seconds)
    try:
        only = set(args.only or ("checkpoint", "failover", "resync"))
        if "checkpoint" in only:
            bench.checkpoint_pause()
        if "resync" in only:
            bench.resync_after_cut()
        if "failover" in only:
            bench.failover_rto()
    finally:
        bench.cleanup()
        for problem in lab.stop():
            log(f"lab teardown: {problem}")
    print(table(bench.results, args.plain))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(bench.results, indent=2) + "\n")
    log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
