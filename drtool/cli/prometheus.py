"""node_exporter textfile metrics (`--prometheus FILE`) from check and status results.

node_exporter reads *.prom files from its textfile directory at every scrape,
so the file is replaced atomically (temp file in the same directory, fsync,
rename): a scrape sees the old or the new metrics, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from drtool.errors import UsageError
from drtool.services.status import StatusReport
from drtool.state.checks import CheckReport


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


class _Metrics:
    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float, **labels: str) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(**labels)} {value:g}" if isinstance(value, float) else
                         f"{name}{_labels(**labels)} {value}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def check_metrics(report: CheckReport, now: float | None = None) -> str:
    m = _Metrics()
    stamp = time.time() if now is None else now
    for v in report.vms:
        m.add("drtool_check_status", "gauge", "Result of the last drtool check: 0 OK, 1 WARNING, 2 CRITICAL, "
              "3 UNKNOWN.", int(v.status), vm=v.vm)
        m.add("drtool_check_last_run_timestamp_seconds", "gauge", "When the last drtool check ran (Unix time).",
              float(round(stamp, 3)), vm=v.vm)
        m.add("drtool_check_duration_seconds", "gauge", "How long the last drtool check of the VM took.",
              float(v.seconds), vm=v.vm)
        _replication(m, v.vm, v.replication.ok, v.lag_bytes, v.newest_point_age)
        for d in v.disks:
            m.add("drtool_check_mismatched_bytes", "gauge", "Bytes found different between replica and source "
                  "by the last check.", d.differing_bytes, vm=v.vm, disk=d.device)
            m.add("drtool_check_compared_bytes", "gauge", "Bytes compared by the last check.", d.compared_bytes,
                  vm=v.vm, disk=d.device)
            m.add("drtool_check_disk_duration_seconds", "gauge", "How long comparing the disk took.",
                  float(d.seconds), vm=v.vm, disk=d.device)
    return m.text()


def _replication(m: _Metrics, vm: str, in_sync: bool, lag: int | None, age: float | None) -> None:
    m.add("drtool_replication_in_sync", "gauge", "1 when every replicated disk of the VM is in sync.",
          int(in_sync), vm=vm)
    if lag is not None:
        m.add("drtool_replication_lag_bytes", "gauge", "Bytes the replicas are behind their source.", lag, vm=vm)
    if age is not None:
        m.add("drtool_newest_point_age_seconds", "gauge", "Age of the VM's newest point in time.",
              float(round(age, 3)), vm=vm)


def status_metrics(report: StatusReport) -> str:
    m = _Metrics()
    for v in report.vms:
        lags = [d.lag_bytes for d in v.disks if d.lag_bytes is not None]
        _replication(m, v.name, v.protection.ok, sum(lags) if lags else None,
                     v.newest_point_age)
        for d in v.disks:
            if d.lag_bytes is not None:
                m.add("drtool_disk_lag_bytes", "gauge", "Bytes the disk's replica is behind its source.",
                      d.lag_bytes, vm=v.name, disk=d.device)
    return m.text()


def write_textfile(path: Path, text: str) -> None:
    """Replace path with text atomically (node_exporter may read it at any moment)."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"cannot write {path}: {directory} is not a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
