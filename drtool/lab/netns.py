"""Network namespaces, veth pairs and the safety route, driven through iproute2.

Everything here runs `ip` with argv lists (never a shell) and raises LabError
with ip's own stderr when a command fails.

The address plan lives in `mgmt_addresses` / `site_link_addresses`; all of it
sits in the benchmarking range 198.18.0.0/15 (RFC 2544), which the lab also
routes to "unreachable" in the root namespace so that a downed link can never
send a packet out through the machine's default route.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

LAB_NET = "198.18.0.0/15"
NS_PREFIX = "drl-"
MAX_HOSTS = 63  # site link i-j uses 198.19.i.(4*j)/30, so j <= 63
IFNAMSIZ = 15

# Routes the lab adds carry this protocol number so that any lab can tell a lab
# route from one an administrator put there (which is never touched).
ROUTE_PROTO = "201"
_LOCK_PATH = Path("/run/drtool-lab.lock")


class LabError(RuntimeError):
    """The lab could not be set up, driven or torn down as asked."""


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS...`; raise LabError with ip's stderr if it fails and check is set."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def netns_exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside `namespace`.

    `ip netns exec` execs the command directly, so the pid of the resulting
    process is the command's own pid (signals reach it, not a wrapper).
    """
    return ["ip", "netns", "exec", namespace, *argv]


# --------------------------------------------------------------------------- addresses


def mgmt_addresses(slot: int, index: int) -> tuple[str, str]:
    """(root side, host side) addresses of host `index`'s management /30 in lab `slot`.

    Management links all end in the root namespace, so two labs running at the
    same time must not share them: each lab takes a free slot, 198.18.SLOT.0/24.
    """
    _check_index(index)
    if not 0 <= slot <= 255:
        raise ValueError(f"lab slot {slot} outside 0..255")
    return f"198.18.{slot}.{4 * index + 1}", f"198.18.{slot}.{4 * index + 2}"


def used_mgmt_slots() -> set[int]:
    """Third octets of the 198.18.x.y addresses present in the root namespace."""
    out = run_ip("-o", "-4", "addr", "show").stdout
    return {int(m) for m in re.findall(r"inet 198\.18\.(\d+)\.\d+/", out)}


def allocate_mgmt_slot() -> int:
    """A slot no running (or crashed) lab uses; call under lab_lock() and add the links before leaving it."""
    free = sorted(set(range(256)) - used_mgmt_slots())
    if not free:
        raise LabError("no free lab slot in 198.18.0.0/16: tear down old labs")
    return random.choice(free)


def site_link_addresses(i: int, j: int) -> tuple[str, str]:
    """Addresses of hosts i and j on their site link (a /30 in 198.19.0.0/16).

    Site links live only inside the lab's namespaces, so every lab can use the
    same addresses for them.
    """
    _check_index(i)
    _check_index(j)
    if i == j:
        raise ValueError("a site link joins two different hosts")
    lo, hi = min(i, j), max(i, j)
    base = int(ipaddress.IPv4Address(f"198.19.{lo}.0")) + 4 * hi
    a_lo, a_hi = str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))
    return (a_lo, a_hi) if i == lo else (a_hi, a_lo)


def _check_index(index: int) -> None:
    if not 1 <= index <= MAX_HOSTS:
        raise ValueError(f"host index {index} outside 1..{MAX_HOSTS}")


# --------------------------------------------------------------------------- namespaces


def list_namespaces() -> list[str]:
    proc = run_ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def create_namespace(name: str) -> None:
    run_ip("netns", "add", name)
    run_ip("-n", name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    if name in list_namespaces():
        run_ip("netns", "del", name)


def namespace_pids(name: str) -> list[int]:
    """Pids of every process whose network namespace is `name` (empty if it is gone)."""
    proc = run_ip("netns", "pids", name, check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


# --------------------------------------------------------------------------- links


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise LabError(f"interface name {name!r} longer than {IFNAMSIZ} characters")
    return name


def add_veth(
    end_a: str, ns_a: str | None, addr_a: str, end_b: str, ns_b: str | None, addr_b: str
) -> None:
    """Create a veth pair, move each end to its namespace (None: root), address it /30, up.

    Both ends are created in the root namespace first, so both names must be
    free there; lab names carry the lab id, so they are.
    """
    run_ip("link", "add", check_ifname(end_a), "type", "veth", "peer", "name", check_ifname(end_b))
    for end, ns, addr in ((end_a, ns_a, addr_a), (end_b, ns_b, addr_b)):
        prefix: tuple[str, ...] = ("-n", ns) if ns else ()
        if ns:
            run_ip("link", "set", end, "netns", ns)
        run_ip(*prefix, "addr", "add", f"{addr}/30", "dev", end)
        run_ip(*prefix, "link", "set", end, "up")


def set_link(namespace: str | None, ifname: str, up: bool) -> None:
    prefix: tuple[str, ...] = ("-n", namespace) if namespace else ()
    run_ip(*prefix, "link", "set", ifname, "up" if up else "down")


def delete_link(ifname: str) -> None:
    """Delete a root-namespace link if it still exists (deleting one veth end deletes both)."""
    if run_ip("link", "show", ifname, check=False).returncode == 0:
        run_ip("link", "del", ifname)


# --------------------------------------------------------------------------- safety route


@contextlib.contextmanager
def lab_lock(timeout: float = 10.0) -> Iterator[None]:
    """A machine-wide lock around route and namespace bookkeeping shared by all labs."""
    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"timed out waiting for {_LOCK_PATH}") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _lab_route() -> tuple[bool, str]:
    """(present, description) of the route for LAB_NET in the main table."""
    out = run_ip("route", "show", "exact", LAB_NET).stdout.strip()
    return bool(out), out


def ensure_unreachable_route() -> bool:
    """Make sure LAB_NET is routed 'unreachable' in the root namespace.

    Returns True if the lab added the route now. A route for LAB_NET that is
    not of type unreachable is refused: traffic to lab addresses could leak.
    Call under lab_lock().
    """
    present, desc = _lab_route()
    if present:
        if not desc.startswith("unreachable"):
            raise LabError(f"a route for {LAB_NET} already exists and is not unreachable: {desc}")
        return False
    run_ip("route", "add", "unreachable", LAB_NET, "proto", ROUTE_PROTO)
    return True


def remove_unreachable_route(own_namespaces: Sequence[str]) -> bool:
    """Remove the lab's unreachable route if no other lab still runs.

    Only a route carrying ROUTE_PROTO (one that some lab added) is removed, and
    only when no `drl-*` namespace other than `own_namespaces` exists: another
    lab running at the same time still needs it. Call under lab_lock().
    """
    others = [ns for ns in list_namespaces() if ns.startswith(NS_PREFIX) and ns not in own_namespaces]
    if others:
        return False
    present, desc = _lab_route()
    if not present or not desc.startswith("unreachable") or f"proto {ROUTE_PROTO}" not in desc:
        return False
    run_ip("route", "del", "unreachable", LAB_NET, "proto", ROUTE_PROTO)
    return True
