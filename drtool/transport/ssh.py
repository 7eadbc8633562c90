"""SSH to hypervisor hosts with paramiko: verified host keys, argv commands, timeouts.

One connection per host, opened on first use and reused for the whole run
(`SshPool`). Every remote command is an argv list quoted once with
shlex.join; nothing here ever builds a command line by string concatenation.
"""

from __future__ import annotations

import getpass
import select
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import paramiko

from drtool.domain import DEFAULT_CONNECT_TIMEOUT, DEFAULT_SSH_PORT, Host
from drtool.errors import ConfigError, HostKeyError, HostUnreachable, RemoteCommandError
from drtool.transport import ssh_options
from drtool.transport.keepalive import KeepaliveWatch, lost_reason
from drtool.transport.ssh_options import MAX_JUMPS, check_supported, parse_jumps

_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, after ~/.ssh/config has been applied."""

    hostname: str
    port: int
    user: str
    key_filenames: tuple[str, ...]
    known_hosts: tuple[Path, ...]
    proxy_command: str | None = None
    jumps: tuple[Endpoint, ...] = ()  # ProxyJump: hosts to go through, first to last
    identities_only: bool = False  # IdentitiesOnly: the keys named, not the agent's
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # TCP connect, banner, key exchange, login
    alive_interval: float | None = ssh_options.DEFAULT_ALIVE_INTERVAL  # ServerAliveInterval; None: off
    alive_count_max: int = ssh_options.DEFAULT_ALIVE_COUNT_MAX  # ServerAliveCountMax
    host_key_alias: str | None = None  # HostKeyAlias: the name the key is filed under
    tcp_keepalive: bool = True  # TCPKeepAlive
    compression: bool = False  # Compression
    allow_agent: bool = True  # IdentityAgent none: no agent
    weaker_host_key_checking: str | None = None  # e.g. "StrictHostKeyChecking accept-new", which drtool does not do

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files this endpoint's key under in known_hosts."""
        if self.host_key_alias is not None:
            return self.host_key_alias
        if self.port == DEFAULT_SSH_PORT:
            return self.hostname
        return f"[{self.hostname}]:{self.port}"


def resolve_endpoint(host: Host, ssh_config_path: Path | None = None, _depth: int = 0) -> Endpoint:
    """Apply OpenSSH's client config to a Host: aliases, port, user, keys, timeouts, proxies.

    Values in drtool's inventory win over ~/.ssh/config, which wins over
    OpenSSH's defaults, as `ssh -p`/`-l`/`-i` would (connect_timeout wins when
    the inventory sets it to other than its default). An option drtool cannot
    honour is a ConfigError (see ssh_options.py).
    """
    cfg_path = ssh_config_path or Path("~/.ssh/config").expanduser()
    options: dict = {}
    if cfg_path.is_file():
        try:
            options = paramiko.SSHConfig.from_text(ssh_options.config_text(cfg_path)).lookup(host.address)
        except paramiko.ssh_exception.ConfigParseError as err:
            raise ConfigError(f"{cfg_path}: {err}", hint="fix that line of the ssh config") from err
        except paramiko.ssh_exception.CouldNotCanonicalize as err:
            raise HostUnreachable(f"{cfg_path}: cannot canonicalize {err} with CanonicalDomains") from err
        except KeyError as err:  # paramiko: CanonicalizeHostname without CanonicalDomains
            raise ConfigError(f"{cfg_path} leaves out {err} for host {host.name}",
                              hint="ssh_config(5) says which options go together") from err
        check_supported(host.name, options, str(cfg_path))
    hostname = options.get("hostname", host.address)
    port = host.port or int(options.get("port", DEFAULT_SSH_PORT))
    user = host.user or options.get("user") or getpass.getuser()
    if host.identity_file is not None:
        keys: tuple[str, ...] = (str(host.identity_file),)
    else:
        keys = tuple(str(Path(p).expanduser()) for p in options.get("identityfile", []))
    if host.known_hosts is not None:
        known: tuple[Path, ...] = (host.known_hosts,)
    else:
        files = shlex.split(options.get("userknownhostsfile", "~/.ssh/known_hosts"))
        files += shlex.split(options.get("globalknownhostsfile", "/etc/ssh/ssh_known_hosts"))
        known = tuple(Path(f).expanduser() for f in files)
    jumps: tuple[Endpoint, ...] = ()
    spec = options.get("proxyjump", "none")
    if spec.lower() != "none":
        if _depth >= MAX_JUMPS:
            raise ConfigError(f"ProxyJump for host {host.name} goes through more than {MAX_JUMPS} hosts "
                              "(a loop?)", hint=f"check ProxyJump in {cfg_path}")
        for jump_user, jump_host, jump_port in parse_jumps(spec):
            via = resolve_endpoint(Host(f"{host.name} (jump host {jump_host})", jump_host, port=jump_port,
                                        user=jump_user, known_hosts=host.known_hosts,
                                        connect_timeout=host.connect_timeout), cfg_path, _depth + 1)
            if not via.key_filenames and host.identity_file is not None:
                via = replace(via, key_filenames=(str(host.identity_file),))
            jumps += (*via.jumps, replace(via, jumps=()))
    return _with_options(Endpoint(hostname, port, user, keys, known, options.get("proxycommand"), jumps),
                         host, options, str(cfg_path))


def _with_options(ep: Endpoint, host: Host, options: dict, cfg_path: str) -> Endpoint:
    """The endpoint with ssh_config's timeouts, keepalives, HostKeyAlias and flags applied."""
    connect_timeout = host.connect_timeout
    if connect_timeout == DEFAULT_CONNECT_TIMEOUT:
        connect_timeout = ssh_options.seconds(options, "connecttimeout", cfg_path) or connect_timeout
    interval = ssh_options.DEFAULT_ALIVE_INTERVAL
    if "serveraliveinterval" in options:
        interval = ssh_options.seconds(options, "serveraliveinterval", cfg_path)  # type: ignore[assignment]
    strict = str(options.get("stricthostkeychecking", "yes")).lower()
    no_auth_local = ssh_options.flag(options, "nohostauthenticationforlocalhost", False, cfg_path)
    return replace(
        ep,
        identities_only=ssh_options.flag(options, "identitiesonly", False, cfg_path),
        connect_timeout=connect_timeout,
        alive_interval=interval,
        alive_count_max=ssh_options.count(options, "serveralivecountmax", ssh_options.DEFAULT_ALIVE_COUNT_MAX,
                                          cfg_path),
        host_key_alias=options.get("hostkeyalias"),
        tcp_keepalive=ssh_options.flag(options, "tcpkeepalive", True, cfg_path),
        compression=ssh_options.flag(options, "compression", False, cfg_path),
        allow_agent=str(options.get("identityagent", "")).lower() != "none",
        weaker_host_key_checking=(f"StrictHostKeyChecking {strict}" if strict != "yes"
                                  else "NoHostAuthenticationForLocalhost yes" if no_auth_local else None),
    )


def key_fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class _RefuseUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Never trust a host key on first sight; tell the user how to add it."""

    def __init__(self, host: Host, endpoint: Endpoint) -> None:
        self._host = host
        self._endpoint = endpoint

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        ep = self._endpoint
        target = shlex.quote(str(ep.known_hosts[0] if ep.known_hosts else Path("~/.ssh/known_hosts")))
        add = f"ssh-keyscan -p {ep.port} {shlex.quote(ep.hostname)} >> {target}"
        if ep.host_key_alias is not None:  # filed under the alias: keyscan names the address
            add = (f"ssh-keyscan -p {ep.port} {shlex.quote(ep.hostname)} | "
                   f"sed 's/^[^ ]*/{ep.host_key_alias}/' >> {target}")
        weaker = (f" (drtool does not follow {ep.weaker_host_key_checking} of the ssh config: it never "
                  "trusts a key on first sight)") if ep.weaker_host_key_checking else ""
        raise HostKeyError(
            f"host {self._host.name} ({ep.hostname}:{ep.port}) offered an unknown host key "
            f"{key_fingerprint(key)}; refusing to connect{weaker}",
            hint=f"check the fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then add it: {add}",
        )


CHANNEL_ATTEMPTS = 20
CHANNELS_PER_CONNECTION = 8  # below OpenSSH's default MaxSessions (10), with room to spare
CLOSE_WAIT = 1.0  # s close() waits for a connect under way (status looks at a down host only briefly)


@dataclass
class _Lane:
    """One SSH connection (TCP + transport) of an SshConnection, and the channels open on it."""

    client: paramiko.SSHClient
    channels: list[paramiko.Channel] = field(default_factory=list)
    locks: list[paramiko.Channel] = field(default_factory=list)  # channels holding a VM lock (locks.py)
    capacity: int = CHANNELS_PER_CONNECTION  # lowered when the server refuses a channel
    opening: int = 0  # channels being opened right now (outside the connection's lock)

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def open_count(self) -> int:
        self.channels = [c for c in self.channels if not c.closed]
        return len(self.channels)


class SshConnection:
    """SSH to one host, shared by every command of a run.

    Commands and streams are channels of one SSH connection; a server allows
    only so many per connection (OpenSSH: MaxSessions, 10 by default), so past
    CHANNELS_PER_CONNECTION open channels (or when the server refuses one) a
    further connection to the same host is opened and used alongside.
    """

    def __init__(self, host: Host, endpoint: Endpoint | None = None) -> None:
        self.host = host
        self.endpoint = endpoint or resolve_endpoint(host)
        self._lanes: list[_Lane] = []
        self._lock = threading.Lock()
        self.host_key: str | None = None
        self.host_key_line: str | None = None  # the verified key as a known_hosts line
        self._jump_clients: list[paramiko.SSHClient] = []  # connections to ProxyJump hosts, closed with ours

    @property
    def connections(self) -> int:
        """How many SSH connections to the host are open now."""
        with self._lock:
            return sum(1 for lane in self._lanes if lane.alive)

    def connect(self) -> None:
        with self._lock:
            if not any(lane.alive for lane in self._live_lanes()):
                self._lanes.append(_Lane(self._open()))

    def _live_lanes(self) -> list[_Lane]:
        """Drop dead connections; refuse to go on if one of them held a VM's lock."""
        dead = [lane for lane in self._lanes if not lane.alive]
        for lane in dead:
            lane.client.close()
        # a dead connection that held a lock is kept until the lock's holder lets go of it
        self._lanes = [lane for lane in self._lanes if lane.alive or lane.locks]
        if any(lane.locks for lane in dead):
            # the VM lock died with the connection: another drtool may start now
            raise HostUnreachable(f"lost the SSH connection to {self.host.name} while holding a VM's lock; "
                                  "stopped so that no other drtool works on it at the same time")
        return self._lanes

    def _known_file(self) -> Path:
        return self.endpoint.known_hosts[0] if self.endpoint.known_hosts else Path("~/.ssh/known_hosts")

    def _open(self) -> paramiko.SSHClient:
        """A new SSH connection to the host (through its jump hosts, if any), its key verified."""
        ep, host = self.endpoint, self.host
        sock: paramiko.ProxyCommand | paramiko.Channel | None = (
            paramiko.ProxyCommand(ep.proxy_command) if ep.proxy_command else None)
        for i, jump in enumerate(ep.jumps):
            nxt = ep.jumps[i + 1] if i + 1 < len(ep.jumps) else ep
            via = self._connect(jump, f"jump host {jump.hostname} ({jump.hostname}:{jump.port}) of {host.name}", sock)
            self._jump_clients.append(via)
            transport = via.get_transport()
            assert transport is not None
            try:
                sock = transport.open_channel("direct-tcpip", (nxt.hostname, nxt.port), ("127.0.0.1", 0),
                                              timeout=host.connect_timeout)
            except (paramiko.SSHException, OSError) as err:
                raise HostUnreachable(f"jump host {jump.hostname} could not reach {nxt.hostname}:{nxt.port} "
                                      f"for {host.name}: {err}",
                                      hint="check that the jump host reaches it and allows TCP forwarding "
                                           "(AllowTcpForwarding in its sshd_config)") from err
        client = self._connect(ep, f"{host.name} ({ep.hostname}:{ep.port})", sock)
        key = client.get_transport().get_remote_server_key()  # type: ignore[union-attr]  # connected above
        self.host_key = key_fingerprint(key)
        name = ep.hostname if ep.port == DEFAULT_SSH_PORT else f"[{ep.hostname}]:{ep.port}"
        self.host_key_line = f"{name} {key.get_name()} {key.get_base64()}"
        return client

    def _connect(self, ep: Endpoint, where: str, sock: object) -> paramiko.SSHClient:
        host = self.host
        client = paramiko.SSHClient()
        _load_host_keys(client, ep)
        client.set_missing_host_key_policy(_RefuseUnknownHostKey(host, ep))
        timeout = ep.connect_timeout
        try:
            client.connect(
                ep.hostname,
                port=ep.port,
                username=ep.user,
                key_filename=list(ep.key_filenames) or None,  # type: ignore[arg-type]  # a list works too
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                allow_agent=ep.allow_agent and not ep.identities_only,  # IdentitiesOnly: the files (or ~/.ssh/id_*)
                look_for_keys=not ep.key_filenames,
                compress=ep.compression,
                sock=sock,  # type: ignore[arg-type]  # a ProxyCommand or a direct-tcpip Channel: both are sockets to paramiko
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as err:
            client.close()
            raise HostKeyError(
                f"host key of {where} has CHANGED: known_hosts has {key_fingerprint(err.expected_key)}, "
                f"the host offered {key_fingerprint(err.key)}; someone may be intercepting the "
                "connection, refusing to connect",
                hint=(
                    "if the host was reinstalled, verify its new key, remove the old one with "
                    f"ssh-keygen -R {shlex.quote(ep.known_hosts_name)} -f {shlex.quote(str(self._known_file()))}"
                    " and add the new one"
                ),
            ) from err
        except paramiko.AuthenticationException as err:
            client.close()
            raise HostUnreachable(
                f"cannot log in to {where} as {ep.user}: {err}",
                hint="check identity_file and user in the inventory, or your ssh-agent",
            ) from err
        except TimeoutError as err:
            client.close()
            raise HostUnreachable(f"{where} did not answer within {timeout:g} s") from err
        except paramiko.SSHException as err:
            client.close()
            raise _ssh_failure(err, where, timeout) from err
        except paramiko.ssh_exception.NoValidConnectionsError as err:
            client.close()
            reasons = sorted({getattr(e, "strerror", None) or str(e) for e in err.errors.values()})
            raise HostUnreachable(f"cannot reach {where}: {'; '.join(reasons)}") from err
        except OSError as err:
            client.close()
            raise HostUnreachable(f"cannot reach {where}: {err.strerror or err}") from err
        transport = client.get_transport()
        assert transport is not None
        if ep.tcp_keepalive and isinstance(transport.sock, socket.socket):
            transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if ep.alive_interval is not None:
            KeepaliveWatch(transport, ep.alive_interval, ep.alive_count_max, ep.hostname).start()
        return client

    def _session(self) -> paramiko.Channel:
        """A new channel on a connection that has room for it, opening a connection if none has."""
        for _ in range(CHANNEL_ATTEMPTS):
            with self._lock:
                lanes = self._live_lanes()
                lane = next((ln for ln in lanes if ln.alive and ln.open_count() + ln.opening < ln.capacity), None)
                if lane is None:
                    lane = _Lane(self._open())
                    lanes.append(lane)
                lane.opening += 1  # a place taken; the round trip itself runs unlocked, beside others
            transport = lane.client.get_transport()
            try:
                if transport is None:
                    raise paramiko.SSHException("the connection closed")
                chan = transport.open_session(timeout=self.host.connect_timeout)
            except paramiko.ChannelException:
                with self._lock:  # the server allows fewer sessions per connection than we assumed
                    lane.opening -= 1
                    lane.capacity = max(1, lane.open_count() + lane.opening)
                continue
            except paramiko.SSHException as err:
                with self._lock:
                    lane.opening -= 1
                raise HostUnreachable(f"{self.host.name}: cannot open an SSH channel: {err}") from err
            with self._lock:
                lane.opening -= 1
                lane.channels.append(chan)
            return chan
        raise HostUnreachable(f"{self.host.name} refused {CHANNEL_ATTEMPTS} SSH channels in a row",
                              hint="check MaxSessions in its sshd_config")

    def hold_lock(self, chan: paramiko.Channel, held: bool) -> None:
        """Note that chan carries (or no longer carries) a VM lock: losing its connection must stop us."""
        with self._lock:
            for lane in self._lanes:
                if held and chan in lane.channels:
                    lane.locks.append(chan)
                elif not held and chan in lane.locks:
                    lane.locks.remove(chan)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        stdin: bytes | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run argv on the host; raise RemoteCommandError on failure when check is set."""
        argv = tuple(str(a) for a in argv)
        timeout = self.host.command_timeout if timeout is None else timeout
        chan = self._session()
        try:
            chan.exec_command(shlex.join(argv))
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = _collect(chan, time.monotonic() + timeout)
            if out is None:
                raise RemoteCommandError(  # argv[0] only: a command line may hold secrets
                    f"{self.host.name}: {argv[0]} did not finish within {timeout:g} s"
                )
            result = CommandResult(argv, chan.recv_exit_status(), out, err or b"")
            transport = chan.get_transport()
            if result.exit_status == -1 and not (transport and transport.is_active()):
                reason = lost_reason(transport)
                raise HostUnreachable(f"{self.host.name}: lost the SSH connection while {argv[0]} ran"
                                      + (f": {reason}" if reason else ""))
        finally:
            chan.close()
        return checked(self.host.name, result) if check else result

    def open_stream(self, argv: Sequence[str]) -> paramiko.Channel:
        """Start argv on the host and hand back its channel as a byte stream (stdin/stdout)."""
        chan = self._session()
        chan.exec_command(shlex.join(str(a) for a in argv))
        return chan

    def close(self) -> None:
        # a connect under way holds the lock until the host answers or its timeout: not waited for long
        locked = self._lock.acquire(timeout=CLOSE_WAIT)
        try:
            lanes, self._lanes = self._lanes, []
        finally:
            if locked:
                self._lock.release()
        for lane in lanes:
            lane.client.close()
        for client in reversed(self._jump_clients):
            client.close()
        self._jump_clients = []


def _load_host_keys(client: paramiko.SSHClient, ep: Endpoint) -> None:
    """The known host keys; with HostKeyAlias, only the alias's, filed under the name paramiko looks up."""
    if ep.host_key_alias is None:
        for path in ep.known_hosts:
            if path.is_file():
                client.load_system_host_keys(str(path))
        return
    known = paramiko.HostKeys()
    for path in ep.known_hosts:
        if path.is_file():
            known.load(str(path))
    name = ep.hostname if ep.port == DEFAULT_SSH_PORT else f"[{ep.hostname}]:{ep.port}"
    for key_type, key in (known.lookup(ep.host_key_alias) or {}).items():
        client.get_host_keys().add(name, key_type, key)


def checked(host_name: str, result: CommandResult) -> CommandResult:
    """The result of a command that succeeded; RemoteCommandError (its last stderr line) if it did not."""
    if not result.ok:
        detail = result.err.strip().splitlines()
        raise RemoteCommandError(f"{host_name}: {result.argv[0]} exited {result.exit_status}"
                                 + (f": {detail[-1]}" if detail else ""))
    return result


def _ssh_failure(err: paramiko.SSHException, where: str, timeout: float) -> HostUnreachable:
    """paramiko's SSHException in words: closed by the peer, no banner in time, no key to log in with."""
    message = str(err).lower()
    cause = err.__cause__ or err.__context__
    if isinstance(cause, (EOFError, ConnectionResetError, BrokenPipeError)):
        return HostUnreachable(f"{where} closed the connection before SSH began (sshd refused us: "
                               "MaxStartups, a firewall, TCP wrappers, or not an SSH server)")
    if "no authentication methods available" in message:
        return HostUnreachable(
            f"cannot log in to {where}: no SSH key to offer (no identity file, and no ssh-agent with keys)",
            hint="set identity_file in the host's entry of the inventory, or load a key into ssh-agent "
                 "(ssh-add) and run drtool where SSH_AUTH_SOCK is set")
    # paramiko's negotiation wait and banner wait share the timeout: either may fire first
    if any(s in message for s in ("banner", "no existing session", "timed out")):
        return HostUnreachable(f"{where} accepted the connection but sent no SSH banner within {timeout:g} s")
    return HostUnreachable(f"SSH to {where} failed: {err}")


def _collect(chan: paramiko.Channel, deadline: float) -> tuple[bytes | None, bytes | None]:
    """Read stdout and stderr together (one unread stream would stall the other)."""
    out, err = bytearray(), bytearray()
    while True:
        while chan.recv_ready():
            out += chan.recv(_READ_CHUNK)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(_READ_CHUNK)
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            return bytes(out), bytes(err)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None
        select.select([chan], [], [], min(remaining, 1.0))


class SshPool:
    """One SshConnection per host name, opened lazily and closed together."""

    def __init__(self, hosts: dict[str, Host]) -> None:
        self._hosts = hosts
        self._conns: dict[str, SshConnection] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> SshConnection:
        with self._lock:
            conn = self._conns.get(name)
            if conn is None:
                conn = self._conns[name] = SshConnection(self._hosts[name])
        conn.connect()
        return conn

    def add_hosts(self, hosts: dict[str, Host]) -> None:
        """Make more hosts reachable (hosts learned during the run, e.g. from a DR host)."""
        with self._lock:
            self._hosts = {**hosts, **self._hosts}

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
