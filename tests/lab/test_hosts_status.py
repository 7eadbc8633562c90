"""`drtool hosts check` and `drtool status` as a user runs them, against the real lab.

The CLI runs as a subprocess (`python -m drtool --config ...`); expected values are
computed independently (ssh-keygen for fingerprints, the local QEMU tools for
versions: lab hosts share this machine's filesystem).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from drtool.errors import ExitCode
from drtool.lab import Lab, LabVm, dump_toml

pytestmark = pytest.mark.lab

MiB = 1 << 20
QEMU_TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-storage-daemon")

HOST_KEYS = {"name", "address", "reachable", "host_key", "tools", "replica_space", "qemu_access", "error",
             "exit_code"}
TOOL_KEYS = {"name", "version", "detail"}
ENVELOPE = {"schema_version", "command"}  # every --json answer (cli/output.py)
SPACE_KEYS = {"vm", "replica_dir", "measured_on", "available_bytes", "error"}
VM_KEYS = {"name", "host", "dr_host", "run_state", "protection", "disks", "mode", "transport", "error", "exit_code",
           "reason", "state", "newest_point_age", "drill", "libvirt"}
DISK_KEYS = {
    "device", "node_name", "format", "virtual_size", "image", "selected", "replication", "lag_bytes", "reason",
    "protected",
}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    """The environment, without a terminal size: drtool is piped here, as under cron.

    (The pytest process's C environment may hold COLUMNS=80 set by readline, which
    os.environ does not show but a child would inherit; tables would then be cut to 80.)
    """
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def drtool(config: Path, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drtool", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip


def drtool_json(config: Path, *args: str, **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = drtool(config, *args, **kwargs)
    try:
        return result, json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (exit {result.returncode}): {result.stdout!r} stderr: {result.stderr!r}")


def host_key_pub(lab: Lab, host: str) -> Path:
    return lab.dir / "run" / host / "ssh_host_ed25519_key.pub"


def fingerprint(pub: Path) -> str:
    """`ssh-ed25519 SHA256:...` of a public key file, as ssh-keygen computes it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    _bits, digest, *_, kind = out.split()  # "256 SHA256:xxx comment (ED25519)"
    assert kind == "(ED25519)", out
    return f"ssh-ed25519 {digest}"


def local_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\S+)", out)
    assert match, out
    return match.group(1)


def hosts_config(lab: Lab, path: Path, vms: dict[str, dict[str, Any]] | None = None, **host_settings: Any) -> Path:
    """The lab's hosts (with extra settings for each) and hand-written [vms] tables."""
    data = tomllib.loads(lab.write_config(path, {}).read_text())
    for table in data["hosts"].values():
        table.update(host_settings)
    data["vms"] = vms or {}
    path.write_text(dump_toml(data))
    return path


def with_known_hosts(config: Path, known_hosts: Path) -> Path:
    data = tomllib.loads(config.read_text())
    for table in data["hosts"].values():
        table["known_hosts"] = str(known_hosts)
    out = config.with_name("drtool-kh.toml")
    out.write_text(dump_toml(data))
    return out


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drtool: error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------- hosts check


def test_hosts_check_table(lab: Lab, lab_config: Path) -> None:
    result = drtool(lab_config, "hosts", "check")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    for host in ("site-a", "site-b"):
        row = next(line for line in out.splitlines() if f" {host} " in line)  # one line per host
        assert " yes " in row and fingerprint(host_key_pub(lab, host)).split()[1][:15] + "…" in row, row
        assert f"ok (qemu {local_version('qemu-system-x86_64')})" in row, row
    assert "missing" not in out and "Traceback" not in out


@pytest.mark.parametrize("json_first", [True, False], ids=["drtool--json-hosts-check", "hosts-check--json"])
def test_hosts_check_json(lab: Lab, lab_vm: LabVm, lab_config: Path, json_first: bool) -> None:
    args = ("--json", "hosts", "check") if json_first else ("hosts", "check", "--json")
    result, data = drtool_json(lab_config, *args)
    assert result.returncode == ExitCode.OK and result.stderr == "", result.stderr
    assert set(data) == {*ENVELOPE, "hosts"} and data["schema_version"] == 1
    hosts = by_name(data["hosts"])
    assert list(hosts) == ["site-a", "site-b"]
    versions = {tool: local_version(tool) for tool in QEMU_TOOLS}
    for name, host in hosts.items():
        assert set(host) == HOST_KEYS
        assert host["address"] == lab.address(name)
        assert (host["reachable"], host["exit_code"], host["error"]) == (True, 0, None)
        assert host["host_key"] == fingerprint(host_key_pub(lab, name))
        tools = by_name(host["tools"])
        assert {*QEMU_TOOLS, "python3"} <= set(tools)  # hosts.REQUIRED_TOOLS may list more
        assert all(set(t) == TOOL_KEYS and t["version"] for t in tools.values()), tools
        assert {tool: tools[tool]["version"] for tool in QEMU_TOOLS} == versions
        assert re.fullmatch(r"3\.\d+\.\d+\S*", tools["python3"]["version"] or ""), tools["python3"]
    assert hosts["site-a"]["replica_space"] == []  # no VM has site-a as its DR host
    [space] = hosts["site-b"]["replica_space"]
    assert set(space) == SPACE_KEYS
    replica_dir = str(lab.host_dir("site-b") / "replicas" / lab_vm.name)
    assert (space["vm"], space["replica_dir"], space["error"]) == (lab_vm.name, replica_dir, None)
    measured = Path(space["measured_on"])  # the nearest existing directory at or above replica_dir
    assert measured.is_dir() and (measured == Path(replica_dir) or measured in Path(replica_dir).parents)
    assert not any(p.exists() for p in Path(replica_dir).parents if measured in p.parents)
    st = os.statvfs(measured)
    assert abs(space["available_bytes"] - st.f_bavail * st.f_frsize) < 256 * MiB


def test_hosts_check_one_host(lab: Lab, lab_vm: LabVm, lab_config: Path) -> None:
    result, data = drtool_json(lab_config, "hosts", "check", "site-b", "site-b", "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    assert [h["name"] for h in data["hosts"]] == ["site-b"]
    unknown = drtool(lab_config, "hosts", "check", "site-c")
    assert unknown.returncode == ExitCode.USAGE and "unknown host 'site-c'" in one_line_error(unknown.stderr)


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize("json_first", [True, False], ids=["drtool--json-status", "status--json"])
def test_status_json_of_a_running_vm(lab_vm: LabVm, lab_config: Path, json_first: bool) -> None:
    args = ("--json", "status", lab_vm.name) if json_first else ("status", "--json")
    result, data = drtool_json(lab_config, *args)
    # unprotected: a problem for monitoring (exit 1), told in the JSON, not on stderr
    assert result.returncode == ExitCode.FAILED and result.stderr == "", result.stderr
    assert data["problems"] == [{"vm": lab_vm.name, "problem": f"not protected: run drtool protect {lab_vm.name}"}]
    [vm] = data["vms"]
    assert (vm["name"], vm["host"], vm["dr_host"]) == (lab_vm.name, "site-a", "site-b")
    assert vm["run_state"] == "running"
    assert vm["protection"] == "unprotected"
    assert (vm["error"], vm["exit_code"], vm["reason"], vm["drill"]) == (None, 0, None, None)
    [disk] = vm["disks"]
    assert disk["device"] == "vd0"
    assert disk["format"] == "qcow2"
    assert disk["virtual_size"] == 64 * MiB
    assert disk["image"] == str(lab_vm.disks["vd0"])
    assert disk["node_name"] == "vd0-fmt"  # the lab's -blockdev node-name
    assert disk["selected"] is True  # no disks listed in the inventory: every disk is selected
    assert disk["protected"] is False  # but not replicated


def test_status_table_of_a_running_vm(lab_vm: LabVm, lab_config: Path) -> None:
    result = drtool(lab_config, "status", lab_vm.name)  # a VM named: its disks too
    assert result.returncode == ExitCode.FAILED, result.stderr
    assert result.stderr == f"drtool: error: {lab_vm.name}: not protected: run drtool protect {lab_vm.name}\n"
    row = next(line for line in result.stdout.splitlines() if lab_vm.name in line)
    for cell in ("site-a", "running", "unprotected", "vd0", "qcow2", "64.0 MiB", str(lab_vm.disks["vd0"])):
        assert f" {cell} " in row, (cell, row)


def test_status_json_schema_contract(lab: Lab, lab_vm: LabVm, lab_config: Path, tmp_path: Path) -> None:
    """The exact keys scripts may rely on: per VM and per disk, for a reachable and an unreachable VM."""
    absent = hosts_config(
        lab,
        tmp_path / "absent.toml",
        {
            "gone": {
                "host": "site-a", "qmp_socket": str(lab.host_dir("site-a") / "gone" / "drtool.qmp"),
                "dr_host": "site-b", "replica_dir": str(lab.host_dir("site-b") / "replicas" / "gone"),
            }
        },
    )  # fmt: skip
    result, data = drtool_json(lab_config, "status", "--json")
    assert result.returncode == ExitCode.FAILED  # not protected
    assert set(data) == {*ENVELOPE, "vms", "problems"} and data["schema_version"] == 1
    [vm] = data["vms"]
    assert set(vm) == VM_KEYS
    assert vm["disks"] and all(set(d) == DISK_KEYS for d in vm["disks"])
    types = {k: type(v).__name__ for k, v in vm.items()}
    assert types == {
        "name": "str", "host": "str", "dr_host": "str", "run_state": "str", "protection": "str",
        "disks": "list", "mode": "NoneType", "transport": "NoneType", "error": "NoneType", "exit_code": "int",
        "reason": "NoneType", "state": "NoneType", "newest_point_age": "NoneType", "drill": "NoneType",
        "libvirt": "NoneType",
    }  # fmt: skip  (mode, transport, state and the point's age are null while the VM is unprotected)
    assert {k: type(v).__name__ for k, v in vm["disks"][0].items()} == {
        "device": "str", "node_name": "str", "format": "str", "virtual_size": "int", "image": "str",
        "selected": "bool", "replication": "str", "lag_bytes": "NoneType", "reason": "NoneType", "protected": "bool",
    }  # fmt: skip
    result, data = drtool_json(absent, "status", "--json")
    assert result.returncode == ExitCode.UNREACHABLE
    [gone] = data["vms"]
    assert set(gone) == VM_KEYS
    assert (gone["run_state"], gone["disks"], gone["exit_code"]) == (None, [], 3)
    assert "cannot reach the QMP monitor" in gone["error"]


def test_status_of_a_vm_left_in_prelaunch(lab: Lab, tmp_path: Path) -> None:
    vm = lab.add_vm("pre-status", "site-a", {"vd0": "16M"}, start=False)
    try:
        config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
        result, data = drtool_json(config, "status", "--json")
        assert result.returncode == ExitCode.FAILED, result.stderr  # not protected
        [status] = data["vms"]
        assert status["run_state"] == "prelaunch"
        assert [(d["device"], d["virtual_size"]) for d in status["disks"]] == [("vd0", 16 * MiB)]
        table = drtool(config, "status")
        assert table.returncode == ExitCode.FAILED
        assert " prelaunch " in next(line for line in table.stdout.splitlines() if vm.name in line)
        assert vm.status() == "prelaunch"  # looking did not start it
    finally:
        vm.kill()


# --------------------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_and_nothing_is_accepted(lab: Lab, lab_vm: LabVm, lab_config: Path) -> None:
    empty = lab_config.parent / "known_hosts_empty"
    empty.write_bytes(b"")
    config = with_known_hosts(lab_config, empty)
    result, data = drtool_json(config, "hosts", "check", "site-a", "--json")
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    [host] = data["hosts"]
    assert (host["reachable"], host["host_key"], host["tools"], host["exit_code"]) == (False, None, [], 3)
    message = host["error"]
    assert "unknown host key" in message and fingerprint(host_key_pub(lab, "site-a")) in message
    assert f"ssh-keyscan -p 22 {lab.address('site-a')} >> {empty}" in message
    table = drtool(config, "hosts", "check", "site-a")
    assert table.returncode == ExitCode.UNREACHABLE and "unknown host key" in table.stdout
    status = drtool(config, "status")
    assert status.returncode == ExitCode.UNREACHABLE and "unknown host key" in status.stdout
    assert empty.read_bytes() == b""  # nothing was accepted on first sight
    assert not Path("~/.ssh/known_hosts").expanduser().exists() or lab.address("site-a") not in Path(
        "~/.ssh/known_hosts"
    ).expanduser().read_text()


def test_unknown_host_key_is_one_line_on_stderr(lab: Lab, lab_config: Path) -> None:
    empty = lab_config.parent / "known_hosts_empty"
    empty.write_bytes(b"")
    result = drtool(with_known_hosts(lab_config, empty), "hosts", "check", "site-a")
    assert result.returncode == ExitCode.UNREACHABLE
    line = one_line_error(result.stderr)
    assert "unknown host key" in line and "ssh-keyscan" in line


def test_changed_host_key_is_refused(lab: Lab, lab_config: Path) -> None:
    other = lab_config.parent / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    keytype, blob = other.with_name(other.name + ".pub").read_text().split()[:2]
    changed = lab_config.parent / "known_hosts_changed"
    changed.write_text(f"{lab.address('site-a')} {keytype} {blob}\n")
    before = changed.read_bytes()
    result, data = drtool_json(with_known_hosts(lab_config, changed), "--json", "hosts", "check", "site-a")
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    [host] = data["hosts"]
    assert (host["reachable"], host["host_key"], host["exit_code"]) == (False, None, 3)
    message = host["error"]
    assert "CHANGED" in message
    assert f"known_hosts has {fingerprint(other.with_name(other.name + '.pub'))}" in message
    assert f"the host offered {fingerprint(host_key_pub(lab, 'site-a'))}" in message
    assert "ssh-keygen -R" in message
    assert changed.read_bytes() == before


# --------------------------------------------------------------------------- metacharacters

CANARIES = ("PWNED", "PWNED2", "PWNED3", "PWNED4", "PWNED5")


def canaries_found(lab: Lab, *places: Path) -> list[Path]:
    found = [p for name in CANARIES for p in lab.dir.rglob(name)]
    home = Path(pwd.getpwnam(lab.user).pw_dir)  # where the SSH session's commands would run
    return found + [place / name for place in (home, *places) for name in CANARIES if (place / name).exists()]


def test_paths_with_shell_metacharacters_pass_intact(lab: Lab, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    assert canaries_found(lab, work, Path.cwd()) == []
    # The VM's directory (hence its QMP socket and image paths) is named after it.
    vm = lab.add_vm("q d'x;touch PWNED$(touch PWNED2)`touch PWNED4`\"", "site-a", {"vd0": "8M"})
    replica_dir = lab.host_dir("site-b") / "r;x $(touch PWNED3)`touch PWNED5`'q\" y"
    replica_dir.mkdir(parents=True)
    try:
        config = hosts_config(
            lab,
            tmp_path / "drtool.toml",
            {"meta": {"host": "site-a", "qmp_socket": str(vm.qmp_socket), "dr_host": "site-b",
                      "replica_dir": str(replica_dir)}},
        )  # fmt: skip
        result, data = drtool_json(config, "status", "--json", cwd=work)
        assert result.returncode == ExitCode.FAILED, result.stdout + result.stderr  # not protected, no other error
        [status] = data["vms"]
        assert status["run_state"] == "running"
        assert [d["image"] for d in status["disks"]] == [str(vm.disks["vd0"])]

        result, data = drtool_json(config, "hosts", "check", "site-b", "--json", cwd=work)
        assert result.returncode == ExitCode.OK, result.stdout + result.stderr
        [space] = data["hosts"][0]["replica_space"]
        assert space["replica_dir"] == space["measured_on"] == str(replica_dir)  # the dir itself, intact
        assert space["error"] is None and space["available_bytes"] > 0
    finally:
        vm.stop()
    assert canaries_found(lab, work, Path.cwd()) == []


# --------------------------------------------------------------------------- unreachable hosts


def test_frozen_sshd_fails_within_connect_timeout(lab: Lab, lab_vm: LabVm, tmp_path: Path) -> None:
    config = hosts_config(lab, tmp_path / "drtool.toml", connect_timeout=2)
    lab.freeze_sshd("site-b")  # TCP is accepted, no SSH banner ever comes
    try:
        t0 = time.monotonic()
        result, data = drtool_json(config, "hosts", "check", "site-b", "--json", timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        lab.thaw_sshd("site-b")
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    assert elapsed < 2 + 3, elapsed
    [host] = data["hosts"]
    assert (host["name"], host["reachable"], host["exit_code"]) == ("site-b", False, 3)
    error = host["error"]
    assert f"site-b ({lab.address('site-b')}:22)" in error
    assert drtool(config, "hosts", "check", "site-b").returncode == ExitCode.OK  # thawed: back
    assert "did not answer" in error or "sent no SSH banner within 2 s" in error, error


def test_isolated_hosts_are_unreachable_at_once(lab: Lab, lab_vm: LabVm, lab_config: Path) -> None:
    lab.isolate("site-b")
    try:
        t0 = time.monotonic()
        result, data = drtool_json(lab_config, "hosts", "check", "--json", timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        lab.unisolate("site-b")
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    assert elapsed < 7, elapsed  # no route: refused at once, not after connect_timeout (10 s); start-up and load count too
    hosts = by_name(data["hosts"])
    assert (hosts["site-a"]["reachable"], hosts["site-a"]["exit_code"]) == (True, 0)  # the other host is checked
    assert (hosts["site-b"]["reachable"], hosts["site-b"]["exit_code"]) == (False, 3)
    assert f"cannot reach site-b ({lab.address('site-b')}:22)" in hosts["site-b"]["error"]

    lab.isolate("site-a")  # lab_vm's host
    try:
        t0 = time.monotonic()
        result, data = drtool_json(lab_config, "status", "--json", timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        lab.unisolate("site-a")
    assert result.returncode == ExitCode.UNREACHABLE, result.stdout + result.stderr
    assert elapsed < 7, elapsed
    [vm] = data["vms"]
    assert (vm["name"], vm["run_state"], vm["disks"], vm["exit_code"]) == (lab_vm.name, None, [], 3)
    assert "cannot reach site-a" in vm["error"]
    assert drtool(lab_config, "status").returncode == ExitCode.FAILED  # back once the link is up: not protected
