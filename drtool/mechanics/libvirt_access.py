"""Can libvirt's QEMU open the files drtool gives it? For `hosts check`.

A libvirt domain's QEMU runs as libvirt's user (libvirt-qemu on Debian), not
root, and opens two things drtool made: the TLS-PSK key directory and the
replication link's UNIX socket. Unix permissions must let that user in, and
where AppArmor confines the domain (its libvirt-UUID profile in enforce mode)
the site rules must name both paths: virt-aa-helper grants the disk images,
nothing of drtool's. The check runs on the host in one `sh` script, as the
QEMU user (runuser), so it sees exactly what QEMU would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.absent import absent_is_none
from drtool.domain import Vm
from drtool.mechanics.dr_target import source_tls_dir
from drtool.mechanics.link import link_socket
from drtool.transport.connections import RemoteShell

# where Debian's and Ubuntu's libvirt profiles include site rules for every domain's QEMU
APPARMOR_LOCAL = PurePosixPath("/etc/apparmor.d/local/abstractions/libvirt-qemu")

_CHECK = r"""
d=$1 tls=$2 sock=$3 local=$4
status=/run/libvirt/qemu/$d.xml
pid=$(sed -n "s/.*<domstatus [^>]*pid='\([0-9]*\)'.*/\1/p" "$status" 2>/dev/null)
uuid=$(sed -n 's/.*<uuid>\(.*\)<\/uuid>.*/\1/p' "$status" 2>/dev/null | head -n1)
user=; [ -n "$pid" ] && user=$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')
[ -n "$user" ] || user=$(sed -n 's/^[[:space:]]*user[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
    /etc/libvirt/qemu.conf 2>/dev/null | tail -n1)
[ -n "$user" ] || user=libvirt-qemu
echo "user $user"
as() { if [ "$user" = root ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }
if [ ! -e "$tls" ]; then echo "tls absent"
elif as sh -c 'test -r "$1" && test -x "$1" && for f in "$1"/*; do test ! -e "$f" || test -r "$f" || exit 1; done' \
    sh "$tls" 2>/dev/null; then echo "tls ok"
else echo "tls denied"; fi
if [ ! -e "$sock" ]; then echo "socket absent"
elif as test -w "$sock" 2>/dev/null; then echo "socket ok"
else echo "socket denied"; fi
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" != Y ]; then echo "apparmor absent"
elif grep -q "^libvirt-$uuid (enforce)" /sys/kernel/security/apparmor/profiles 2>/dev/null; then
    echo "apparmor enforcing"
    grep -qF "$tls/" "$local" 2>/dev/null && echo "rule tls"
    grep -qF "$sock" "$local" 2>/dev/null && echo "rule socket"
else echo "apparmor not-enforcing"; fi
"""


@dataclass(frozen=True)
class QemuAccess:
    """Whether the QEMU user of a libvirt domain can open drtool's files on the domain's host."""

    vm: str
    user: str
    psk_dir: str
    psk_dir_access: str  # ok, denied, absent (not protected yet: protect gives it to the user)
    relay_socket: str
    relay_socket_access: str  # ok, denied, absent (the relay runs only while protected)
    apparmor: str  # enforcing, not enforcing, absent (no AppArmor on the host)
    missing_rules: tuple[str, ...] = ()  # AppArmor rules to add to APPARMOR_LOCAL, when enforcing
    error: str | None = None

    def __post_init__(self) -> None:
        absent_is_none(self, "error")


def apparmor_rules(psk_dir: PurePosixPath, relay_socket: PurePosixPath) -> dict[str, str]:
    """The site rules that let a confined QEMU read the PSK directory and connect to the relay's socket."""
    return {"tls": f'  "{psk_dir}/" r,\n  "{psk_dir}/*" r,', "socket": f'  "{relay_socket}" rw,'}


def check_qemu_access(shell: RemoteShell, vm: Vm) -> QemuAccess:
    assert vm.libvirt_domain is not None
    tls, sock = source_tls_dir(vm), link_socket(vm)
    result = shell.run(["sh", "-c", _CHECK, "sh", vm.libvirt_domain, str(tls), str(sock), str(APPARMOR_LOCAL)],
                       check=False, timeout=60)
    return parse_access(vm.name, tls, sock, result.out)


def parse_access(vm: str, tls: PurePosixPath, sock: PurePosixPath, out: str) -> QemuAccess:
    said = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    rules_present = {line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("rule ")}
    apparmor = said.get("apparmor", "absent").replace("-", " ")
    missing = tuple(rule for key, rule in apparmor_rules(tls, sock).items()
                    if apparmor == "enforcing" and key not in rules_present)
    tls_access, sock_access = said.get("tls", "unknown"), said.get("socket", "unknown")
    user = said.get("user", "?")
    problems = [f"{user} cannot read {tls}" if tls_access == "denied" else "",
                f"{user} cannot connect to {sock}" if sock_access == "denied" else "",
                (f"AppArmor confines the domain and {APPARMOR_LOCAL} lacks:\n" + "\n".join(missing)) if missing else ""]
    return QemuAccess(vm, user, str(tls), tls_access, str(sock), sock_access, apparmor, missing,
                      "; ".join(p for p in problems if p))
