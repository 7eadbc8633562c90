"""The lab: several "hosts" (sshd in a network namespace each) and QEMU VMs on them.

    with Lab() as lab:
        vm = lab.add_vm("web", "site-a")
        cfg = lab.write_config(lab.dir / "drtool.toml", {"web": {"dr_host": "site-b"}})

Address plan (all in 198.18.0.0/15, routed "unreachable" in the root namespace):

* each lab takes a free slot S (0..255) and host number n (1-based, in the
  order given) gets the management /30 198.18.S.(4n)/30: root side .4n+1,
  host side .4n+2 (what drtool connects to); e.g. site-a 198.18.S.6, site-b 198.18.S.10;
* hosts i < j share a site link 198.19.i.(4j)/30: i is .4j+1, j is .4j+2
  (site-a 198.19.1.9, site-b 198.19.1.10). Site links exist only inside the
  lab's namespaces, so labs running side by side reuse them harmlessly.

Host namespaces have no default route, so a cut link means "unreachable" at once.

A state file (JSON, in the lab dir) lists everything the lab created, so that
`python -m drtool.lab down --dir D` can tear down a lab some other process
started, and so that teardown_state() can clean up after a crash.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from drtool.lab import netns
from drtool.lab.guest import GuestConsole, GuestImage, console_in
from drtool.lab.libvirt_site import in_site, wait_libvirtd
from drtool.lab.netns import LabError, netns_exec_argv
from drtool.lab.sshd import Sshd, generate_key, write_known_hosts, write_sshd_config
from drtool.lab.vm import LabVm

log = logging.getLogger(__name__)

STATE_FILE = "lab-state.json"
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}\Z")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")

TomlValue = str | int | bool | Path | Sequence[str]


# --------------------------------------------------------------------------- TOML writer


def toml_string(value: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else toml_string(key)


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, Path)):
        return toml_string(str(value))
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def dump_toml(data: Mapping[str, Any], _prefix: tuple[str, ...] = ()) -> str:
    """Nested mappings -> TOML text: scalars first, then one [a.b] table per sub-mapping."""
    lines: list[str] = []
    if _prefix and (not data or any(not isinstance(v, Mapping) for v in data.values())):
        lines.append("[" + ".".join(toml_key(k) for k in _prefix) + "]")
    for key, value in data.items():
        if not isinstance(value, Mapping):
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, Mapping):
            sub = dump_toml(value, (*_prefix, key))
            text += ("\n" if text else "") + sub
    return text


# --------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie is dead for our purposes
    return int(fields[19])


def _terminate(pids: Iterable[int], popens: Mapping[int, subprocess.Popen[Any]], grace: float) -> list[str]:
    """SIGCONT+SIGTERM every pid, wait up to `grace` s, SIGKILL the rest. Returns problems."""
    targets = set(pids)

    def alive(pid: int) -> bool:
        if pid in popens:
            return popens[pid].poll() is None
        return _proc_start_time(pid) is not None

    for sig in (signal.SIGCONT, signal.SIGTERM):  # a frozen sshd only acts on SIGTERM once continued
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    problems: list[str] = []
    for phase, limit in (("SIGTERM", grace), ("SIGKILL", 5.0)):
        deadline = time.monotonic() + limit
        while (left := {p for p in targets if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not left:
            return problems
        if phase == "SIGKILL":
            problems.append(f"processes survived SIGKILL: {sorted(left)}")
            return problems
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return problems


# --------------------------------------------------------------------------- state / teardown


def teardown_state(state: Mapping[str, Any], popens: Mapping[int, subprocess.Popen[Any]] | None = None) -> list[str]:
    """Tear down what a state record lists; every step is tried. Returns the problems met."""
    problems: list[str] = []
    namespaces: list[str] = list(state.get("namespaces", []))

    def step(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            problems.append(f"{what}: {exc}")
            return None

    popens = popens or {}
    tracked: set[int] = set(popens)
    for rec in state.get("processes", []):
        if _proc_start_time(rec["pid"]) == rec.get("start"):  # not a recycled pid
            tracked.add(rec["pid"])
    others: set[int] = set()
    for ns in namespaces:
        others.update(step(f"listing processes in {ns}", netns.namespace_pids, ns) or [])
    others -= tracked | {os.getpid()}
    # Untracked processes first (sshd sessions, children of lab processes) so
    # that their still-living parents reap them; then the lab's own processes.
    for group in (others, tracked):
        problems.extend(step("stopping processes", _terminate, group, popens, 5.0) or [])
    # Processes this process did not start (after `up` exited) end as zombies
    # until init reaps them; give it a moment so nothing shows in ps afterwards.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}").exists() for pid in (others | tracked) - set(popens)
    ):
        time.sleep(0.02)

    def remove_network() -> None:
        with netns.lab_lock():
            for ns in namespaces:
                step(f"deleting namespace {ns}", netns.delete_namespace, ns)
            for link in state.get("links", []):
                step(f"deleting link {link}", netns.delete_link, link)
            step("removing the unreachable route", netns.remove_unreachable_route, [])

    step("removing the network", remove_network)

    if not state.get("keep"):
        lab_dir = Path(state["dir"])
        if state.get("created_dir"):
            step(f"removing {lab_dir}", shutil.rmtree, lab_dir)
        else:
            for name in state.get("entries", []):
                path = lab_dir / name
                if path.is_dir() and not path.is_symlink():
                    step(f"removing {path}", shutil.rmtree, path)
                else:
                    step(f"removing {path}", path.unlink, True)
    for problem in problems:
        log.warning("lab %s teardown: %s", state.get("id"), problem)
    return problems


def teardown_dir(lab_dir: Path) -> list[str]:
    """Tear down the lab whose state file is in lab_dir (python -m drtool.lab down)."""
    state_path = lab_dir / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"no readable lab state in {lab_dir}: {exc}") from exc
    return teardown_state(state)


# --------------------------------------------------------------------------- the lab


@dataclass
class LabHost:
    name: str
    index: int
    namespace: str
    address: str  # management address on the host side: what drtool connects to
    root_address: str  # root-namespace end of the management link
    mgmt_root_if: str
    mgmt_host_if: str
    dir: Path
    sshd: Sshd | None = None
    public_key: str = ""
    site_ifs: dict[str, str] = field(default_factory=dict)  # peer host -> interface in this ns


class Lab:
    """A set of lab hosts and their VMs; see the module docstring for the address plan."""

    user = "root"

    def __init__(
        self,
        root_dir: Path | str | None = None,
        hosts: Sequence[str] = ("site-a", "site-b"),
        *,
        keep: bool = False,
        port: int = 22,
        libvirt: bool = False,
    ) -> None:
        if len(set(hosts)) != len(hosts) or not hosts:
            raise LabError(f"host names must be unique and not empty: {list(hosts)}")
        if len(hosts) > netns.MAX_HOSTS:
            raise LabError(f"at most {netns.MAX_HOSTS} hosts")
        for host in hosts:
            if not _HOST_RE.match(host):
                raise LabError(f"invalid host name {host!r}: letters, digits, '_', '.', '-'")
        self.id = secrets.token_hex(3)
        self.port = port
        self.keep = keep
        self.libvirt = libvirt  # a libvirtd per host (drtool/lab/libvirt_site.py)
        self.libvirt_versions: dict[str, str] = {}
        self._root_dir = Path(root_dir).absolute() if root_dir is not None else None
        self.dir = self._root_dir or Path("/nonexistent")
        self._host_names = tuple(hosts)
        self._hosts: dict[str, LabHost] = {}
        self.vms: dict[str, LabVm] = {}
        self._raw: list[subprocess.Popen[Any]] = []
        self._cut: set[frozenset[str]] = set()
        self._isolated: set[str] = set()
        self._state: dict[str, Any] = {}
        self.slot = -1  # management slot, chosen by start()
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Lab:
        """Create namespaces, links, keys and sshds; return once every sshd answers."""
        if self._started:
            raise LabError("lab already started")
        self._started = True
        created_dir = self._root_dir is None or not self._root_dir.exists()
        if self._root_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="drlab-"))
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._state = {
            "id": self.id, "dir": str(self.dir), "created_dir": created_dir, "keep": self.keep,
            "entries": [STATE_FILE, "hosts", "ssh", "run"], "namespaces": [], "links": [],
            "processes": [],
        }  # fmt: skip
        atexit.register(self.stop)
        try:
            self._save_state()
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.libvirt:  # libvirt's QEMU runs as libvirt-qemu: it must get through to the images
            for path in (self.dir, self.dir / "hosts"):
                path.mkdir(exist_ok=True)
                path.chmod(0o711)
        for index, name in enumerate(self._host_names, start=1):
            host_dir = self.dir / "hosts" / name
            host_dir.mkdir(parents=True, exist_ok=True)
            if self.libvirt:
                host_dir.chmod(0o711)
            self._hosts[name] = LabHost(
                name=name, index=index, namespace=f"{netns.NS_PREFIX}{self.id}-{name}",
                address="", root_address="",
                mgmt_root_if=f"d{self.id}m{index}", mgmt_host_if=f"d{self.id}m{index}h", dir=host_dir,
            )  # fmt: skip

        # One lock over slot choice and management links: a lab starting at the
        # same time must see our addresses before choosing its slot.
        with netns.lab_lock():
            self.slot = netns.allocate_mgmt_slot()
            self._state["slot"] = self.slot
            for host in self._hosts.values():
                host.root_address, host.address = netns.mgmt_addresses(self.slot, host.index)
                self._state["namespaces"].append(host.namespace)
                self._save_state()
                netns.create_namespace(host.namespace)
            netns.ensure_unreachable_route()
            for host in self._hosts.values():
                self._state["links"].append(host.mgmt_root_if)
                self._save_state()
                netns.add_veth(
                    host.mgmt_root_if, None, host.root_address, host.mgmt_host_if, host.namespace, host.address
                )
        for a, b in combinations(self._hosts.values(), 2):
            if_a, if_b = f"d{self.id}l{a.index}-{b.index}", f"d{self.id}l{b.index}-{a.index}"
            addr_a, addr_b = netns.site_link_addresses(a.index, b.index)
            self._state["links"].append(if_a)
            self._save_state()
            netns.add_veth(if_a, a.namespace, addr_a, if_b, b.namespace, addr_b)
            a.site_ifs[b.name], b.site_ifs[a.name] = if_a, if_b

        user_pub = generate_key(self.identity_file, f"drtool-lab-{self.id}")
        self.authorized_keys.write_text(user_pub + "\n")
        for host in self._hosts.values():
            sshd_dir = self.dir / "run" / host.name
            key = sshd_dir / "ssh_host_ed25519_key"
            host.public_key = generate_key(key, f"{host.name}.lab-{self.id}")
            config = sshd_dir / "sshd_config"
            write_sshd_config(
                config, listen=self.host_addresses(host.name), port=self.port, host_key=key,
                authorized_keys=self.authorized_keys, pid_file=sshd_dir / "sshd.pid",
            )  # fmt: skip
            host.sshd = Sshd(host.name, host.namespace, config, host.address, self.port, sshd_dir / "sshd.log",
                             libvirt_dir=host.dir / "libvirt" if self.libvirt else None)
        write_known_hosts(
            self.known_hosts,
            {h.name: (self.host_addresses(h.name), self.port, h.public_key) for h in self._hosts.values()},
        )
        for host in self._hosts.values():
            assert host.sshd is not None
            host.sshd.start()
            self._track(host.sshd.pid, f"sshd {host.name}")
        for host in self._hosts.values():
            assert host.sshd is not None
            host.sshd.wait_ready()
        if self.libvirt:
            for host in self._hosts.values():
                assert host.sshd is not None
                self.libvirt_versions[host.name] = wait_libvirtd(host.sshd.pid, host.name)

    def stop(self) -> list[str]:
        """Tear everything down (idempotent); returns the problems met, also logged."""
        if not self._started or self._stopped:
            return []
        self._stopped = True
        atexit.unregister(self.stop)
        popens: dict[int, subprocess.Popen[Any]] = {}
        for vm in self.vms.values():
            if vm.process is not None:
                popens[vm.process.pid] = vm.process
        for host in self._hosts.values():
            if host.sshd is not None and host.sshd.process is not None:
                popens[host.sshd.process.pid] = host.sshd.process
        for proc in self._raw:
            popens[proc.pid] = proc
        state = dict(self._state)
        state["processes"] = list(self._state.get("processes", [])) + [
            {"pid": pid, "start": _proc_start_time(pid)} for pid in popens
        ]
        return teardown_state(state, popens)

    def detach(self) -> Path:
        """Leave the lab running after this process exits; returns the state file path."""
        atexit.unregister(self.stop)
        self._stopped = True
        return self.state_file

    # ------------------------------------------------------------------ state

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    def _save_state(self) -> None:
        tmp = self.state_file.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(self.state_file)

    def _track(self, pid: int, what: str) -> None:
        self._state["processes"].append({"pid": pid, "start": _proc_start_time(pid), "what": what})
        self._save_state()

    # ------------------------------------------------------------------ hosts and addresses

    @property
    def hosts(self) -> tuple[str, ...]:
        return self._host_names

    def _host(self, name: str) -> LabHost:
        try:
            return self._hosts[name]
        except KeyError:
            raise LabError(f"no lab host {name!r} (hosts: {', '.join(self._host_names)})") from None

    def address(self, host: str) -> str:
        """The host's management address: what drtool connects to (port self.port)."""
        return self._host(host).address

    def host_addresses(self, host: str) -> list[str]:
        """Every address sshd of `host` listens on: management first, then site links."""
        h = self._host(host)
        return [h.address] + [self.peer_address(peer, host) for peer in self._host_names if peer != host]

    def peer_address(self, from_host: str, to_host: str) -> str:
        """The address of to_host that from_host reaches it at (on their site link)."""
        a, b = self._host(from_host), self._host(to_host)
        return netns.site_link_addresses(a.index, b.index)[1]

    def namespace(self, host: str) -> str:
        return self._host(host).namespace

    def host_dir(self, host: str) -> Path:
        """The host's own root directory (hosts share the filesystem; this keeps them apart)."""
        return self._host(host).dir

    def sshd_pid(self, host: str) -> int:
        sshd = self._host(host).sshd
        assert sshd is not None
        return sshd.pid

    @property
    def identity_file(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "ssh" / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "ssh" / "known_hosts"

    # ------------------------------------------------------------------ faults

    def cut_site_link(self, a: str, b: str) -> None:
        self._pair(a, b)
        self._cut.add(frozenset((a, b)))
        self._apply_site_link(a, b)

    def restore_site_link(self, a: str, b: str) -> None:
        self._pair(a, b)
        self._cut.discard(frozenset((a, b)))
        self._apply_site_link(a, b)

    def isolate(self, host: str) -> None:
        """Cut the host off: its management link and all its site links go down."""
        h = self._host(host)
        self._isolated.add(host)
        netns.set_link(None, h.mgmt_root_if, False)
        netns.set_link(h.namespace, h.mgmt_host_if, False)
        for peer in h.site_ifs:
            self._apply_site_link(host, peer)

    def unisolate(self, host: str) -> None:
        """Undo isolate(); site links cut by cut_site_link (or to isolated hosts) stay down."""
        h = self._host(host)
        self._isolated.discard(host)
        netns.set_link(h.namespace, h.mgmt_host_if, True)
        netns.set_link(None, h.mgmt_root_if, True)
        for peer in h.site_ifs:
            self._apply_site_link(host, peer)

    def _pair(self, a: str, b: str) -> None:
        if self._host(a) is self._host(b):
            raise LabError(f"a site link joins two different hosts, not {a!r} and itself")

    def _apply_site_link(self, a: str, b: str) -> None:
        up = frozenset((a, b)) not in self._cut and a not in self._isolated and b not in self._isolated
        ha, hb = self._host(a), self._host(b)
        netns.set_link(ha.namespace, ha.site_ifs[b], up)
        netns.set_link(hb.namespace, hb.site_ifs[a], up)

    def freeze_sshd(self, host: str) -> None:
        """SIGSTOP the host's sshd: TCP connects, but no banner ever comes."""
        sshd = self._host(host).sshd
        assert sshd is not None
        sshd.freeze()

    def thaw_sshd(self, host: str) -> None:
        sshd = self._host(host).sshd
        assert sshd is not None
        sshd.thaw()

    # ------------------------------------------------------------------ processes in hosts

    def virsh(self, host: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """virsh against the host's own libvirtd (a lab started with libvirt=True)."""
        if not self.libvirt:
            raise LabError("this lab runs no libvirtd: start it with Lab(libvirt=True)")
        argv = in_site(self.sshd_pid(host), ["virsh", "-c", "qemu:///system", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run argv in the host's namespace, wait, return its output (text); no check."""
        return subprocess.run(
            netns_exec_argv(self.namespace(host), argv),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start_raw_process(self, host: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in the host's namespace; the lab kills it at teardown.

        stdout/stderr go to `<labdir>/run/<host>/logs/<prog>-<n>.log`
        unless given in popen_kwargs.
        """
        self._host(host)
        logs = self.dir / "run" / host / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        log_file = None
        if "stdout" not in popen_kwargs and "stderr" not in popen_kwargs:
            log_file = open(logs / f"{Path(argv[0]).name}-{len(self._raw)}.log", "ab")  # noqa: SIM115
            popen_kwargs["stdout"] = popen_kwargs["stderr"] = log_file
        try:
            proc = subprocess.Popen(netns_exec_argv(self.namespace(host), argv), **popen_kwargs)
        finally:
            if log_file is not None:
                log_file.close()
        self._raw.append(proc)
        self._track(proc.pid, f"{argv[0]} on {host}")
        return proc

    def can_connect(self, from_host: str | None, address: str, port: int = 22, timeout: float = 2.0) -> bool:
        """Whether a TCP connect to address:port succeeds from from_host (None: the root namespace)."""
        if from_host is None:
            try:
                with socket.create_connection((address, port), timeout=timeout):
                    return True
            except OSError:
                return False
        script = (
            "import socket,sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        proc = self.exec(from_host, [sys.executable, "-c", script, address, str(port), str(timeout)],
                         timeout=timeout + 10)
        return proc.returncode == 0

    # ------------------------------------------------------------------ VMs

    def add_vm(
        self,
        name: str,
        host: str,
        disks: Mapping[str, str | int] | None = None,
        start: bool = True,
        *,
        guest: GuestImage | None = None,
        guest_args: str = "",
        iothread: bool = False,
    ) -> LabVm:
        """Create images and start a VM on `host` (running, or in prelaunch if not start).

        With `guest` (guest.build_guest()) the VM boots that Linux guest, its kernel
        command line extended by guest_args (guest.kernel_args()), its serial
        console in vm.console; the guest wants two disks (A, B: the first two).
        """
        if not name or name in (".", "..") or "/" in name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
            raise LabError(f"invalid VM name {name!r}")
        if name in self.vms:
            raise LabError(f"VM {name!r} already exists in the lab")
        h = self._host(host)
        if guest is not None and len(disks or {}) < 2:
            raise LabError("a lab guest writes its records to two disks: give at least two")
        vm = LabVm(name, host, h.namespace, h.dir / "vms" / name, disks or {"vd0": "64M"}, guest, guest_args,
                  iothread)
        vm.create_images()
        self.vms[name] = vm
        vm.launch(start=start)
        self._track(vm.pid, f"qemu {name}")
        return vm

    # ------------------------------------------------------------------ drtool inventory

    def write_config(self, path: Path | str, vms: Mapping[str, Mapping[str, TomlValue]] | None = None) -> Path:
        """Write a drtool inventory for every lab host and the given lab VMs.

        vms maps a lab VM's name to its settings: dr_host (default: the next
        host after its own), replica_dir (default <host_dir(dr_host)>/replicas/<name>),
        and anything else (disks, mode, ...) passed through. None: every lab VM.
        """
        path = Path(path).absolute()
        if vms is None:
            vms = {name: {} for name in self.vms}
        data: dict[str, Any] = {"hosts": {}, "vms": {}}
        for host in self._host_names:
            data["hosts"][host] = {
                "address": self.address(host), "port": self.port, "user": self.user,
                "identity_file": str(self.identity_file), "known_hosts": str(self.known_hosts),
                # NBD between sites goes over the site link, not the management network: the link
                # from the host before it, whose VMs it is the default DR host of (with two sites, the other)
                "replication_address": self.peer_address(self._previous_host(host), host),
                "drtool_dir": str(self.host_dir(host) / "drtool"),  # hosts share one filesystem here
            }  # fmt: skip
        for name, settings in vms.items():
            if name not in self.vms:
                raise LabError(f"no lab VM {name!r} (VMs: {', '.join(self.vms) or 'none'})")
            vm = self.vms[name]
            dr_host = str(settings.get("dr_host") or self._next_host(vm.host))
            self._host(dr_host)
            entry: dict[str, TomlValue] = {
                "host": vm.host,
                "qmp_socket": str(vm.qmp_socket),
                "dr_host": dr_host,
                "replica_dir": str(self.replica_dir(name, dr_host)),
                "source_dir": str(self.host_dir(vm.host) / "drtool" / name),
            }
            entry.update({k: v for k, v in settings.items() if k != "dr_host"})
            data["vms"][name] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_toml(data))
        if path.parent == self.dir and path.name not in self._state["entries"]:
            self._state["entries"].append(path.name)
            self._save_state()
        return path

    def replica_dir(self, name: str, dr_host: str = "site-b") -> Path:
        """Where write_config puts a VM's replicas on its DR host unless told otherwise."""
        return self.host_dir(dr_host) / "replicas" / name

    def dr_console(self, name: str, dr_host: str = "site-b") -> GuestConsole:
        """The console of a lab guest drtool started on its DR host (failover maps it into its run dir)."""
        return console_in(self.replica_dir(name, dr_host) / "vm")

    def _previous_host(self, host: str) -> str:
        names = self._host_names
        return names[(names.index(host) - 1) % len(names)]

    def _next_host(self, host: str) -> str:
        names = self._host_names
        return names[(names.index(host) + 1) % len(names)]
