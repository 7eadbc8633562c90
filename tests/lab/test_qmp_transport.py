"""drtool's transport against the real lab: SSH per host (paramiko) and QMP through the SSH bridge.

Everything goes through drtool.transport.connections.Connections, as the CLI does;
the QMP monitor is the lab VM's `drtool.qmp`, reached only through the relay on the host.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from drtool.config import load_inventory
from drtool.domain import Inventory, Vm
from drtool.errors import QmpError, RemoteCommandError, VmUnreachable
from drtool.lab import Lab, LabVm
from drtool.transport.bridge import StreamBridge, relay_argv
from drtool.transport.connections import Connections
from drtool.transport.qmp import QmpSession

pytestmark = pytest.mark.lab


@pytest.fixture
def inventory(lab_config: Path) -> Inventory:
    return load_inventory(lab_config)


@pytest.fixture
def conns(inventory: Inventory) -> Iterator[Connections]:
    with Connections(inventory) as c:
        yield c


@pytest.fixture
def vm(inventory: Inventory, lab_vm: LabVm) -> Vm:
    return inventory.vms[lab_vm.name]


@pytest.fixture(scope="module")
def hosts_only_config(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inventory with the lab's hosts and no VM: for tests that need only SSH."""
    return lab.write_config(tmp_path_factory.mktemp("hosts-only") / "drtool.toml", {})


@pytest.fixture
def ssh_conns(hosts_only_config: Path) -> Iterator[Connections]:
    with Connections(load_inventory(hosts_only_config)) as c:
        yield c


def relay_pids(socket_path: PurePosixPath | Path) -> list[int]:
    """Processes (the bridge's python3 relay) whose argv names this socket path."""
    wanted = os.fsencode(str(socket_path))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv and b"python3" in argv[0]:
            pids.append(int(entry.name))
    return pids


def wait_until(predicate, timeout: float = 3.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- QMP


def test_query_status_through_the_bridge(conns: Connections, vm: Vm, lab_vm: LabVm) -> None:
    with conns.qmp(vm) as session:
        assert session.execute("query-status")["status"] == "running"
        lab_vm.qmp("stop")  # the other monitor: drtool's session sees QEMU's real state
        assert session.execute("query-status")["status"] == "paused"
        blocks = session.execute("query-block")
    assert [b["inserted"]["file"] for b in blocks] == [str(lab_vm.disks["vd0"])]


def test_qmp_error_keeps_qemus_text(conns: Connections, vm: Vm) -> None:
    with conns.qmp(vm) as session:
        with pytest.raises(QmpError) as failure:
            session.execute("no-such-command")
        err = failure.value
        assert err.command == "no-such-command"
        assert err.qemu_class == "CommandNotFound"
        assert err.qemu_desc == "The command no-such-command has not been found"
        assert "The command no-such-command has not been found" in str(err)
        with pytest.raises(QmpError) as bad_arg:  # a second kind of refusal, with its own text
            session.execute("query-status", {"bogus": 1})
        assert "bogus" in bad_arg.value.qemu_desc and bad_arg.value.qemu_class == "GenericError"
        assert session.execute("query-status")["status"] == "running"  # the session survives errors


def test_events_reach_the_caller(conns: Connections, vm: Vm, lab_vm: LabVm) -> None:
    with conns.qmp(vm) as session:
        with session.subscribe(["STOP", "RESUME"]) as sub:
            session.execute("stop")
            session.execute("cont")
            first, second = sub.get(timeout=5), sub.get(timeout=5)
            session.execute("query-status")  # an unsubscribed command produces no event here
            assert sub.get(timeout=0.3) is None
    assert first is not None and first["event"] == "STOP"
    assert second is not None and second["event"] == "RESUME"
    assert lab_vm.status() == "running"


def test_a_monitor_holds_one_client(conns: Connections, vm: Vm) -> None:
    """While drtool holds the monitor, a second client times out instead of hanging forever.

    Connections.qmp_at takes no timeout (every session gets DEFAULT_QMP_TIMEOUT, 30 s),
    so the second session is built here exactly as Connections builds one, with 2 s.
    """
    conn = conns.shell(vm.host)
    bridges: list[StreamBridge] = []

    def opener():  # noqa: ANN202
        bridges.append(StreamBridge(conn.open_stream(relay_argv(vm.qmp_socket)), name="second"))
        return bridges[-1].local

    def closer() -> None:
        while bridges:
            bridges.pop().close()

    with conns.qmp(vm) as first:
        assert len(relay_pids(vm.qmp_socket)) == 1  # the holder's relay, found where the final check looks
        second = QmpSession(f"{vm.name} (second)", opener, closer, timeout=2)
        t0 = time.monotonic()
        with pytest.raises(VmUnreachable) as failure:
            second.connect()
        elapsed = time.monotonic() - t0
        assert 1.5 < elapsed < 4, elapsed
        assert "did not greet within 2 s" in str(failure.value)
        assert not bridges  # the failed session released its bridge
        assert first.execute("query-status")["status"] == "running"  # the holder is unaffected
    # Both relays end once their sessions are closed, and the monitor is free again.
    assert wait_until(lambda: not relay_pids(vm.qmp_socket)), relay_pids(vm.qmp_socket)
    with conns.qmp(vm) as again:
        assert again.execute("query-status")["status"] == "running"


def test_missing_socket_is_vm_unreachable(conns: Connections, lab: Lab) -> None:
    missing = PurePosixPath(lab.host_dir("site-a")) / "no-such-dir" / "drtool.qmp"
    t0 = time.monotonic()
    with pytest.raises(VmUnreachable) as failure:
        conns.qmp_at("site-a", missing, "ghost")
    assert time.monotonic() - t0 < 5
    assert "ghost on site-a: cannot reach the QMP monitor" in str(failure.value)
    assert not relay_pids(missing)


def test_missing_socket_message_carries_the_relays_reason(conns: Connections, lab: Lab) -> None:
    missing = PurePosixPath(lab.host_dir("site-a")) / "no-such-dir" / "drtool.qmp"
    with pytest.raises(VmUnreachable) as failure:
        conns.qmp_at("site-a", missing, "ghost")
    assert "No such file or directory" in str(failure.value)
    assert str(missing) in str(failure.value)


# --------------------------------------------------------------------------- SSH


def _ssh_connection_id(conns: Connections, host: str) -> str:
    """$SSH_CONNECTION on the host: client address and port, i.e. which TCP connection ran us."""
    return conns.shell(host).run(["sh", "-c", 'echo "$SSH_CONNECTION"']).out.strip()


def test_one_ssh_connection_per_host_is_reused(conns: Connections, vm: Vm, lab: Lab) -> None:
    shell = conns.shell("site-a")
    assert conns.shell("site-a") is shell
    assert conns.shell("site-b") is not shell
    first = _ssh_connection_id(conns, "site-a")
    assert first.split()[2] == lab.address("site-a"), first
    for _ in range(3):
        shell.run(["true"])
    with conns.qmp(vm) as session:
        session.execute("query-status")
    with conns.qmp(vm) as session:
        session.execute("query-status")
    assert conns.shell("site-a") is shell
    assert shell.connections == 1
    assert _ssh_connection_id(conns, "site-a") == first  # same client port: same TCP connection


def test_concurrent_commands_share_one_connection(ssh_conns: Connections) -> None:
    shell = ssh_conns.shell("site-a")
    results: dict[int, object] = {}

    def work(i: int) -> None:
        try:
            results[i] = shell.run(["sh", "-c", 'date +%s.%N; sleep 2; date +%s.%N; echo "$1 $SSH_CONNECTION"',
                                    "sh", str(i)])
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            results[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failures = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not failures and len(results) == 8, failures
    lines = {i: r.out.splitlines() for i, r in results.items()}  # type: ignore[union-attr]
    outs = {i: out[2].split(maxsplit=1) for i, out in lines.items()}
    assert {i: o[0] for i, o in outs.items()} == {i: str(i) for i in range(8)}
    assert len({o[1] for o in outs.values()}) == 1  # all on one SSH connection
    starts, ends = [float(out[0]) for out in lines.values()], [float(out[1]) for out in lines.values()]
    # side by side, not one after another (that would take 8 x 2 s)
    assert max(ends) - min(starts) < 8, (starts, ends)


def test_more_channels_than_sshd_allows_per_connection(ssh_conns: Connections) -> None:
    """The lab's sshd keeps OpenSSH's default MaxSessions (10): 24 commands at once still all run."""
    shell = ssh_conns.shell("site-a")
    streams = [shell.open_stream(["sleep", "30"]) for _ in range(12)]  # long-lived, as QMP bridges are
    try:
        results: dict[int, object] = {}

        def work(i: int) -> None:
            try:
                results[i] = shell.run(["sh", "-c", 'sleep 0.3; echo "$1 $SSH_CONNECTION"', "sh", str(i)])
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                results[i] = err

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        failures = {i: r for i, r in results.items() if isinstance(r, Exception)}
        assert not failures and len(results) == 12, failures
        connections = {r.out.split(maxsplit=1)[1] for r in results.values()}  # type: ignore[union-attr]
        assert 2 <= shell.connections <= 4, shell.connections  # 24 channels, 8 a connection at most
        assert len(connections) >= 2
    finally:
        for chan in streams:
            chan.close()


def test_argv_with_metacharacters_is_passed_intact(ssh_conns: Connections, lab: Lab, tmp_path: Path) -> None:
    home = Path(pwd.getpwnam(lab.user).pw_dir)  # where the SSH session's commands run
    canary = f"PWNED-{tmp_path.name}"
    tricky = f"a b;c$(touch {canary})'\"`touch {canary}2`|&><*\\ \t$HOME\n%s"
    shell = ssh_conns.shell("site-a")
    result = shell.run(["printf", "%s\n", tricky])
    assert result.stdout.decode() == tricky + "\n"
    assert result.exit_status == 0 and result.stderr == b""
    places = (home, lab.dir, Path.cwd(), tmp_path)
    assert not [p for p in places for name in (canary, canary + "2") if (p / name).exists()]
    # The check above looks where an injected command would land: prove it with one that is meant to run.
    shell.run(["sh", "-c", 'touch -- "$1"', "sh", canary + "-control"])
    control = home / (canary + "-control")
    try:
        assert control.exists()
    finally:
        control.unlink(missing_ok=True)


def test_command_timeout(ssh_conns: Connections) -> None:
    shell = ssh_conns.shell("site-a")
    t0 = time.monotonic()
    with pytest.raises(RemoteCommandError) as failure:
        shell.run(["sleep", "5"], timeout=1)
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 2.5, elapsed
    # the program only: a command line may hold secrets (QEMU -object secret,data=...)
    assert "sleep did not finish within 1 s" in str(failure.value) and "sleep 5" not in str(failure.value)
    assert shell.run(["echo", "still here"]).out == "still here\n"  # the connection outlives the timeout


def test_failed_command_reports_exit_status_and_stderr(ssh_conns: Connections) -> None:
    shell = ssh_conns.shell("site-a")
    with pytest.raises(RemoteCommandError) as failure:
        shell.run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 7"])
    assert "sh exited 7: the reason" in str(failure.value)
    result = shell.run(["sh", "-c", "printf out; printf err >&2; exit 4"], check=False)
    assert (result.exit_status, result.stdout, result.stderr) == (4, b"out", b"err")
    assert shell.run(["cat"], stdin=b"\x00binary\xff").stdout == b"\x00binary\xff"
