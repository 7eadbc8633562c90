"""Pid checks and process ends on a real host (this one): the scripts run in sh against /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from drtool.mechanics.dr_target import TargetLayout, stop_target, target_pid
from drtool.mechanics.dr_vm import RunLayout, vm_pid

from .local_shell import LocalShell, fake_process


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_stale_pid_file_naming_another_vms_qemu_is_not_taken_for_ours(tmp_path: Path, processes):  # noqa: ANN001
    ours, theirs = RunLayout(PurePosixPath(tmp_path / "web")), RunLayout(PurePosixPath(tmp_path / "db"))
    other = fake_process("qemu-system-x86_64", "-pidfile", str(theirs.pidfile), "-name", "db")
    processes.append(other)
    for layout in (ours, theirs):
        Path(layout.run_dir).mkdir()
        Path(layout.pidfile).write_text(f"{other.pid}\n")  # ours is stale: after a reboot it names db's QEMU
    time.sleep(0.2)
    assert vm_pid(LocalShell(), ours) is None
    assert vm_pid(LocalShell(), theirs) == other.pid


def test_the_target_is_found_by_its_own_pid_file_on_its_command_line(tmp_path: Path, processes):  # noqa: ANN001
    layout = TargetLayout(PurePosixPath(tmp_path))
    target = fake_process("qemu-storage-daemon", "--daemonize", "--pidfile", str(layout.pidfile))
    processes.append(target)
    Path(layout.pidfile).write_text(f"{target.pid}\n")
    time.sleep(0.2)
    assert target_pid(LocalShell(), layout) == target.pid
    Path(layout.pidfile).write_text("not a pid\n")
    assert target_pid(LocalShell(), layout) is None


def test_an_exited_process_not_yet_reaped_counts_as_gone(tmp_path: Path):
    """A daemon's zombie holds no file: waiting for its reaping (seconds under some inits) is waiting for nothing."""
    layout = TargetLayout(PurePosixPath(tmp_path))
    zombie = subprocess.Popen(["qemu-storage-daemon", "-c", "pass", "--pidfile", str(layout.pidfile)],
                              executable=sys.executable)
    Path(layout.pidfile).write_text(f"{zombie.pid}\n")
    try:
        while "Z" not in Path(f"/proc/{zombie.pid}/status").read_text().split("State:")[1][:4]:
            time.sleep(0.01)
        assert target_pid(LocalShell(), layout) is None
        started = time.monotonic()
        stop_target(LocalShell(), layout, timeout=3)
        assert time.monotonic() - started < 1
        assert not Path(layout.pidfile).exists()
    finally:
        zombie.wait()


def test_stopping_by_a_stale_pid_file_spares_the_process_it_names(tmp_path: Path, processes):  # noqa: ANN001
    ours, theirs = TargetLayout(PurePosixPath(tmp_path / "web")), TargetLayout(PurePosixPath(tmp_path / "db"))
    other = fake_process("qemu-storage-daemon", "--pidfile", str(theirs.pidfile))
    processes.append(other)
    Path(ours.replica_dir).mkdir()
    Path(ours.pidfile).write_text(f"{other.pid}\n")
    time.sleep(0.2)
    stop_target(LocalShell(), ours, timeout=3)
    assert other.poll() is None  # db's target still runs
    assert not Path(ours.pidfile).exists()  # the stale file is gone


def test_stopping_our_target_ends_it(tmp_path: Path):
    layout = TargetLayout(PurePosixPath(tmp_path))
    target = fake_process("qemu-storage-daemon", "--pidfile", str(layout.pidfile))
    Path(layout.pidfile).write_text(f"{target.pid}\n")
    time.sleep(0.2)
    stop_target(LocalShell(), layout, timeout=3)
    assert target.wait(5) is not None
