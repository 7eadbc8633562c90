"""One error tree for drtool, each class carrying its exit code.

The CLI's single handler turns any DrtoolError into one line for the user and
its exit code; anything else is a bug and exits FAILED with the cause shown
only under --verbose.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of every drtool command (listed in README)."""

    OK = 0
    FAILED = 1  # the work itself failed
    USAGE = 2  # bad command line or configuration; nothing was contacted
    UNREACHABLE = 3  # a host or VM could not be reached
    REFUSED = 4  # the state forbids it: already protected, VM not running, no room, locked
    INTERRUPTED = 130  # SIGINT / SIGTERM / SIGHUP


class DrtoolError(Exception):
    """Root of every error drtool reports to its user."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class UsageError(DrtoolError):
    """The command line asks for something that cannot be done as stated."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """The inventory file is missing, unreadable or invalid."""


class UnreachableError(DrtoolError):
    """A host or VM could not be reached."""

    exit_code = ExitCode.UNREACHABLE


class HostUnreachable(UnreachableError):
    """No SSH session could be set up with a host (network, timeout, auth)."""


class HostKeyError(UnreachableError):
    """A host's key is unknown or differs from known_hosts: we refuse to talk to it."""


class VmUnreachable(UnreachableError):
    """A VM's QMP monitor could not be reached on its host."""


class Refused(DrtoolError):
    """The request is understood but the current state forbids it; nothing was changed."""

    exit_code = ExitCode.REFUSED


class RemoteCommandError(DrtoolError):
    """A command run on a host failed."""


class QmpError(DrtoolError):
    """QEMU answered a QMP command with an error; the message keeps QEMU's text."""

    def __init__(self, command: str, qemu_class: str, qemu_desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {qemu_desc}")
        self.command = command
        self.qemu_class = qemu_class
        self.qemu_desc = qemu_desc


class Interrupted(DrtoolError):
    """drtool was told to stop by a signal."""

    exit_code = ExitCode.INTERRUPTED
