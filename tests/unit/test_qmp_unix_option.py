"""A VM whose monitor is given as `-qmp unix:PATH,server=on,wait=off` (not -chardev) is found and mapped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
import subprocess

import pytest

from drtool.mechanics.dr_vm import RunLayout, map_command_line
from drtool.domain import Vm
from drtool.mechanics.hardware import read_hardware

from .local_shell import LocalShell, fake_process


@pytest.fixture
def qemu_with_qmp_option(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], PurePosixPath]]:
    sock = PurePosixPath(tmp_path / "web, mon.qmp")  # a comma: QEMU's option syntax doubles it
    proc = fake_process("qemu-system-x86_64", "-name", "web", "-qmp",
                        f"unix:{str(sock).replace(',', ',,')},server=on,wait=off")
    time.sleep(0.2)
    yield proc, sock
    proc.kill()
    proc.wait()


def test_the_source_qemu_is_found_by_its_qmp_option(qemu_with_qmp_option):  # noqa: ANN001
    proc, sock = qemu_with_qmp_option
    found = read_hardware(LocalShell(), Vm("web", "kvm1", sock, "kvm2", PurePosixPath("/dr/web")))
    assert found["pid"] == proc.pid and "-qmp" in found["argv"]


def test_a_qmp_option_moves_to_the_run_dir_commas_and_all():
    argv = ["qemu-system-x86_64", "-name", "web", "-qmp", "unix:/run/web,,a.qmp,server=on,wait=off",
            "-serial", "unix:/run/web-serial.sock,server=on,wait=off"]
    out = map_command_line(argv, {}, "/run/web,a.qmp", RunLayout(PurePosixPath("/dr/web/vm")))
    assert out[out.index("-qmp") + 1] == "unix:/dr/web/vm/drtool.qmp,server=on,wait=off"
    assert out[out.index("-serial") + 1] == "unix:/dr/web/vm/web-serial.sock,server=on,wait=off"
