"""The VM's hardware definition, read from its running QEMU on the source host.

Failover starts the VM on the DR host from this, without the primary site:
so protect records the source QEMU's full command line in the DR manifest.
The QEMU process is found as the one whose command line names drtool's QMP
socket; the search runs on the host in its python3 (the same one that
carries the QMP relay), with the socket path passed as an argument.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from drtool.errors import RemoteCommandError
from drtool.transport.connections import RemoteShell

_FIND_QEMU = r"""
import json, os, re, sys
sock = sys.argv[1]
forms = {sock, sock.replace(",", ",,")}
# path=SOCK inside -chardev, or -qmp/-monitor unix:SOCK[,server=on,...]
pattern = re.compile("(^|[,=]|^unix:)(%s)(,|$)" % "|".join(re.escape(f) for f in forms))
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        continue
    if argv and "qemu-system" in os.path.basename(argv[0]) and any(pattern.search(a) for a in argv):
        print(json.dumps({"pid": int(pid), "argv": argv}))
        sys.exit(0)
sys.exit(3)
"""


def read_hardware(shell: RemoteShell, qmp_socket: PurePosixPath) -> dict[str, Any]:
    """{"pid", "argv", "read_at"} of the QEMU serving qmp_socket on this host."""
    result = shell.run(["python3", "-c", _FIND_QEMU, str(qmp_socket)], check=False, timeout=30)
    if result.exit_status == 3:
        raise RemoteCommandError(f"no QEMU process on the host has {qmp_socket} on its command line",
                                 hint="the monitor must be given on QEMU's command line (-chardev ... path=)")
    if not result.ok:
        raise RemoteCommandError(f"cannot read the QEMU command line: {result.err.strip()}")
    found = json.loads(result.out)
    found["read_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return found


def source_qemu_alive(shell: RemoteShell, qmp_socket: PurePosixPath) -> bool:
    """Whether a QEMU process with this monitor on its command line runs on the host."""
    try:
        read_hardware(shell, qmp_socket)
        return True
    except RemoteCommandError as err:
        if "no QEMU process" in err.message:
            return False
        raise
