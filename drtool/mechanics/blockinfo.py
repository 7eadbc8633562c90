"""Reading a VM's disks out of QMP query-block.

With -blockdev and -device, query-block names no drive ("device": "") and
identifies each disk by its qdev path, e.g. /machine/peripheral/vd0/virtio-backend:
the device id drtool uses is the "vd0" in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)/")
# Filter drivers block jobs insert above a disk; the disk itself is below them.
_FILTER_DRIVERS = frozenset({"mirror_top", "commit_top", "copy-before-write", "throttle"})


@dataclass(frozen=True)
class BlockDevice:
    """A disk attached to a guest device."""

    device: str  # device id (-device id=...), or the qdev path if the device has none
    qdev: str
    node_name: str  # the format node the guest's data lives in
    format: str
    virtual_size: int
    image: str
    allocated: int = 0  # bytes the image takes on its host (qcow2 "actual-size")


def device_id(entry: dict[str, Any]) -> str:
    if entry.get("device"):
        return str(entry["device"])
    qdev = str(entry.get("qdev", ""))
    match = _PERIPHERAL.match(qdev)
    return match.group(1) if match else qdev


def parse_query_block(entries: list[dict[str, Any]]) -> list[BlockDevice]:
    """Disks attached to a device with a medium inserted, filters looked through."""
    devices = []
    for entry in entries:
        inserted = entry.get("inserted")
        if not inserted or not (entry.get("qdev") or entry.get("device")):
            continue
        image = inserted.get("image", {})
        node_name, fmt = inserted.get("node-name", ""), inserted.get("drv", "")
        # Below a job filter, the first backing image is the real disk node.
        while fmt in _FILTER_DRIVERS and "backing-image" in image:
            image = image["backing-image"]
            fmt = image.get("format", "")
            node_name = image.get("node-name", node_name)
        devices.append(
            BlockDevice(
                device=device_id(entry),
                qdev=str(entry.get("qdev", "")),
                node_name=node_name,
                format=fmt or image.get("format", ""),
                virtual_size=int(image.get("virtual-size", 0)),
                image=str(image.get("filename", inserted.get("file", ""))),
                allocated=int(image.get("actual-size", 0)),
            )
        )
    return devices
