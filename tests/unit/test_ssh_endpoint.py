"""resolve_endpoint: ~/.ssh/config applied to an inventory Host, inventory values winning.

Pure: every test passes its own ssh config file; nothing is contacted.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import paramiko
import pytest

from drtool.domain import Host
from drtool.errors import ConfigError
from drtool.transport.ssh import Endpoint, _ssh_failure, resolve_endpoint

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


@pytest.mark.parametrize("line", ["HostKeyAlias other", "CertificateFile /c", "IdentityAgent /run/agent",
                                  "Ciphers aes128-ctr", "AddressFamily inet6",
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
