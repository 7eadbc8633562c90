"""File work on a host through its RemoteShell: every path travels as an argument.

The small POSIX sh scripts below are constants; paths and modes reach them as
"$1", "$2" (argv of `sh -c SCRIPT sh ARG...`), so no name is ever parsed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.errors import RemoteCommandError
from drtool.transport.agent import AgentShell
from drtool.transport.batch import FileReads, PidCheck
from drtool.transport.connections import RemoteShell

# Nearest existing path at or above $1: print it, whether it is a writable
# directory, then df's line for it.
_SPACE_SCRIPT = """p=$1
while [ ! -e "$p" ] && [ ! -L "$p" ]; do p=$(dirname -- "$p"); done
echo "$p"
if [ -d "$p" ] && [ -w "$p" ]; then echo writable-dir; else echo not-writable-dir; fi
df -P -B1 -- "$p" | tail -n 1"""

# Write stdin to $1 atomically: temp file, check its sha256 ($4) and so its size ($3) (an
# SSH channel that closes mid-write gives `cat` an early EOF, and cat exits 0),
# fsync, keep the old file as $1.prev when $5 is "keep", rename, fsync the directory.
# Few programs: on a loaded host each one started costs more than the write.
_WRITE_SCRIPT = """set -e
umask 077
tmp="$1.tmp.$$"
cat > "$tmp"
sum=$(sha256sum < "$tmp")
if [ "${sum%% *}" != "$4" ]; then
  rm -f -- "$tmp"
  echo "the $3 bytes arrived cut short or damaged (another checksum): $1 left as it was" >&2
  exit 65
fi
[ "$2" = 600 ] || chmod "$2" "$tmp"
sync "$tmp"
if [ "$5" = keep ] && [ -e "$1" ]; then ln -f -- "$1" "$1.prev"; fi
mv -f "$tmp" "$1"
case $1 in */*) sync "${1%/*}/";; *) sync .;; esac"""


@dataclass(frozen=True)
class Space:
    path: str  # the path asked about
    measured_on: str  # it, or its nearest existing parent
    creatable: bool  # a writable directory: the path exists or can be made
    available_bytes: int | None


def free_space(shell: RemoteShell, path: PurePosixPath | str) -> Space:
    result = shell.run(["sh", "-c", _SPACE_SCRIPT, "sh", str(path)], check=False, timeout=30)
    lines = result.out.splitlines()
    if len(lines) < 3:
        raise RemoteCommandError(f"cannot measure free space for {path}: {result.err.strip() or 'no output'}")
    fields = lines[2].split()
    try:
        available: int | None = int(fields[3])
    except (IndexError, ValueError):
        available = None
    return Space(str(path), lines[0], lines[1] == "writable-dir", available)


def write_file(shell: RemoteShell, path: PurePosixPath, data: bytes, mode: int = 0o600, *,
               keep_previous: bool = False) -> None:
    """Replace path with data so that a crash or a cut channel leaves the old or the new file, never half.

    With keep_previous, the file it replaces stays as path.prev (the last good one).
    """
    if isinstance(shell, AgentShell):  # the host's agent writes it itself, the same way
        failure = shell.write_file(path, data, mode, keep_previous)
    else:
        argv = ["sh", "-c", _WRITE_SCRIPT, "sh", str(path), f"{mode:o}", str(len(data)),
                hashlib.sha256(data).hexdigest(), "keep" if keep_previous else "replace"]
        result = shell.run(argv, stdin=data, timeout=60, check=False)
        failure = "" if result.ok else result.err.strip() or f"exit {result.exit_status}"
    if failure:
        raise RemoteCommandError(f"cannot write {path}: {failure}",
                                 hint="the previous version is in place; run the command again")


def read_file(shell: RemoteShell, path: PurePosixPath) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if isinstance(shell, AgentShell):
        return shell.read_file(path)
    result = shell.run(["sh", "-c", 'if [ -e "$1" ]; then exec cat -- "$1"; else exit 44; fi', "sh", str(path)],
                       check=False, timeout=60)
    if result.exit_status == 44:
        return None
    if not result.ok:
        raise RemoteCommandError(f"cannot read {path}: {result.err.strip()}")
    return result.stdout


# A process runs if it exists and is not a zombie: an exited daemon whose parent
# has not reaped it yet (under some init systems for seconds) holds no file any more.
# ours PIDFILE PROGRAM MARKER prints the pid if that process runs, is PROGRAM and has
# MARKER in one of its arguments. stop_ours PIDFILE PROGRAM MARKER TICKS stops it:
# SIGTERM, then SIGKILL after TICKS hundredths of a second, looking every 10 ms (a
# daemon that exits on SIGTERM is gone in about that: qsd, the link relay). Shell
# built-ins where they do: every program started costs a fork and exec, and on a
# loaded host those add up to most of a round trip.
OWN_PROCESS_SH = '''\
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  while read -r key value; do
    [ "$key" = State: ] && { [ "${value%% *}" != Z ]; return; }
  done 2>/dev/null < "/proc/$1/status"
  return 1
}
ours() {
  p=
  { read -r p < "$1"; } 2>/dev/null
  case $p in ""|*[!0-9]*) return 1;; esac
  alive "$p" || return 1
  grep -qzF -- "$2" "/proc/$p/cmdline" 2>/dev/null || return 1
  grep -qzF -- "$3" "/proc/$p/cmdline" 2>/dev/null || return 1
  echo "$p"
}
stop_ours() {
  p=$(ours "$1" "$2" "$3") || return 0
  kill -TERM "$p" 2>/dev/null
  i=0
  while alive "$p"; do
    i=$((i+1)); [ $i -gt "$4" ] && { kill -KILL "$p"; return 0; }
    sleep 0.01
  done
}
'''
_RUNNING_PID_SCRIPT = OWN_PROCESS_SH + 'ours "$1" "$2" "$3"'
# $1 pid file, $2 program, $3 marker, $4 hundredths of a second before SIGKILL, then files to remove.
_STOP_SCRIPT = OWN_PROCESS_SH + '''stop_ours "$1" "$2" "$3" "$4"
shift 4
[ $# -eq 0 ] || rm -f -- "$@"'''
# $1 pid, $2 marker, $3 hundredths of a second: wait until that process is gone (or no longer has the
# marker among its arguments, its pid reused); exit 1 if it still runs then.
_WAIT_GONE_SCRIPT = OWN_PROCESS_SH + '''i=0
while alive "$1" && grep -qzF -- "$2" "/proc/$1/cmdline" 2>/dev/null; do
  i=$((i+1)); [ $i -gt "$3" ] && exit 1
  sleep 0.01
done'''


@dataclass(frozen=True)
class OwnProcess:
    """A daemon drtool started: found by its pid file, its program and a marker only its arguments hold."""

    pidfile: PurePosixPath
    program: str
    marker: str
    leftovers: tuple[PurePosixPath, ...] = ()  # files to remove once it is stopped

    def stop_args(self, timeout: float) -> list[str]:
        """The arguments of stop_ours, for a script that stops it."""
        return [str(self.pidfile), self.program, self.marker, str(int(timeout * 100))]


def running_pid(shell: RemoteShell, pidfile: PurePosixPath, program: str, marker: str) -> int | None:
    """The pid in pidfile if that process runs, is `program`, and has `marker` in its arguments.

    Pid files outlive reboots, and after one the pid may name any process,
    even another VM's QEMU: the program name alone would let drtool stop it.
    `marker` is a path only the process drtool started has on its command
    line (its pid file, its socket).
    """
    result = shell.run(["sh", "-c", _RUNNING_PID_SCRIPT, "sh", str(pidfile), program, marker],
                       check=False, timeout=15)
    text = result.out.strip()
    return int(text) if result.ok and text.isdigit() else None


def make_dirs(shell: RemoteShell, path: PurePosixPath, mode: int = 0o700) -> None:
    shell.run(["mkdir", "-p", "-m", f"{mode:o}", "--", str(path)], timeout=30)


def remove(shell: RemoteShell, *paths: PurePosixPath) -> None:
    if paths:
        shell.run(["rm", "-rf", "--", *(str(p) for p in paths)], timeout=120)


def stop_process(shell: RemoteShell, pidfile: PurePosixPath, program: str, marker: str, timeout: float,
                 remove_after: tuple[PurePosixPath, ...] = ()) -> None:
    """Stop the process of a pid file if it is ours (see running_pid), then remove files: one round trip.

    SIGTERM (QEMU flushes and closes its images), SIGKILL if it lingers past timeout.
    """
    own = OwnProcess(pidfile, program, marker, remove_after)
    shell.run(["sh", "-c", _STOP_SCRIPT, "sh", *own.stop_args(timeout), *(str(f) for f in remove_after)],
              timeout=timeout + 15)


def wait_gone(shell: RemoteShell, pid: int, marker: str, timeout: float) -> bool:
    """Wait until process pid (whose arguments hold marker) is gone, up to timeout; whether it is."""
    result = shell.run(["sh", "-c", _WAIT_GONE_SCRIPT, "sh", str(pid), marker, str(int(timeout * 100))],
                       check=False, timeout=timeout + 15)
    if result.exit_status not in (0, 1):
        raise RemoteCommandError(f"cannot tell whether process {pid} ended: {result.err.strip()}")
    return result.ok


def create_overlay(shell: RemoteShell, backing: str, overlay: str, *, keep_existing: bool = False) -> None:
    """A qcow2 overlay on a backing image (for a DR copy, a drill, or a fresh replication top)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "--", overlay]
    if keep_existing:
        argv = ["sh", "-c", 'o=$1; shift; [ -e "$o" ] || exec "$@"', "sh", overlay, *argv]
    shell.run(argv, timeout=60)


def read_files_one_by_one(shell: RemoteShell, files: Sequence[PurePosixPath], pids: Sequence[PidCheck]) -> FileReads:
    """What transport/batch.py's read_files answers, a command per file: for shells that run no python3."""
    read: dict[PurePosixPath, bytes | None] = {}
    errors: dict[PurePosixPath, str] = {}
    for path in files:
        try:
            read[path] = read_file(shell, path)
        except RemoteCommandError as err:
            read[path], errors[path] = None, str(err)
    return FileReads(read, tuple(running_pid(shell, c.pidfile, c.program, c.marker) for c in pids), errors)
