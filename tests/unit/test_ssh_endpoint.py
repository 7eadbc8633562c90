"""resolve_endpoint: ~/.ssh/config applied to an inventory Host, inventory values winning.

Pure: every test passes its own ssh config file; nothing is contacted.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import paramiko
import pytest

from drtool.domain import Host
from drtool.errors import ConfigError, HostKeyError
from drtool.transport.ssh import (
    Endpoint,
    SshConnection,
    _load_host_keys,
    _RefuseUnknownHostKey,
    _ssh_failure,
    resolve_endpoint,
)

SSH_CONFIG = """\
Host web-dr
  HostName 10.0.0.5
  Port 2222
  User backup
  IdentityFile ~/.ssh/k
  UserKnownHostsFile /etc/kh
"""

GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(SSH_CONFIG)
    return path


def test_alias_takes_every_value_from_the_ssh_config(ssh_config: Path) -> None:
    ep = resolve_endpoint(Host("dr", "web-dr"), ssh_config_path=ssh_config)
    assert ep == Endpoint(
        hostname="10.0.0.5",
        port=2222,
        user="backup",
        key_filenames=(str(Path("~/.ssh/k").expanduser()),),
        known_hosts=(Path("/etc/kh"), GLOBAL_KNOWN_HOSTS),
        proxy_command=None,
    )
    assert ep.known_hosts_name == "[10.0.0.5]:2222"


def test_inventory_values_win_over_the_ssh_config(ssh_config: Path, tmp_path: Path) -> None:
    key, known = tmp_path / "inv_key", tmp_path / "inv_known_hosts"
    host = Host("dr", "web-dr", port=2200, user="admin", identity_file=key, known_hosts=known)
    ep = resolve_endpoint(host, ssh_config_path=ssh_config)
    assert ep.hostname == "10.0.0.5"  # the alias still resolves: only HostName came from ssh config
    assert ep.port == 2200
    assert ep.user == "admin"
    assert ep.key_filenames == (str(key),)  # the ssh config's IdentityFile is not added
    assert ep.known_hosts == (known,)  # only the inventory's file: neither /etc/kh nor the global one


def test_inventory_port_22_wins_over_a_config_port(ssh_config: Path) -> None:
    ep = resolve_endpoint(Host("dr", "web-dr", port=22), ssh_config_path=ssh_config)
    assert ep.port == 22
    assert ep.known_hosts_name == "10.0.0.5"


def test_a_host_the_ssh_config_does_not_mention_gets_the_defaults(ssh_config: Path) -> None:
    ep = resolve_endpoint(Host("kvm1", "kvm1.example.net"), ssh_config_path=ssh_config)
    assert (ep.hostname, ep.port, ep.user) == ("kvm1.example.net", 22, getpass.getuser())
    assert ep.key_filenames == ()
    assert ep.known_hosts == (Path("~/.ssh/known_hosts").expanduser(), GLOBAL_KNOWN_HOSTS)


def test_defaults_without_any_ssh_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "drtool-test-user")  # getpass.getuser() reads LOGNAME first
    ep = resolve_endpoint(Host("kvm1", "192.0.2.7"), ssh_config_path=tmp_path / "absent")
    assert ep == Endpoint(
        hostname="192.0.2.7",
        port=22,
        user="drtool-test-user",
        key_filenames=(),
        known_hosts=(Path("~/.ssh/known_hosts").expanduser(), GLOBAL_KNOWN_HOSTS),
        proxy_command=None,
    )
    assert ep.known_hosts_name == "192.0.2.7"


@pytest.mark.parametrize(
    ("port", "expected"),
    [(22, "h"), (2222, "[h]:2222"), (1, "[h]:1")],
)
def test_known_hosts_name(port: int, expected: str) -> None:
    assert Endpoint("h", port, "u", (), ()).known_hosts_name == expected


def test_proxy_command_comes_from_the_ssh_config(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host jumped\n  ProxyCommand ssh -W %h:%p bastion\n")
    ep = resolve_endpoint(Host("j", "jumped"), ssh_config_path=cfg)
    assert ep.proxy_command == "ssh -W jumped:22 bastion"


def test_quoted_known_hosts_path_with_a_space(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text('Host q\n  UserKnownHostsFile "/etc/a b/kh" /etc/kh2\n')
    ep = resolve_endpoint(Host("q", "q"), ssh_config_path=cfg)
    assert ep.known_hosts == (Path("/etc/a b/kh"), Path("/etc/kh2"), GLOBAL_KNOWN_HOSTS)


def test_proxy_jump_hosts_are_resolved_through_the_ssh_config_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host behind\n  HostName 10.9.0.2\n  ProxyJump ops@bastion:2200,inner\n"
                   "Host bastion\n  HostName 192.0.2.1\n  IdentityFile /keys/bastion\n"
                   "Host inner\n  HostName 10.9.0.1\n  User jump\n")
    key = tmp_path / "inv_key"
    ep = resolve_endpoint(Host("dr", "behind", identity_file=key), ssh_config_path=cfg)
    assert ep.hostname == "10.9.0.2" and ep.proxy_command is None
    assert [(j.hostname, j.port, j.user) for j in ep.jumps] == [("192.0.2.1", 2200, "ops"), ("10.9.0.1", 22, "jump")]
    assert ep.jumps[0].key_filenames == ("/keys/bastion",)  # the jump host's own key from the config...
    assert ep.jumps[1].key_filenames == (str(key),)  # ...else the inventory's identity_file


def test_a_jump_host_with_its_own_proxy_jump_comes_first(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host c\n  ProxyJump b\nHost b\n  ProxyJump a\n")
    assert [j.hostname for j in resolve_endpoint(Host("c", "c"), ssh_config_path=cfg).jumps] == ["a", "b"]
    cfg.write_text("Host loop\n  ProxyJump loop\n")
    with pytest.raises(ConfigError, match="more than"):
        resolve_endpoint(Host("l", "loop"), ssh_config_path=cfg)


def test_proxy_jump_none_and_ipv6_forms(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host direct\n  ProxyJump none\nHost v6\n  ProxyJump ssh://u@[2001:db8::1]:2022\n")
    assert resolve_endpoint(Host("d", "direct"), ssh_config_path=cfg).jumps == ()
    [jump] = resolve_endpoint(Host("v", "v6"), ssh_config_path=cfg).jumps
    assert (jump.hostname, jump.port, jump.user) == ("2001:db8::1", 2022, "u")


@pytest.mark.parametrize("line", ["CertificateFile /c", "IdentityAgent /run/agent",
                                  "Ciphers aes128-ctr", "AddressFamily inet6", "ConnectionAttempts 3",
                                  "PubkeyAuthentication no", "Include ~/.ssh/more.conf", "RekeyLimit 1G",
                                  "CanonicalizeHostname yes\n  CanonicalDomains example.net\n  ProxyJump b",
                                  "SomeFutureOption yes",
                                  "ProxyCommand nc %h %p\n  ProxyJump b"])
def test_an_option_drtool_cannot_honour_is_an_error(tmp_path: Path, line: str) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host odd\n  {line}\n")
    with pytest.raises(ConfigError) as err:
        resolve_endpoint(Host("kvm9", "odd"), ssh_config_path=cfg)
    assert "kvm9" in err.value.message and err.value.exit_code == 2


def test_identities_only_and_global_known_hosts_are_honoured(tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host h\n  IdentitiesOnly yes\n  GlobalKnownHostsFile /etc/ssh/other_known\n")
    ep = resolve_endpoint(Host("h", "h"), ssh_config_path=cfg)
    assert ep.identities_only and ep.known_hosts[-1] == Path("/etc/ssh/other_known")


def _raised_from(cause: BaseException, message: str) -> paramiko.SSHException:
    try:
        try:
            raise cause
        except BaseException:
            raise paramiko.SSHException(message)  # as paramiko does: inside its except
    except paramiko.SSHException as err:
        return err


def test_ssh_failures_in_words() -> None:
    closed = _ssh_failure(_raised_from(EOFError(), "Error reading SSH protocol banner"), "kvm1 (h:22)", 10)
    assert "closed the connection" in closed.message and "banner" not in closed.message
    slow = _ssh_failure(_raised_from(TimeoutError(), "Error reading SSH protocol banner"), "kvm1 (h:22)", 10)
    assert "sent no SSH banner within 10 s" in slow.message
    nokey = _ssh_failure(paramiko.SSHException("No authentication methods available"), "kvm1 (h:22)", 10)
    assert "no SSH key" in nokey.message and "identity_file" in (nokey.hint or "") and "ssh-add" in (nokey.hint or "")


def _endpoint(tmp_path: Path, lines: str, host: Host | None = None) -> Endpoint:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host h\n{lines}")
    return resolve_endpoint(host or Host("kvm1", "h"), ssh_config_path=cfg)


def test_timeouts_keepalives_and_flags_come_from_the_ssh_config(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path, "  ConnectTimeout 4\n  ServerAliveInterval 2\n  ServerAliveCountMax 5\n"
                             "  TCPKeepAlive no\n  Compression yes\n  IdentityAgent none\n")
    assert (ep.connect_timeout, ep.alive_interval, ep.alive_count_max) == (4, 2, 5)
    assert (ep.tcp_keepalive, ep.compression, ep.allow_agent) == (False, True, False)
    assert _endpoint(tmp_path, "  ServerAliveInterval 1m\n").alive_interval == 60


def test_defaults_keepalive_every_15_s_dead_after_3_and_serveraliveinterval_0_turns_it_off(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path, "  User u\n")
    assert (ep.connect_timeout, ep.alive_interval, ep.alive_count_max, ep.tcp_keepalive) == (10, 15, 3, True)
    assert _endpoint(tmp_path, "  ServerAliveInterval 0\n").alive_interval is None


def test_the_inventory_connect_timeout_wins_over_connecttimeout(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path, "  ConnectTimeout 4\n", Host("kvm1", "h", connect_timeout=7))
    assert ep.connect_timeout == 7


@pytest.mark.parametrize(("line", "words"), [("ServerAliveCountMax 0", "ServerAliveCountMax"),
                                             ("ConnectTimeout soon", "connecttimeout 'soon' is not a time"),
                                             ("TCPKeepAlive maybe", "tcpkeepalive 'maybe' is not yes or no")])
def test_a_bad_value_is_an_error_naming_the_option(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.lower().replace("(", r"\(")):
        _endpoint(tmp_path, f"  {line}\n")


def test_options_about_what_drtool_never_does_and_ignoreunknown_are_accepted(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path, "  ForwardAgent yes\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%r@%h:%p\n"
                             "  SendEnv LANG\n  GSSAPIAuthentication yes\n  IgnoreUnknown UseFuture*\n"
                             "  UseFutureThing yes\n")
    assert ep.hostname == "h"


def test_host_key_alias_names_the_key_and_only_the_alias_key_is_trusted(tmp_path: Path) -> None:
    alias_key, address_key = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    known = tmp_path / "known_hosts"
    known.write_text(f"vip-b ssh-rsa {alias_key.get_base64()}\n[10.0.0.9]:2222 ssh-rsa {address_key.get_base64()}\n")
    ep = _endpoint(tmp_path, "  HostName 10.0.0.9\n  Port 2222\n  HostKeyAlias vip-b\n",
                   Host("kvm1", "h", known_hosts=known))
    assert ep.host_key_alias == "vip-b" and ep.known_hosts_name == "vip-b"
    client = paramiko.SSHClient()
    _load_host_keys(client, ep)
    assert client.get_host_keys().lookup("[10.0.0.9]:2222") == {"ssh-rsa": alias_key}
    assert not client._system_host_keys.keys()  # the address's own entry is not loaded at all


def test_weaker_host_key_checking_is_not_followed_and_the_refusal_says_so(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path, "  StrictHostKeyChecking accept-new\n")
    with pytest.raises(HostKeyError) as err:
        _RefuseUnknownHostKey(Host("kvm1", "h"), ep).missing_host_key(paramiko.SSHClient(), "h",
                                                                      paramiko.RSAKey.generate(1024))
    assert "does not follow StrictHostKeyChecking accept-new" in err.value.message
    assert _endpoint(tmp_path, "  StrictHostKeyChecking yes\n").weaker_host_key_checking is None


def test_a_top_level_include_is_read_and_what_follows_it_stays_global(tmp_path: Path) -> None:
    conf_d = tmp_path / "config.d"
    conf_d.mkdir()
    (conf_d / "10-dr.conf").write_text("Host dr-*\n  User backup\n  Port 2200\n")
    (conf_d / "20-other.conf").write_text("Host other\n  User nobody\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Include {conf_d}/*.conf {tmp_path}/absent.conf\nServerAliveInterval 7\n"
                   "Host dr-b\n  HostName 10.0.0.7\n")
    ep = resolve_endpoint(Host("b", "dr-b"), ssh_config_path=cfg)
    assert (ep.hostname, ep.user, ep.port) == ("10.0.0.7", "backup", 2200)
    assert ep.alive_interval == 7  # after the included files' Host blocks: still for every host
    assert resolve_endpoint(Host("o", "other"), ssh_config_path=cfg).alive_interval == 7


class _Captured(Exception):
    pass


def _connect_kwargs(monkeypatch: pytest.MonkeyPatch, ep: Endpoint) -> dict:
    seen: dict = {}

    def connect(self: paramiko.SSHClient, hostname: str, **kwargs: object) -> None:
        seen.update(kwargs, hostname=hostname)
        raise _Captured

    monkeypatch.setattr(paramiko.SSHClient, "connect", connect)
    with pytest.raises(_Captured):
        SshConnection(Host("kvm1", "h"), ep).connect()
    return seen


def test_the_options_reach_paramiko(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ep = _endpoint(tmp_path, "  ConnectTimeout 4\n  Compression yes\n  IdentitiesOnly yes\n")
    seen = _connect_kwargs(monkeypatch, ep)
    assert (seen["timeout"], seen["banner_timeout"], seen["auth_timeout"]) == (4, 4, 4)
    assert seen["compress"] is True
    assert seen["allow_agent"] is False and seen["look_for_keys"] is True  # ~/.ssh/id_*, never the agent's keys
    seen = _connect_kwargs(monkeypatch, _endpoint(tmp_path, "  User u\n"))
    assert seen["allow_agent"] is True and seen["compress"] is False and seen["timeout"] == 10
