"""Where a planned failover's RTO goes: one failover run in-process with every SSH command, QMP session,
QMP command and recorded step timed, printed as a timeline and summed by kind.

    python bench/failover_timeline.py [--rounds 1] [--live] [--json-out bench/results/failover_timeline.json]

Root, like the lab tests: it starts its own lab (site-a: the VM, site-b: the DR host), protects a VM with
one 64 MiB disk, waits for it to be in sync and fails it over with drtool's own service (the CLI's
interpreter start-up is not in an RTO anyway). With --live: the lab's Linux guest writing records (as
bench_live.py runs it), moved with `failover --live`; the timeline adds the move's phases drtool records
(from the destination's start). It measures, it does not judge: bench_pauses.py has the RTO figure,
bench_live.py the live move's, each with its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_pauses import Bench, drtool_json, log  # noqa: E402
from drtool.config import load_inventory  # noqa: E402
from drtool.lab import Lab  # noqa: E402
from drtool.lab.guest import build_guest, kernel_args  # noqa: E402
from drtool.mechanics import dr_vm, hardware, remote  # noqa: E402
from drtool.mechanics.points import load_settled_manifest  # noqa: E402
from drtool.services import failover  # noqa: E402
from drtool.services.failover.live import LiveFailover, live_failover  # noqa: E402
from drtool.services.failover.steps import FailoverSteps  # noqa: E402
from drtool.transport import bridge  # noqa: E402
from drtool.transport.connections import Connections  # noqa: E402
from drtool.transport.qmp import QmpSession  # noqa: E402
from drtool.transport.ssh import SshConnection  # noqa: E402

DEFAULT_JSON = REPO / "bench" / "results" / "failover_timeline.json"
LIVE_JSON = REPO / "bench" / "results" / "live_timeline.json"
LIVE_DISKS = {"vd0": "4M", "vd1": "4M"}  # bench_live.py's guest
SCRIPTS = {remote._WRITE_SCRIPT: "write file", remote._RUNNING_PID_SCRIPT: "is it running",
           remote._STOP_SCRIPT: "stop process", dr_vm._START_SCRIPT: "start QEMU",
           hardware._FIND_QEMU: "find the source QEMU", bridge.RELAY_SCRIPT: "QMP relay"}


def label(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in SCRIPTS:
            return SCRIPTS[arg]
        if i > 3:
            break
    if list(argv[:2]) == ["sh", "-c"] and str(argv[2]).startswith("if [ -e"):
        return "read file"
    return " ".join(str(a) for a in argv[:2])[:40]


class Timeline:
    """Wraps drtool's transports in place; every call becomes (start, seconds, kind, what, thread, depth)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self._depth = threading.local()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: type, name: str, kind: str, what: Callable[..., str]) -> None:
        original = getattr(owner, name)
        timeline = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(timeline._depth, "n", 0)
            timeline._depth.n = depth + 1
            start = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                timeline._depth.n = depth
                timeline.events.append({"start": round(start - timeline.t0, 3),
                                        "seconds": round(time.monotonic() - start, 3), "kind": kind,
                                        "what": what(*args, **kwargs), "thread": threading.current_thread().name,
                                        "depth": depth})

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        self.wrap(SshConnection, "run", "ssh", lambda conn, argv, **_: f"{conn.host.name}: {label(argv)}")
        self.wrap(SshConnection, "open_stream", "ssh channel", lambda conn, argv: f"{conn.host.name}: {label(argv)}")
        self.wrap(QmpSession, "connect", "qmp connect", lambda session: session.name)
        self.wrap(QmpSession, "execute", "qmp", lambda session, command, *a, **k: f"{session.name}: {command}")
        self.wrap(FailoverSteps, "record_step", "step",
                  lambda _, *steps, **__: "recorded " + ", ".join(s.value for s in steps))
        self.wrap(LiveFailover, "intend", "step",
                  lambda _, *steps, **__: "recorded " + ", ".join(s.value for s in steps))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def summary(self) -> dict[str, dict[str, float]]:
        """Top-level time by kind and by what (nested calls are inside their caller's time)."""
        by: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for e in self.events:
            if e["depth"] == 0 and e["kind"] != "step":
                by[e["kind"]][e["what"]] += e["seconds"]
                by[e["kind"]]["(count)"] += 1
        return {k: dict(v) for k, v in by.items()}


def one_failover(bench: Bench, i: int) -> dict[str, Any]:
    vm, config = bench.protected_vm(f"bench-tl{i}")
    inventory = load_inventory(config)
    timeline = Timeline()
    timeline.install()
    try:
        with Connections(inventory) as reach:
            started = time.monotonic()
            timeline.t0 = started
            result = failover.failover(inventory, reach, vm.name)
            took = time.monotonic() - started
    finally:
        timeline.uninstall()
    bench.started_dr_vms.append(bench.lab.host_dir("site-b") / "replicas" / vm.name / "vm" / "qemu.pid")
    return {"rto_seconds": result.rto_seconds, "service_seconds": round(took, 3),
            "events": sorted(timeline.events, key=lambda e: e["start"]), "summary": timeline.summary()}


def one_live_failover(bench: Bench, guest: Any, i: int) -> dict[str, Any]:
    name = f"bench-ltl{i}"
    vm = bench.lab.add_vm(name, "site-a", LIVE_DISKS, guest=guest, guest_args=kernel_args("write", interval_ms=20))
    vm.console.wait_acks(1, timeout=120)
    config = bench.config(vm)
    drtool_json(config, "protect", name)
    vm.console.wait_acks(len(vm.console.acks()) + 20, timeout=120)
    inventory = load_inventory(config)
    timeline = Timeline()
    timeline.install()
    try:
        with Connections(inventory) as reach:
            started = time.monotonic()
            timeline.t0 = started
            result = live_failover(inventory, reach, name)
            took = time.monotonic() - started
    finally:
        timeline.uninstall()
    figures = result.live
    manifest_phases: dict[str, float] = {}
    with Connections(inventory) as reach:
        manifest = load_settled_manifest(reach.shell("site-b"), inventory.vms[name])
        if manifest is not None and manifest.failover is not None:
            manifest_phases = dict((manifest.failover.migration or {}).get("phases", {}))
    bench.started_dr_vms.append(bench.lab.host_dir("site-b") / "replicas" / name / "vm" / "qemu.pid")
    bench.cleanup()  # the moved guest would share the CPU with the next round
    vm.kill()
    return {"rto_seconds": result.rto_seconds, "service_seconds": round(took, 3),
            "move_seconds": figures.move_seconds if figures else None,
            "downtime_seconds": figures.downtime_seconds if figures else None, "phases": manifest_phases,
            "events": sorted(timeline.events, key=lambda e: e["start"]), "summary": timeline.summary()}


def show(run: dict[str, Any]) -> str:
    lines = [f"RTO {run['rto_seconds']} s (service call {run['service_seconds']} s)"]
    if "move_seconds" in run:
        lines.append(f"move {run['move_seconds']} s, downtime {run['downtime_seconds']} s; phases from the "
                     "move's start: " + ", ".join(f"{k} {v:.3f}" for k, v in run["phases"].items()))
    for e in run["events"]:
        lines.append(f"{e['start']:7.3f} {e['seconds']:6.3f}  {'  ' * e['depth']}{e['kind']:<11} {e['what']}"
                     + (f"  [{e['thread']}]" if e["thread"] != "MainThread" else ""))
    lines.append("top-level time by kind:")
    for kind, whats in run["summary"].items():
        total = sum(v for k, v in whats.items() if k != "(count)")
        lines.append(f"  {kind:<11} {total:6.3f} s in {int(whats['(count)'])} calls")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--live", action="store_true", help="time `failover --live` of the lab's Linux guest")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.json_out = args.json_out or (LIVE_JSON if args.live else DEFAULT_JSON)
    if os.geteuid() != 0:
        print("failover_timeline.py needs root (the lab makes network namespaces)", file=sys.stderr)
        return 2
    lab = Lab(hosts=("site-a", "site-b"))
    lab.start()
    bench = Bench(lab, lab.dir / "bench-timeline", 1)
    runs = []
    guest = build_guest() if args.live else None
    try:
        for i in range(args.rounds):
            runs.append(one_live_failover(bench, guest, i) if args.live else one_failover(bench, i))
            print(show(runs[-1]))
    finally:
        bench.cleanup()
        for problem in lab.stop():
            log(f"lab teardown: {problem}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(runs, indent=2) + "\n")
    log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
