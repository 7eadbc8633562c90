#!/usr/bin/env python3
"""How drtool's control plane grows with VMs and hosts: status, protect/checkpoint/resync --all.

    python bench/bench_scale.py [--sizes 1,4,16,64] [--hosts 4 --per-host 16] [--json-out ...]

For each size N: N fresh idle VMs (no OS, one 16 MiB disk) on one host of a lab
(site-a, DR host site-b), then in order `protect --all`, `status`,
`checkpoint --all`, `resync --all` (nothing to do: every VM in sync), each
through the services as the CLI calls them, with a fresh Connections per
command (SSH set-up included; the interpreter's start-up is not: see
bench_cli.py). Then the same for --hosts sites x --per-host VMs (each site the
DR host of the one before it). For every command: wall time, SSH channels
opened and SSH connections used. The reference, measured in the same run: one
bare SSH round trip (`true`) on a fresh connection, the floor of any command;
each time is also given as a ratio to it. Slopes (s per VM) by least squares
over the one-host sizes. Goals (issue 13): status of 64 VMs < 3 s, its slope
< 0.02 s/VM; checkpoint --all slope < 0.1 s/VM; nothing fails for lack of
channels.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.config import load_inventory  # noqa: E402
from drtool.domain import Inventory  # noqa: E402
from drtool.lab import Lab, LabVm  # noqa: E402
from drtool.services.checkpoint import checkpoint  # noqa: E402
from drtool.services.protect import protect_many  # noqa: E402
from drtool.services.resync import resync_many  # noqa: E402
from drtool.services.status import vm_status  # noqa: E402
from drtool.transport.connections import Connections  # noqa: E402
from drtool.transport.ssh import SshConnection  # noqa: E402

DEFAULT_JSON = REPO / "bench" / "results" / "scale.json"
COMMANDS = ("protect --all", "status", "checkpoint --all", "resync --all")
GOALS = {"status of 64 VMs (s)": 3.0, "status slope (s/VM)": 0.02, "checkpoint --all slope (s/VM)": 0.1}

_channels: Counter[str] = Counter()
_original_session = SshConnection._session


def _counting_session(self: SshConnection) -> Any:
    _channels[self.host.name] += 1
    return _original_session(self)


SshConnection._session = _counting_session  # type: ignore[method-assign]  # count every channel opened


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(inventory: Inventory, fn: Callable[[Inventory, Connections], Any]) -> dict[str, Any]:
    """fn with a fresh Connections, as one CLI command: seconds, channels, connections, failures."""
    _channels.clear()
    started = time.perf_counter()
    with Connections(inventory) as conns:
        report = fn(inventory, conns)
        seconds = time.perf_counter() - started
        connections = sum(c.connections for c in conns.pool._conns.values())
    return {"seconds": round(seconds, 3), "channels": sum(_channels.values()), "connections": connections,
            "failures": failures(report)}


def failures(report: Any) -> list[str]:
    items = getattr(report, "outcomes", None) or getattr(report, "vms", None) or getattr(report, "results", ())
    out = []
    for item in items:
        if int(getattr(item, "exit_code", 0)) != 0:
            out.append(f"{getattr(item, 'vm', None) or getattr(item, 'name', '?')}: {item.error}")
    return out


def commands() -> dict[str, Callable[[Inventory, Connections], Any]]:
    return {
        "protect --all": lambda inv, c: protect_many(inv, c, all_vms=True),
        "status": lambda inv, c: vm_status(inv, c),
        "checkpoint --all": lambda inv, c: checkpoint(inv, c, all_vms=True),
        "resync --all": lambda inv, c: resync_many(inv, c, all_vms=True),
    }


def bare_round_trip(inventory: Inventory) -> float:
    started = time.perf_counter()
    with Connections(inventory) as conns:
        conns.shell("site-a").run(["true"])
    return time.perf_counter() - started


def measure(lab: Lab, tag: str, placement: dict[str, int], workdir: Path) -> tuple[dict[str, Any], list[LabVm]]:
    """placement: host -> VMs there (each replicated to the next lab host)."""
    vms = [lab.add_vm(f"{tag}-{host}-{i:02d}", host, {"vd0": "16M"}) for host, n in placement.items() for i in range(n)]
    config = lab.write_config(workdir / f"{tag}.toml", {vm.name: {} for vm in vms})
    inventory = load_inventory(config)
    row = {name: run(inventory, fn) for name, fn in commands().items()}
    log(f"{tag}: " + ", ".join(f"{k} {v['seconds']:.2f} s/{v['channels']} ch" for k, v in row.items()))
    for name, r in row.items():
        for failure in r["failures"][:3]:
            log(f"  {name} failed: {failure}")
    return row, vms


def retire(lab: Lab, vms: list[LabVm]) -> None:
    """Stop the VMs and their DR targets (the lab's teardown ends the rest)."""
    for vm in vms:
        vm.stop()
        for host in lab.hosts:
            pidfile = lab.replica_dir(vm.name, host) / "target.pid"
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--per-host", type=int, default=16)
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    sites = tuple(f"site-{chr(ord('a') + i)}" for i in range(max(2, args.hosts)))
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-scale-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    with Lab(hosts=sites) as lab:
        first_inventory = load_inventory(lab.write_config(workdir / "hosts.toml", {}))
        reference = min(bare_round_trip(first_inventory) for _ in range(3))
        log(f"reference: one SSH round trip on a fresh connection {reference:.3f} s")
        for n in sizes:
            rows[f"1 host x {n}"], vms = measure(lab, f"s{n}", {"site-a": n}, workdir)
            retire(lab, vms)
        if args.hosts and args.per_host:
            rows[f"{args.hosts} hosts x {args.per_host}"], vms = measure(
                lab, "m", {h: args.per_host for h in sites[: args.hosts]}, workdir)
            retire(lab, vms)
    single = {n: rows[f"1 host x {n}"] for n in sizes}
    slopes = {name: slope([(n, single[n][name]["seconds"]) for n in sizes]) for name in COMMANDS}
    print(f"{'setup':<16} {'command':<17} {'s':>7} {'x ref':>7} {'channels':>9} {'conns':>6} failures")
    for setup, row in rows.items():
        for name in COMMANDS:
            r = row[name]
            print(f"{setup:<16} {name:<17} {r['seconds']:7.2f} {r['seconds'] / reference:7.1f} {r['channels']:9d} "
                  f"{r['connections']:6d} {len(r['failures'])}")
    print("slope s/VM (one host): " + ", ".join(f"{k} {v:.4f}" for k, v in slopes.items()))
    achieved = {"status slope (s/VM)": slopes["status"], "checkpoint --all slope (s/VM)": slopes["checkpoint --all"]}
    if 64 in single:
        achieved["status of 64 VMs (s)"] = single[64]["status"]["seconds"]
    for goal, limit in GOALS.items():
        if goal in achieved:
            print(f"goal {goal} < {limit}: {achieved[goal]:.4f} {'met' if achieved[goal] < limit else 'MISSED'}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"reference_round_trip_s": reference, "rows": rows, "slopes_s_per_vm": slopes,
                                         "goals": GOALS, "achieved": achieved}, indent=2) + "\n")
    print(f"JSON: {args.json_out}")


if __name__ == "__main__":
    main()
