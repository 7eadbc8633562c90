#!/usr/bin/env python3
"""A checkpoint's drain poll on a libvirt domain: one virsh call against two.

    python bench/bench_libvirt_drain.py [--polls 30] [--rounds 3] [--json-out bench/results/libvirt_drain.json]

One lab with a libvirtd per site (`Lab(libvirt=True)`), a two-disk domain on
site-a protected to site-b. While the source is paused, a checkpoint polls the
mirrors' dirty bitmaps and the jobs until both say "nothing left"; through
libvirt each QMP command is a `virsh qemu-monitor-command` over SSH. Measured
in the same run, over drtool's own SSH connection:

1. the poll as drtool runs it: both queries in one virsh process
   (`VirshQmp.execute_many`);
2. the reference: the same two queries as two virsh calls (the poll before).

And the `quiesced_seconds` of `drtool checkpoint` (the whole pause) per round.
Run as root, like the lab tests; everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.config import load_inventory  # noqa: E402
from drtool.lab.lab import Lab  # noqa: E402
from drtool.lab.libvirt_site import LabDomain  # noqa: E402
from drtool.transport.connections import Connections  # noqa: E402

QUERIES: list[tuple[str, dict[str, Any] | None]] = [("query-named-block-nodes", {"flat": True}),
                                                    ("query-block-jobs", None)]


def drtool_json(config: Path, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), "--json", *args],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"drtool {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return json.loads(done.stdout)


def timed(action: Any, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "libvirt_drain.json")
    args = parser.parse_args()
    with Lab(libvirt=True) as lab:
        domain = LabDomain(lab, "benchdb", "site-a")
        try:
            config = lab.host_dir("site-a") / "bench.toml"
            lab.write_config(config, {})
            with config.open("a") as f:
                f.write(f'\n[vms.benchdb]\nhost = "site-a"\nlibvirt_domain = "benchdb"\ndr_host = "site-b"\n'
                        f'replica_dir = "{lab.host_dir("site-b") / "replicas" / "benchdb"}"\n'
                        f'source_dir = "{lab.host_dir("site-a") / "drtool" / "benchdb"}"\n')
            drtool_json(config, "protect", "benchdb")
            inventory = load_inventory(config)
            one, two = [], []
            with Connections(inventory) as reach, reach.qmp(inventory.vms["benchdb"]) as qmp:
                qmp.execute("query-status")  # the SSH connection is open before the clock starts
                for _ in range(args.rounds):  # alternate, so that load changes hit both alike
                    two += timed(lambda: [qmp.execute(c, a) for c, a in QUERIES], args.polls)
                    one += timed(lambda: qmp.execute_many(QUERIES), args.polls)
            pauses = [drtool_json(config, "checkpoint", "benchdb")["results"][0]["quiesced_seconds"]
                      for _ in range(args.rounds)]
            drtool_json(config, "unprotect", "benchdb", "--delete-replicas")
        finally:
            domain.remove()
    results = {"poll_one_call_s": one, "poll_two_calls_s": two, "checkpoint_pause_s": pauses,
               "median_one_call_s": statistics.median(one), "median_two_calls_s": statistics.median(two),
               "ratio_one_to_two": statistics.median(one) / statistics.median(two)}
    print(f"{'measure':40} {'median s':>10}")
    print(f"{'drain poll, one virsh call (drtool)':40} {results['median_one_call_s']:10.4f}")
    print(f"{'drain poll, two virsh calls (reference)':40} {results['median_two_calls_s']:10.4f}")
    print(f"{'ratio drtool / reference':40} {results['ratio_one_to_two']:10.2f}")
    print(f"{'checkpoint pause (quiesced_seconds)':40} {statistics.median(pauses):10.4f}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
