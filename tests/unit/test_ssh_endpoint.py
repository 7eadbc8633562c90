"""resolve_endpoint: ~/.ssh/config applied to an inventory Host, inventory values winning.

Pure: every test passes its own ssh config file; nothing is contacted.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from drtool.domain import Host
from drtool.transport.ssh import Endpoint, resolve_endpoint

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
