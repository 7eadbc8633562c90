"""A libvirt domain's definition mapped for the DR copy (pure): disks on the replicas, drills renamed and NIC-less."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from drtool.errors import Refused
from drtool.mechanics.libvirt_domain import dr_domain_xml

# `virsh dumpxml` of a running libvirt 9.0 domain: two qcow2 disks, a NIC, a pty console
XML = (Path(__file__).parent / "cmdlines" / "libvirt9-web-live.xml").read_text()
IMAGES = {"/tmp/lvcap/a.qcow2": "/dr/web/vda.qcow2", "/tmp/lvcap/b.qcow2": "/dr/web/vdb.qcow2"}
RBD = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
       "<source protocol='rbd' name='vms/web-data'><host name='ceph1' port='6789'/></source>"
       "<target dev='vdc' bus='virtio'/></disk>")


def sources(xml: str) -> list[str | None]:
    return [d.find("source").get("file") for d in ET.fromstring(xml).find("devices").findall("disk")]


def test_failover_puts_every_disk_on_its_replica_and_keeps_the_rest():
    mapped = ET.fromstring(dr_domain_xml(XML, IMAGES))
    assert sources(dr_domain_xml(XML, IMAGES)) == ["/dr/web/vda.qcow2", "/dr/web/vdb.qcow2"]
    assert mapped.findtext("name") == "web" and mapped.findtext("uuid") == "3a383af7-daef-463d-a3d1-692f69445985"
    assert mapped.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"


def test_a_drill_copy_gets_a_new_name_no_uuid_and_no_nic():
    mapped = ET.fromstring(dr_domain_xml(XML, IMAGES, name="web-drill", without_nics=True))
    assert mapped.findtext("name") == "web-drill" and mapped.find("uuid") is None
    assert mapped.find("devices/interface") is None


def test_a_disk_that_is_not_replicated_is_refused_by_name():
    with pytest.raises(Refused, match=r"vdb \(file /tmp/lvcap/b.qcow2\)"):
        dr_domain_xml(XML, {"/tmp/lvcap/a.qcow2": "/dr/web/vda.qcow2"})


def test_an_rbd_disk_is_refused_unless_excluded():
    xml = XML.replace("</devices>", RBD + "</devices>")
    with pytest.raises(Refused, match=r"vdc \(network disk\)"):
        dr_domain_xml(xml, IMAGES)
    assert sources(dr_domain_xml(xml, IMAGES, exclude=("vdc",))) == ["/dr/web/vda.qcow2", "/dr/web/vdb.qcow2"]
