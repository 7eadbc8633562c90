"""What libvirt says of a domain, read in one call: for `status`, so that what libvirt did behind
drtool's back (a managed save, a migration, a restart of the domain's QEMU) is reported when it
happens, not discovered at failover.

One `sh` script on the host asks `virsh dominfo` and `virsh domstate --reason`, and reads
libvirt's status file of the running domain (/run/libvirt/qemu/NAME.xml: the QEMU pid and the
taint flags, such as custom-monitor) and how long that QEMU has run.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from drtool.transport.connections import RemoteShell

_READ = r"""
u=$1 d=$2
echo '== info'; virsh -q -c "$u" dominfo "$d" 2>&1
echo '== state'; virsh -q -c "$u" domstate --reason "$d" 2>&1
echo '== status'; cat "/run/libvirt/qemu/$d.xml" 2>/dev/null
echo '== elapsed'; p=$(sed -n "s/.*<domstatus [^>]*pid='\([0-9]*\)'.*/\1/p" "/run/libvirt/qemu/$d.xml" 2>/dev/null)
[ -n "$p" ] && ps -o etimes= -p "$p"
echo '== end'
"""
_SECTION = re.compile(r"^== (\w+)$", re.M)

SNAPSHOT_NOTE = ("libvirt's own snapshot-create --disk-only, backup-begin and blockcopy of the protected disks "
                 "fail while drtool mirrors them (QEMU: the disk's node is busy with the mirror); "
                 "take points with drtool checkpoint (virsh checkpoint-create works)")


@dataclass(frozen=True)
class LibvirtDomain:
    """A libvirt domain as its host's libvirtd sees it (the source's, or the DR copy's)."""

    name: str
    host: str
    state: str  # running, paused, shut off, ...; "undefined" when libvirt does not know the name
    reason: str | None = None  # libvirt's cause of the state: booted, restored, migrated, saved, ...
    persistent: bool | None = None
    autostart: bool | None = None
    managed_save: bool | None = None  # a `virsh managedsave` image waits: the next start restores it
    tainted: tuple[str, ...] = ()  # libvirt's taint flags of the running domain (custom-monitor, ...)
    qemu_pid: int | None = None
    qemu_started: str | None = None  # when the domain's QEMU process started (ISO 8601, UTC)
    notes: tuple[str, ...] = ()  # what the operator should know, in words

    def describe(self) -> str:
        state = f"{self.state} ({self.reason})" if self.reason else self.state
        parts = [f"libvirt domain {self.name} on {self.host}: {state}"]
        if self.managed_save:
            parts.append("managed save image present")
        parts += [f"tainted: {flag}" for flag in self.tainted]
        return "; ".join(parts)


def read_libvirt_domain(shell: RemoteShell, uri: str, name: str, host: str,
                        now: datetime | None = None) -> LibvirtDomain:
    """What the host's libvirtd says of the domain, in one round trip."""
    result = shell.run(["sh", "-c", _READ, "sh", uri, name], check=False, timeout=60)
    return parse_libvirt_domain(result.out, name, host, now or datetime.now(UTC))


def parse_libvirt_domain(out: str, name: str, host: str, now: datetime) -> LibvirtDomain:
    sections = _sections(out)
    info = dict(_key_value(line) for line in sections.get("info", "").splitlines() if ":" in line)
    state_line = sections.get("state", "").strip().splitlines()
    if "State" not in info and not (state_line and "(" in state_line[0]):
        return LibvirtDomain(name, host, "undefined")
    state, _, reason = (state_line[0] if state_line else info.get("State", "")).partition(" (")
    pid, tainted = _status_file(sections.get("status", ""))
    elapsed = sections.get("elapsed", "").strip()
    started = (now - timedelta(seconds=int(elapsed))).isoformat(timespec="seconds") if elapsed.isdigit() else None
    return LibvirtDomain(
        name, host, state.strip() or info.get("State", "?"), reason.rstrip(")") or None,
        persistent=_yes(info.get("Persistent")), autostart=_yes(info.get("Autostart")),
        managed_save=_yes(info.get("Managed save")), tainted=tainted,
        qemu_pid=pid if state.strip() in ("running", "paused") else None,
        qemu_started=started if state.strip() in ("running", "paused") else None)


def source_notes(domain: LibvirtDomain, protected: bool, jobs_missing: bool) -> tuple[str, ...]:
    """What status says of a protected source domain, beyond its replication jobs' health."""
    notes = []
    if domain.state == "undefined":
        notes.append(f"libvirt on {domain.host} does not know domain {domain.name} (undefined, or migrated "
                     "away as a transient domain): replication ended with its QEMU")
    elif domain.state == "shut off" and domain.reason == "migrated":
        notes.append(f"libvirt migrated domain {domain.name} away from {domain.host}: its QEMU there exited and "
                     "the mirror with it; migrate it back and run drtool resync, or protect it from its new host")
    if domain.managed_save:
        notes.append(f"a managed save (virsh managedsave) ended the domain's QEMU and the mirror with it: "
                     f"virsh start {domain.name}, then drtool resync (it catches up from the persistent bitmap)")
    if protected and jobs_missing and domain.qemu_pid is not None:
        why = {"restored": "was restored from a managed save", "migrated": "was migrated in",
               "from snapshot": "was reverted to a snapshot"}.get(domain.reason or "")
        since = f" at {domain.qemu_started}" if domain.qemu_started else ""
        if why is not None:  # libvirt's own cause says a new QEMU, or a new state, under the domain
            notes.append(f"the domain's QEMU (pid {domain.qemu_pid}) {why}{since}: drtool's mirror ended with "
                         "the old one; run drtool resync (from the persistent bitmap)")
        else:
            notes.append(f"the domain's QEMU (pid {domain.qemu_pid}, started{since}, libvirt: "
                         f"{domain.reason or domain.state}) has no drtool job: it was restarted, or the jobs were "
                         "ended; run drtool resync (from the persistent bitmap)")
    if protected and not jobs_missing:
        notes.append(SNAPSHOT_NOTE)
    if "custom-monitor" in domain.tainted:
        notes.append("libvirt marks the domain 'tainted: custom-monitor' because drtool passes QMP through "
                     "virsh for the replication libvirt cannot do; the mark clears when its QEMU restarts")
    return tuple(notes)


def dr_copy_notes(domain: LibvirtDomain) -> tuple[str, ...]:
    """What status says of the DR copy that a failover left to the DR host's libvirt."""
    if domain.state == "undefined":
        return (f"the DR copy is not defined in libvirt on {domain.host}",)
    if domain.autostart is False:
        return (f"the DR copy does not start with {domain.host} (virsh autostart {domain.name} to change that)",)
    return ()


def _sections(out: str) -> dict[str, str]:
    found = list(_SECTION.finditer(out))
    return {m[1]: out[m.end():found[i + 1].start() if i + 1 < len(found) else len(out)]
            for i, m in enumerate(found)}


def _key_value(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def _yes(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.lower() in ("yes", "enable")


def _status_file(text: str) -> tuple[int | None, tuple[str, ...]]:
    """The QEMU pid and the taint flags in libvirt's status XML of a running domain."""
    if not text.strip():
        return None, ()
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None, ()
    pid = root.get("pid")
    flags: Sequence[str] = [t.get("flag", "") for t in root.iter("taint")]
    return (int(pid) if pid and pid.isdigit() else None), tuple(dict.fromkeys(f for f in flags if f))
