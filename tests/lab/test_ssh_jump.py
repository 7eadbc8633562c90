"""SSH as operators have it: ProxyJump in ~/.ssh/config, through the lab's site-a to site-b's site link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drtool.domain import Host
from drtool.errors import ExitCode, HostUnreachable
from drtool.lab import Lab
from drtool.transport.ssh import SshConnection, resolve_endpoint

from .test_hosts_status import fingerprint, host_key_pub

pytestmark = pytest.mark.lab


def _drtool(home: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}  # ~/.ssh/config is the test's
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args], check=False,
                          capture_output=True, text=True, timeout=120, env=env)


def _setup(lab: Lab, tmp_path: Path, jump_line: str) -> tuple[Path, Path, str]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    behind = lab.peer_address("site-a", "site-b")  # site-b on its site link: only site-a reaches it
    (home / ".ssh" / "config").write_text(
        f"Host jump\n  HostName {lab.address('site-a')}\n  Port {lab.port}\n  User {lab.user}\n"
        f"Host behind\n  HostName {behind}\n{jump_line}"
    )
    config = tmp_path / "drtool.toml"
    config.write_text(
        f'[hosts.dr]\naddress = "behind"\nport = {lab.port}\nuser = "{lab.user}"\n'
        f'identity_file = "{lab.identity_file}"\nknown_hosts = "{lab.known_hosts}"\nconnect_timeout = 3\n'
    )
    return home, config, behind


def test_proxy_jump_reaches_a_host_only_the_jump_host_reaches(lab: Lab, tmp_path: Path) -> None:
    home, config, behind = _setup(lab, tmp_path, "  ProxyJump jump\n")
    assert not lab.can_connect(None, behind, lab.port), "the direct path must be blocked for this test"
    assert lab.can_connect("site-a", behind, lab.port)

    result = _drtool(home, config, "hosts", "check", "dr", "--json")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    [host] = json.loads(result.stdout)["hosts"]
    assert host["reachable"] is True and host["address"] == "behind"
    assert host["host_key"] == fingerprint(host_key_pub(lab, "site-b"))  # site-b itself, verified
    whoami = _drtool(home, config, "hosts", "check", "dr")
    assert whoami.returncode == ExitCode.OK and " yes " in whoami.stdout

    # without the jump, the same alias cannot be reached: the jump was what made it work
    home, config, _ = _setup(lab, tmp_path, "")
    direct = _drtool(home, config, "hosts", "check", "dr", "--json")
    assert direct.returncode == ExitCode.UNREACHABLE, direct.stdout + direct.stderr


def test_an_ssh_option_drtool_cannot_honour_is_refused(lab: Lab, tmp_path: Path) -> None:
    home, config, _ = _setup(lab, tmp_path, "  ProxyJump jump\n  Ciphers aes128-ctr\n")
    result = _drtool(home, config, "hosts", "check", "dr")
    assert result.returncode == ExitCode.USAGE, result.stdout + result.stderr
    assert "ciphers" in result.stderr and "cannot honour" in result.stderr


def test_host_key_alias_checks_the_key_filed_under_the_alias(lab: Lab, tmp_path: Path) -> None:
    home, config, _ = _setup(lab, tmp_path, "  ProxyJump jump\n  HostKeyAlias site-b-vip\n")
    result = _drtool(home, config, "hosts", "check", "dr")  # the lab's known_hosts has no site-b-vip
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    assert "unknown host key" in result.stderr and "site-b-vip" in result.stderr

    kind, key = host_key_pub(lab, "site-b").read_text().split()[:2]
    known = tmp_path / "alias_known_hosts"  # only the alias: site-b's own entries are not there
    kept = [line for line in lab.known_hosts.read_text().splitlines(keepends=True) if key not in line]
    known.write_text("".join(kept) + f"site-b-vip {kind} {key}\n")
    config.write_text(config.read_text().replace(str(lab.known_hosts), str(known)))
    result = _drtool(home, config, "hosts", "check", "dr", "--json")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert json.loads(result.stdout)["hosts"][0]["host_key"] == fingerprint(host_key_pub(lab, "site-b"))


def test_server_alive_declares_a_silent_host_dead_instead_of_hanging(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host *\n  ServerAliveInterval 2\n  ServerAliveCountMax 2\n")
    host = Host("site-b", lab.address("site-b"), port=lab.port, user=lab.user, identity_file=lab.identity_file,
                known_hosts=lab.known_hosts, command_timeout=120)
    conn = SshConnection(host, resolve_endpoint(host, cfg))
    outcome: list[BaseException | None] = []

    def sleep_remotely() -> None:
        try:
            conn.run(["sleep", "100"])
            outcome.append(None)
        except Exception as err:  # the test inspects what came
            outcome.append(err)

    try:
        assert conn.run(["true"]).ok
        sleeper = threading.Thread(target=sleep_remotely, daemon=True)
        sleeper.start()
        time.sleep(2)
        lab.isolate("site-b")  # its packets are dropped: TCP alone would notice nothing for many minutes
        silent_from = time.monotonic()
        sleeper.join(60)
        elapsed = time.monotonic() - silent_from
    finally:
        lab.unisolate("site-b")
        conn.close()
    assert outcome and isinstance(outcome[0], HostUnreachable), outcome
    assert "lost the SSH connection while sleep ran: no answer to 2 keepalives in 4 s" in outcome[0].message
    assert elapsed < 2 * (2 + 1) + 4, elapsed  # interval * (count + 1), and slack for a loaded machine
