"""Audit: every state-changing command leaves a line in the system log and in the VM's history on its DR host.

The system log is reached through the standard library (SysLogHandler on
/dev/log, which journald serves too); a machine without one (a container)
gets the DR-side history alone. A history that cannot be written is said on
stderr: the command's own result stands.
"""

from __future__ import annotations

import getpass
import logging
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drtool.domain import Inventory
from drtool.errors import DrtoolError, ExitCode

SYSLOG_ADDRESS = "/dev/log"
# (VM, what happened, exit code) for each VM the command changed (or failed to)
Entries = list[tuple[str, str, int]]


@dataclass(frozen=True)
class Audit:
    """What to record of a command: its name, the VMs it works on, and what its result changed."""

    command: str
    vms: Sequence[str]
    changed: Callable[[Any], Entries]

    def failed(self, err: DrtoolError) -> Entries:
        """A failure that may have changed something (not a usage error or a refusal: those change nothing)."""
        if err.exit_code in (ExitCode.USAGE, ExitCode.REFUSED):
            return []
        return [(vm, f"failed: {err.message}", int(err.exit_code)) for vm in self.vms]


def _syslog_reachable(address: str) -> bool:
    """Whether a syslog daemon (or journald) listens on the socket: the handler would fail silently later."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(address)
            return True
        except OSError:
            continue
        finally:
            probe.close()
    return False


def _syslog() -> logging.Logger | None:
    import logging.handlers  # here: a command's start-up does not pay for it

    class QuietSysLogHandler(logging.handlers.SysLogHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            """A syslog that goes away mid-run costs its lines, never a traceback on the terminal."""

    logger = logging.getLogger("drtool.audit")
    logger.propagate = False  # never onto the terminal, whatever --verbose set up
    if not logger.handlers:
        if not _syslog_reachable(SYSLOG_ADDRESS):  # no syslog here: the DR host's history still has it
            return None
        handler = QuietSysLogHandler(address=SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
        handler.setFormatter(logging.Formatter("drtool[%(process)d]: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def record(inventory: Inventory, reach: Any, audit: Audit, entries: Entries,
           warn: Callable[[str], None]) -> None:
    """Write each entry to syslog and to its VM's history on the DR host."""
    from drtool.state.history import append_history, history_path

    if not entries:
        return
    who, where = getpass.getuser(), socket.gethostname()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    argv = " ".join(sys.argv[1:])
    logger = _syslog()
    for vm_name, what, code in entries:
        result = "ok" if code == 0 else f"exit {code}"
        if logger is not None:
            logger.info("user=%s from=%s command=%r vm=%s result=%s: %s", who, where, audit.command, vm_name,
                        result, what)
        vm = inventory.vms.get(vm_name)
        if vm is None:
            continue
        entry = {"time": when, "user": who, "from": where, "command": audit.command, "argv": argv,
                 "vm": vm_name, "result": result, "exit_code": code, "what": what}
        try:
            dr = reach.shell(vm.dr_host)
            with reach.lock(vm):  # one writer of the history at a time
                append_history(dr, history_path(inventory.hosts[vm.dr_host], vm.name), entry)
        except DrtoolError as err:
            warn(f"{vm_name}: the audit history on {vm.dr_host} was not written: {err.message}")


def lines(results: Iterable[tuple[str, str]]) -> Entries:
    return [(vm, what, 0) for vm, what in results]


def fleet_entries(report: Any, changed: Callable[[Any], Iterable[tuple[str, str]]]) -> Entries:
    """A command over many VMs (services/concurrent.py's FleetReport): what each VM's result changed,
    and each VM that failed; VMs left out changed nothing."""
    entries: Entries = []
    for outcome in report.outcomes:
        if outcome.result is not None:
            entries += lines(changed(outcome.result))
        elif outcome.error and outcome.exit_code not in (ExitCode.USAGE, ExitCode.REFUSED):
            entries.append((outcome.vm, f"failed: {outcome.error}", int(outcome.exit_code)))
    return entries
