"""How long `drtool SUBCOMMAND --help` takes to answer, beside `python -c pass`, in one run.

Start-up is what a user waits for on every command and every completion
(shell completion runs drtool too). Prints a table and writes JSON
(bench/results/cli.json). Runs anywhere: nothing is contacted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["status", "--help"], ["failover", "--help"], ["--version"])


def timed(argv: list[str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "cli.json")
    args = parser.parse_args()
    rows = {"python -c pass": timed([sys.executable, "-c", "pass"], args.rounds)}
    for command in COMMANDS:
        rows["drtool " + " ".join(command)] = timed([sys.executable, "-m", "drtool", *command], args.rounds)
    reference = statistics.median(rows["python -c pass"])
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'minus python':>13} {'ratio':>6}")
    results = {}
    for name, times in rows.items():
        median = statistics.median(times)
        results[name] = {"median_s": median, "min_s": min(times), "over_python_s": median - reference,
                         "ratio_to_python": median / reference, "runs": times}
        print(f"{name:<28} {median:9.3f} {min(times):7.3f} {median - reference:13.3f} {median / reference:6.1f}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=2) + "\n")
    print(f"JSON: {args.json_out}")


if __name__ == "__main__":
    main()
