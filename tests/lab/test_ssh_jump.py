"""SSH as operators have it: ProxyJump in ~/.ssh/config, through the lab's site-a to site-b's site link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drtool.errors import ExitCode
from drtool.lab import Lab

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
    home, config, _ = _setup(lab, tmp_path, "  ProxyJump jump\n  HostKeyAlias elsewhere\n")
    result = _drtool(home, config, "hosts", "check", "dr")
    assert result.returncode == ExitCode.USAGE, result.stdout + result.stderr
    assert "hostkeyalias" in result.stderr and "cannot honour" in result.stderr
