"""This machine as a RemoteShell, and processes that look like QEMU's: for the scripts drtool runs on hosts."""

from __future__ import annotations

import subprocess
import sys

from drtool.transport.ssh import CommandResult


class LocalShell:
    """A RemoteShell that runs its argv on this machine."""

    host_key = None

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def fake_process(program: str, *args: str) -> subprocess.Popen[bytes]:
    """A sleeping process whose command line reads `program -c CODE args...` (python under another argv[0])."""
    return subprocess.Popen([program, "-c", "import time; time.sleep(60)", *args], executable=sys.executable)
