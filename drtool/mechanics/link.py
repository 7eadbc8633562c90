"""The replication link: a socat relay on the source host, so a dead link is noticed.

QEMU 7.2's NBD client notices a lost server only when its socket fails, and a
TCP connection whose peer vanished (a cut cable, a dead site) with data
outstanding keeps retransmitting for about 15 minutes (tcp_retries2). In that
time a sync-mode guest's writes hang, and an async mirror silently stalls
without ever being reported broken. QEMU offers no TCP_USER_TIMEOUT; socat does.

So the source QEMU's NBD nodes connect to a UNIX socket (mode 0600) served by
`socat ... fork`, which relays each connection over TCP with TCP_USER_TIMEOUT
and keepalives: a dead link fails in LINK_TIMEOUT seconds, QEMU's NBD client
sees EOF, reconnects through socat in the background, and after its
reconnect-delay the mirror job pauses and tracks dirty blocks: "broken",
for `drtool resync`. TLS stays end to end, QEMU to the DR target: the relay
sees only ciphertext.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import RemoteCommandError, UsageError
from drtool.state.manifest import Manifest
from drtool.mechanics.remote import make_dirs, running_pid
from drtool.transport.connections import RemoteShell

LINK_TIMEOUT = 10  # s without an acknowledgement before a link counts as dead
CONNECT_TIMEOUT = 5
_SOCAT_SAFE = re.compile(r"[A-Za-z0-9/._-]+\Z")  # socat parses its addresses: no ':', ',', quotes...
_ADDRESS_SAFE = re.compile(r"[A-Za-z0-9.:-]+\Z")
FALLBACK_DIR = PurePosixPath("/run/drtool")
SOL_TCP, TCP_USER_TIMEOUT = 6, 18


def link_dir(vm: Vm) -> PurePosixPath:
    """Where the relay's socket lives: the VM's source dir when socat can take its path as is."""
    return vm.source_state_dir if _SOCAT_SAFE.match(str(vm.source_state_dir)) else FALLBACK_DIR


def link_socket(vm: Vm) -> PurePosixPath:
    return link_dir(vm) / f"{vm.name}.nbd.sock"


def link_pidfile(vm: Vm) -> PurePosixPath:
    return link_dir(vm) / f"{vm.name}.link.pid"


def socat_argv(vm: Vm, manifest: Manifest) -> list[str]:
    address = manifest.nbd_address
    if not _ADDRESS_SAFE.match(address):
        raise UsageError(f"replication address {address!r} of {manifest.dr_host} is not a host name or IP address")
    host = f"[{address}]" if ":" in address else address
    return [
        "socat",
        f"UNIX-LISTEN:{link_socket(vm)},fork,unlink-early,mode=600",
        f"TCP:{host}:{manifest.nbd_port},connect-timeout={CONNECT_TIMEOUT},nodelay,keepalive,keepidle=5,"
        f"keepintvl=2,keepcnt=3,setsockopt-int={SOL_TCP}:{TCP_USER_TIMEOUT}:{LINK_TIMEOUT * 1000}",
    ]


def link_pid(shell: RemoteShell, vm: Vm) -> int | None:
    return running_pid(shell, link_pidfile(vm), "socat", str(link_socket(vm)))


def start_link(shell: RemoteShell, vm: Vm, manifest: Manifest) -> None:
    """Start the relay (detached, outliving drtool) unless it already runs."""
    if link_pid(shell, vm) is not None:
        return
    make_dirs(shell, link_dir(vm))
    # the pid file gets the shell's pid, which exec turns into socat's
    script = 'echo $$ > "$1"; shift; exec "$@" </dev/null >/dev/null 2>&1'
    shell.run(["setsid", "-f", "sh", "-c", script, "sh", str(link_pidfile(vm)), *socat_argv(vm, manifest)],
              timeout=30)
    check = 'i=0; while [ ! -S "$1" ]; do i=$((i+1)); [ $i -gt 50 ] && exit 1; sleep 0.1; done'
    if not shell.run(["sh", "-c", check, "sh", str(link_socket(vm))], check=False, timeout=30).ok:
        raise RemoteCommandError(f"the replication link relay (socat) for {vm.name} did not start on {vm.host}")


def stop_link(shell: RemoteShell, vm: Vm) -> None:
    pid = link_pid(shell, vm)
    if pid is not None:
        shell.run(["kill", "-TERM", str(pid)], check=False, timeout=15)
    shell.run(["rm", "-f", "--", str(link_pidfile(vm)), str(link_socket(vm))], timeout=15)
