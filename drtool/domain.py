"""Domain types: what drtool knows about hosts, VMs and their disks.

Frozen dataclasses, free of any transport or UI. Services take these and
return results built from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath

from drtool.errors import UsageError
from drtool.retention import DEFAULT_RETENTION, RetentionRule

DEFAULT_SSH_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 60.0


class ReplicationMode(str, Enum):
    ASYNC = "async"
    SYNC = "sync"


class Transport(str, Enum):
    """How replication data crosses between sites."""

    TLS = "tls"  # NBD over TLS with a pre-shared key drtool generates per protection
    PLAIN = "plain"  # unencrypted, unauthenticated NBD: only on a network you trust alone


@dataclass(frozen=True)
class Host:
    """A hypervisor host drtool reaches over SSH.

    ``address`` may be a Host alias of ~/.ssh/config; fields left None are
    filled from there (or OpenSSH's defaults) when connecting.
    """

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    replication_address: str | None = None  # where other hosts reach this one's NBD; default: address
    drtool_dir: PurePosixPath = PurePosixPath("/var/lib/drtool")  # noqa: RUF009 - immutable; drtool's files here


@dataclass(frozen=True)
class Vm:
    """A VM to protect: where it runs, where its replicas go."""

    name: str
    host: str
    qmp_socket: PurePosixPath | None  # drtool's own QMP monitor, or None for a libvirt domain
    dr_host: str
    replica_dir: PurePosixPath
    disks: tuple[str, ...] = ()  # device ids; empty means every disk on a device
    exclude_disks: tuple[str, ...] = ()  # disks the DR copy runs without (network disks, shares): left out
    mode: ReplicationMode = ReplicationMode.ASYNC
    transport: Transport = Transport.TLS
    source_dir: PurePosixPath | None = None  # drtool's files on the VM's host; default below
    retention: tuple[RetentionRule, ...] = DEFAULT_RETENTION  # which points checkpoint keeps (retention.py)

    libvirt_domain: str | None = None  # a domain libvirt runs: QMP passes through virsh
    libvirt_uri: str = "qemu:///system"

    @property
    def monitor(self) -> PurePosixPath:
        """drtool's QMP socket of a VM that is not a libvirt domain."""
        if self.qmp_socket is None:
            raise UsageError(f"{self.name} is the libvirt domain {self.libvirt_domain!r}: drtool cannot do this "
                             "for libvirt domains yet", hint="see README, libvirt domains")
        return self.qmp_socket

    @property
    def source_state_dir(self) -> PurePosixPath:
        return self.source_dir or PurePosixPath("/var/lib/drtool") / self.name


@dataclass(frozen=True)
class Inventory:
    """The whole validated configuration file."""

    path: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def vm(self, name: str) -> Vm:
        return self.vms[name]
