"""A disaster-recovery lab on one machine: sshd "hosts" in network namespaces, QEMU VMs on them.

Used by the test suite (tests/conftest.py) and by the README demo
(`python -m drtool.lab up` / `down`). Needs root, iproute2, OpenSSH's sshd and QEMU.
"""

from drtool.lab.lab import Lab, LabHost, dump_toml, teardown_dir, teardown_state
from drtool.lab.netns import LabError
from drtool.lab.vm import LabQmpError, LabVm

__all__ = [
    "Lab",
    "LabError",
    "LabHost",
    "LabQmpError",
    "LabVm",
    "dump_toml",
    "teardown_dir",
    "teardown_state",
]
