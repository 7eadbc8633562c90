"""The lab guest's pieces that need no VM: the initramfs archive and the console parser."""

import subprocess
from pathlib import Path

import pytest

from drtool.lab import LabError
from drtool.lab.guest import (
    BUSYBOX,
    GuestConsole,
    _is_static,
    kernel_args,
    newc_archive,
)

CONSOLE = """\
GUEST up t=161 boot=4274922195\r
VERIFY disk=vda max=300 count=299 gaps=1 first_gap=100 garbage=0 last_t=332 last_boot=1238260613\r
VERIFY disk=vdb max=299 count=299 gaps=0 first_gap=0 garbage=2 last_t=331 last_boot=1238260613\r
VERIFY done b_ahead=0 next=300\r
WRITER next=300 boot=4274922195\r
ACK 300 t=218\r
ACK 301 t=219\r
ACK 30"""


def test_busybox_reads_the_newc_archive_back(tmp_path):
    archive = newc_archive([("bin", 0o40755, b""), ("dev/console", 0o20600, b""), ("init", 0o100755, b"#!/bin/sh\n"),
                            ("bin/odd-size", 0o100644, b"12345")])
    listing = subprocess.run([str(BUSYBOX), "cpio", "-tv"], input=archive, capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    assert [line.split()[-1] for line in lines] == ["bin", "dev/console", "init", "bin/odd-size"]
    assert lines[1].startswith("crw-------") and lines[2].startswith("-rwxr-xr-x")
    (tmp_path / "x").mkdir()
    subprocess.run([str(BUSYBOX), "cpio", "-id"], input=archive, cwd=tmp_path / "x", capture_output=True, check=True)
    assert (tmp_path / "x" / "bin" / "odd-size").read_bytes() == b"12345"


def test_busybox_is_static_and_python_is_not():
    assert _is_static(BUSYBOX)
    assert not _is_static(Path("/usr/bin/python3").resolve())


def test_console_parses_what_the_guest_said(tmp_path):
    console = GuestConsole(tmp_path / "console.log")
    assert console.acks() == [] and console.verify_report() is None
    console.path.write_text(CONSOLE)
    report = console.verify_report()
    assert (report.a.max, report.a.first_gap, report.b.garbage, report.next) == (300, 100, 2, 300)
    assert report.a.last_t == 3.32 and report.b.last_boot == 1238260613
    assert report.problems() == ["vda: 1 record(s) missing below 300, first 100", "vdb: 2 sector(s) of garbage"]
    assert [a.n for a in console.acks()] == [300, 301]  # the partial last line is not yet said
    assert console.last_ack().t == 2.19


def test_kernel_args_refuse_an_unknown_mode():
    assert "drguest.mode=verify" in kernel_args("verify")
    with pytest.raises(LabError, match="erase"):
        kernel_args("erase")
