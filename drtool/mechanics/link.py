"""The replication link: a relay on the source host, so a dead or stuck link is noticed.

QEMU 7.2's NBD client notices a lost server only when its socket fails, and
has no per-request timeout. A TCP connection whose peer vanished (a cut cable,
a dead site) with data outstanding keeps retransmitting for about 15 minutes
(tcp_retries2); one whose peer is alive but stuck (its storage hangs, its
process is stopped) never fails at all. Meanwhile a sync-mode guest's writes
hang, and an async mirror stalls without ever being reported broken.

So the source QEMU's NBD nodes connect to a UNIX socket (owner only) served by
drtool's relay (link_relay.py, run by the host's python3), which relays each
connection over TCP with TCP_USER_TIMEOUT and keepalives, and closes it when
the target answers nothing for STALL_TIMEOUT seconds. Either way QEMU's NBD
client sees EOF, its requests fail after reconnect-delay, and the mirror job
pauses and tracks dirty blocks: "broken", for `drtool resync`. A new
connection is held while the relay retries the target, so after a short
outage QEMU's client is back as soon as the path is, not after its own
back-off (up to 16 s). TLS stays end to end, QEMU to the DR target: the relay
sees only ciphertext.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from drtool.domain import Vm
from drtool.errors import RemoteCommandError, UsageError
from drtool.mechanics.dr_target import TargetLayout, stop_target
from drtool.mechanics.remote import make_dirs, running_pid, stop_process
from drtool.state.manifest import Manifest
from drtool.transport.connections import RemoteShell

LINK_TIMEOUT = 10  # s without an acknowledgement before a link counts as dead
CONNECT_TIMEOUT = 2  # s per attempt to reach the target; the relay retries every 0.5 s
# s with requests sent to the target and no byte back before the target counts as stuck:
# a sync-mode guest's write waits at most this plus the NBD client's reconnect-delay.
STALL_TIMEOUT = 20
RETRY_FOR = 600  # s the relay keeps retrying the target for a waiting connection
_PATH_SAFE = re.compile(r"[A-Za-z0-9/._-]+\Z")
_ADDRESS_SAFE = re.compile(r"[A-Za-z0-9.:-]+\Z")
FALLBACK_DIR = PurePosixPath("/run/drtool")
_RELAY_SOURCE = Path(__file__).with_name("link_relay.py").read_text()


def link_dir(vm: Vm) -> PurePosixPath:
    """Where the relay's socket lives: the VM's source dir when its path is plain."""
    return vm.source_state_dir if _PATH_SAFE.match(str(vm.source_state_dir)) else FALLBACK_DIR


def link_socket(vm: Vm) -> PurePosixPath:
    return link_dir(vm) / f"{vm.name}.nbd.sock"


def link_pidfile(vm: Vm) -> PurePosixPath:
    return link_dir(vm) / f"{vm.name}.link.pid"


def relay_argv(vm: Vm, manifest: Manifest) -> list[str]:
    """The relay's command line: python3 runs link_relay.py's source, every value an argument of its own."""
    address = manifest.nbd_address
    if not _ADDRESS_SAFE.match(address):
        raise UsageError(f"replication address {address!r} of {manifest.dr_host} is not a host name or IP address")
    return ["python3", "-c", _RELAY_SOURCE, str(link_socket(vm)), address, str(manifest.nbd_port),
            str(LINK_TIMEOUT), str(CONNECT_TIMEOUT), str(STALL_TIMEOUT), str(RETRY_FOR)]


def link_pid(shell: RemoteShell, vm: Vm) -> int | None:
    return running_pid(shell, link_pidfile(vm), "python", str(link_socket(vm)))


def start_link(shell: RemoteShell, vm: Vm, manifest: Manifest) -> None:
    """Start the relay (detached, outliving drtool) unless it already runs."""
    if link_pid(shell, vm) is not None:
        return
    make_dirs(shell, link_dir(vm))
    # the pid file gets the shell's pid, which exec turns into the relay's
    script = 'echo $$ > "$1"; shift; exec "$@" </dev/null >/dev/null 2>&1'
    shell.run(["setsid", "-f", "sh", "-c", script, "sh", str(link_pidfile(vm)), *relay_argv(vm, manifest)],
              timeout=30)
    check = 'i=0; while [ ! -S "$1" ]; do i=$((i+1)); [ $i -gt 50 ] && exit 1; sleep 0.1; done'
    if not shell.run(["sh", "-c", check, "sh", str(link_socket(vm))], check=False, timeout=30).ok:
        raise RemoteCommandError(f"the replication link relay for {vm.name} did not start on {vm.host}")
    give_to_qemu(shell, manifest, link_dir(vm), link_socket(vm))


def give_to_qemu(shell: RemoteShell, manifest: Manifest, *paths: PurePosixPath) -> None:
    """Files QEMU opens itself, owned by the user it runs as (libvirt's libvirt-qemu) when that is not root."""
    uid = manifest.hardware.get("uid")
    if uid:
        shell.run(["chown", "-R", f"{uid}:{manifest.hardware.get('gid', uid)}", "--", *(str(p) for p in paths)],
                  timeout=30)


def stop_link(shell: RemoteShell, vm: Vm) -> None:
    stop_process(shell, link_pidfile(vm), "python", str(link_socket(vm)), 10, (link_pidfile(vm), link_socket(vm)))


def stop_link_and_target(source: RemoteShell, vm: Vm, dr: RemoteShell, layout: TargetLayout) -> None:
    """Both ends of the replication at once: the relay on the source host, the target on the DR host."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(stop_link, source, vm), pool.submit(stop_target, dr, layout)]
    for future in futures:
        future.result()
