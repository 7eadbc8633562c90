"""The README demo: drtool's main job, run for real on a throw-away local lab."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from drtool.lab.lab import Lab

VM = "demo"


def _drtool(config: Path, *args: str, expect: int = 0) -> None:
    argv = [sys.executable, "-m", "drtool", "--config", str(config), *args]
    print(f"\n$ drtool {shlex.join(args)}", flush=True)
    rc = subprocess.run(argv, timeout=600).returncode
    if rc != expect:
        raise SystemExit(f"demo: drtool {shlex.join(args)} exited {rc}, expected {expect}")


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def run_demo(root_dir: Path | None = None, say: Callable[[str], None] = _say) -> int:
    with Lab(root_dir=root_dir, hosts=("site-a", "site-b")) as lab:
        say("lab: site-a (primary) and site-b (DR), each an sshd in its own network namespace")
        lab.add_vm(VM, "site-a", {"vd0": "64M", "vd1": "32M"})
        config = lab.write_config(lab.dir / "drtool.toml", {VM: {"dr_host": "site-b"}})
        say(f"inventory: {config}")
        print(config.read_text())
        _drtool(config, "hosts", "check")
        _drtool(config, "status")
        _drtool(config, "status", "--json")
    say("lab torn down")
    return 0
