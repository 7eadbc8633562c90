"""Shared fixtures: the real two-site lab (root, network namespaces, sshd, QEMU).

Lab tests do not skip when the lab cannot run: they fail with the reason, so a
machine that silently lacks root or QEMU never passes as "all green".
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm

_LAB_TOOLS = ("ip", "qemu-system-x86_64", "qemu-img", "qemu-io", "ssh-keygen", "/usr/sbin/sshd")
_vm_numbers = itertools.count(1)


def lab_prerequisites_missing() -> list[str]:
    """What this machine lacks to run the lab (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, veths, routes)")
    missing += [f"{tool} (not found)" for tool in _LAB_TOOLS if shutil.which(tool) is None]
    return missing


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """One lab for the whole session: hosts site-a and site-b, torn down at the end."""
    missing = lab_prerequisites_missing()
    if missing:
        pytest.fail("lab tests need " + ", ".join(missing), pytrace=False)
    the_lab = Lab(hosts=("site-a", "site-b"))
    the_lab.start()
    yield the_lab
    problems = the_lab.stop()
    if problems:
        pytest.fail("lab teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def lab_vm(lab: Lab, request: pytest.FixtureRequest) -> Iterator[LabVm]:
    """A fresh running VM on site-a with one 64M disk vd0, stopped after the test."""
    test = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:24]
    vm = lab.add_vm(f"t{next(_vm_numbers)}-{test}", "site-a", {"vd0": "64M"})
    yield vm
    vm.stop()


@pytest.fixture
def lab_config(lab: Lab, lab_vm: LabVm, tmp_path: Path) -> Path:
    """A drtool inventory (tmp_path/drtool.toml) for lab_vm, replicated to site-b."""
    return lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b"}})
