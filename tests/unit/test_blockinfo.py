from drtool.mechanics.blockinfo import parse_query_block

# Trimmed from QEMU 7.2's query-block for `-blockdev ... -device virtio-blk-pci,id=vd0`.
VD0 = {
    "device": "",
    "qdev": "/machine/peripheral/vd0/virtio-backend",
    "inserted": {
        "node-name": "vd0-fmt",
        "drv": "qcow2",
        "file": "/srv/vms/web/vd0.qcow2",
        "image": {"filename": "/srv/vms/web/vd0.qcow2", "format": "qcow2", "virtual-size": 67108864},
    },
}


def test_device_id_comes_from_the_qdev_path():
    [disk] = parse_query_block([VD0])
    assert (disk.device, disk.node_name, disk.format, disk.virtual_size, disk.image) == (
        "vd0", "vd0-fmt", "qcow2", 67108864, "/srv/vms/web/vd0.qcow2")


def test_entries_without_a_device_or_medium_are_not_disks():
    empty_cdrom = {"device": "", "qdev": "/machine/peripheral/cd0", "removable": True}
    no_device = {"device": "", "qdev": "", "inserted": VD0["inserted"]}
    assert parse_query_block([empty_cdrom, no_device]) == []


def test_anonymous_device_keeps_its_qdev_path():
    entry = dict(VD0, qdev="/machine/peripheral-anon/device[1]/virtio-backend")
    [disk] = parse_query_block([entry])
    assert disk.device == "/machine/peripheral-anon/device[1]/virtio-backend"
