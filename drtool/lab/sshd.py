"""Keys, known_hosts, sshd_config and the sshd process of one lab host.

Each lab host runs Debian's /usr/sbin/sshd in its own network namespace with a
configuration written here, so nothing in /etc/ssh is read or changed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from drtool.lab.libvirt_site import site_argv
from drtool.lab.netns import LabError, netns_exec_argv

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def generate_key(path: Path, comment: str) -> str:
    """Create an ed25519 key pair at `path` (+ .pub); return the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise LabError(f"ssh-keygen for {path} failed: {proc.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text().strip()


def known_hosts_line(addresses: Iterable[str], port: int, public_key: str) -> str:
    """One known_hosts line for all of a host's addresses.

    OpenSSH (and paramiko) want plain ADDRESS for port 22 and [ADDRESS]:PORT
    otherwise. The key comment is dropped.
    """
    names = [a if port == 22 else f"[{a}]:{port}" for a in addresses]
    keytype, blob = public_key.split()[:2]
    return f"{','.join(names)} {keytype} {blob}"


def _quote(value: str | Path) -> str:
    """Quote an sshd_config argument: double quotes, with \\ and \" escaped."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise LabError(f"newline in sshd_config value {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_sshd_config(
    path: Path,
    *,
    listen: Sequence[str],
    port: int,
    host_key: Path,
    authorized_keys: Path,
    pid_file: Path,
) -> None:
    # AuthorizedKeysFile expands %-tokens; a literal % must be doubled.
    ak = str(authorized_keys).replace("%", "%%")
    lines = [f"ListenAddress {addr}:{port}" for addr in listen]
    lines += [
        f"HostKey {_quote(host_key)}",
        f"AuthorizedKeysFile {_quote(ak)}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        f"PidFile {_quote(pid_file)}",
        "MaxStartups 50:30:100",  # MaxSessions stays at its default (10), as on real hosts
        "LogLevel ERROR",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "X11Forwarding no",
        "Subsystem sftp internal-sftp",
    ]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Sshd:
    """One running sshd (the listener process) in a namespace."""

    host: str
    namespace: str
    config: Path
    address: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    libvirt_dir: Path | None = None  # run a libvirtd beside it, in a mount namespace of their own (libvirt_site)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise LabError(f"sshd of {self.host} is not started")
        return self.process.pid

    def start(self) -> None:
        """Launch sshd -D in the namespace (no wait; see wait_ready)."""
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        command = [SSHD, "-D", "-e", "-f", str(self.config)]
        if self.libvirt_dir is not None:
            command = site_argv(self.libvirt_dir, command)
        argv = netns_exec_argv(self.namespace, command)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until sshd sends its banner on the management address.

        Raises LabError with sshd's stderr when it exits or stays silent.
        """
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LabError(
                    f"sshd of {self.host} exited with {self.process.returncode}: {self._stderr()}"
                )
            try:
                with socket.create_connection((self.address, self.port), timeout=1.0) as sock:
                    sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                    if sock.recv(64).startswith(b"SSH-"):
                        return
                    last_error = "connected but no SSH banner"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.02)
        raise LabError(
            f"sshd of {self.host} did not answer on {self.address}:{self.port} within "
            f"{timeout:.0f}s ({last_error}): {self._stderr()}"
        )

    def _stderr(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-2000:] or "(empty log)"

    def freeze(self) -> None:
        """SIGSTOP the listener: TCP still connects (kernel backlog) but no banner comes."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def write_known_hosts(path: Path, entries: Mapping[str, tuple[Sequence[str], int, str]]) -> None:
    """known_hosts with one line per host: host -> (addresses, port, public key)."""
    path.write_text(
        "".join(known_hosts_line(addrs, port, key) + "\n" for addrs, port, key in entries.values())
    )
