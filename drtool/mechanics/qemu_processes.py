"""The part of drtool's remote scripts that walks a host's QEMU processes.

Scripts that look for a QEMU among a host's processes (hardware.py: the VM's
own; old_site.py: any QEMU on the old images) run with the host's python3 and
begin with this text: `qemu_processes()` yields (pid, argv) of every
qemu-system process it may read, its own process left out.
"""

from __future__ import annotations

QEMU_PROCESSES = r"""
import os
def qemu_processes():
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
        except OSError:
            continue
        if argv and "qemu-system" in os.path.basename(argv[0]):
            yield pid, argv
"""
