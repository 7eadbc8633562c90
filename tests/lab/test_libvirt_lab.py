"""The lab's libvirt sites: a libvirtd per host, reached over SSH, each seeing only its own domains."""

import subprocess
from pathlib import Path

import pytest

from drtool.lab.lab import Lab
from drtool.lab.libvirt_site import domain_xml


@pytest.fixture(scope="module")
def libvirt_lab():
    with Lab(libvirt=True) as lab:
        yield lab


def ssh(lab: Lab, host: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-i", str(lab.identity_file), "-o", f"UserKnownHostsFile={lab.known_hosts}",
                           "-o", "BatchMode=yes", "-p", str(lab.port), f"root@{lab.address(host)}", *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def test_each_site_runs_its_own_libvirtd_and_ssh_reaches_it(libvirt_lab: Lab):
    lab = libvirt_lab
    assert set(lab.libvirt_versions) == {"site-a", "site-b"} and lab.libvirt_versions["site-a"].startswith("9.")
    for host in ("site-a", "site-b"):  # a domain of the same name on both sites at once
        image = lab.host_dir(host) / "same.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
        xml = lab.host_dir(host) / "same.xml"
        xml.write_text(domain_xml("same", [image]))
        created = lab.virsh(host, "create", str(xml))
        assert created.returncode == 0, created.stderr
    try:
        for host in ("site-a", "site-b"):
            listed = ssh(lab, host, "virsh", "list", "--name")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.split() == ["same"]
        pids = {host: lab.virsh(host, "qemu-monitor-command", "same", "--hmp", "info status").stdout for host in
                ("site-a", "site-b")}
        assert all("running" in status for status in pids.values())
        # the machine's own libvirt directories are untouched
        assert not Path("/run/libvirt/qemu/same.xml").exists()
    finally:
        for host in ("site-a", "site-b"):
            lab.virsh(host, "destroy", "same")
