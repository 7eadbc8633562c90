"""The lab's libvirt sites: a libvirtd per host, reached over SSH, each seeing only its own domains."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from drtool.lab.lab import Lab
from drtool.lab.libvirt_site import LabDomain, domain_xml, in_site, wait_libvirtd
from drtool.services.failover import FAULT_ENV, HOOKS_ENV

from .replication_helpers import drtool, drtool_ok, replica_has, status_json

pytestmark = pytest.mark.lab


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


# --- a libvirt domain protected by drtool ------------------------------------------------------------

MiB = 1 << 20


@pytest.fixture(scope="module")
def domain(libvirt_lab: Lab):
    dom = LabDomain(libvirt_lab, "lvweb", "site-a")
    yield dom
    dom.remove()


def write_domain_config(lab: Lab, name: str, path: Path) -> Path:
    """An inventory with the lab's hosts and one libvirt domain on site-a, protected to site-b."""
    lab.write_config(path, {})
    with path.open("a") as f:
        f.write(f'\n[vms.{name}]\nhost = "site-a"\nlibvirt_domain = "{name}"\ndr_host = "site-b"\n'
                f'replica_dir = "{lab.host_dir("site-b") / "replicas" / name}"\n'
                f'source_dir = "{lab.host_dir("site-a") / "drtool" / name}"\n')
    return path


@pytest.fixture(scope="module")
def domain_config(libvirt_lab: Lab, domain: LabDomain, tmp_path_factory):
    return write_domain_config(libvirt_lab, domain.name, tmp_path_factory.mktemp("lv") / "drtool.toml")


def replica(lab: Lab, name: str, device: str) -> Path:
    manifest = json.loads((lab.host_dir("site-b") / "replicas" / name / "manifest.json").read_text())
    return Path(next(d["replica_image"] for d in manifest["disks"] if d["device"] == device))


def eventually(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def test_hosts_check_reports_libvirts_version(libvirt_lab: Lab, domain_config: Path):
    report = json.loads(drtool_ok(domain_config, "--json", "hosts", "check").stdout)
    text = json.dumps(report)
    assert text.count("libvirtd (qemu:///system)") == 2 and text.count('"9.0.0"') == 2, text


def test_protect_a_libvirt_domain_replicates_both_disks(libvirt_lab: Lab, domain: LabDomain, domain_config: Path):
    domain.guest_write(0, 2 * MiB, MiB, 0x5A)  # before protect: the initial copy carries it
    result = drtool_ok(domain_config, "protect", domain.name)
    assert "in sync" in result.stdout and "tainted: custom-monitor" in result.stdout
    assert "network backend" not in result.stdout  # this domain has no NIC
    domain.guest_write(0, 5 * MiB, MiB, 0x22)
    domain.guest_write(1, 16 * MiB - 4096, 4096, 0x44)
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk0"), 5 * MiB, MiB, 0x22))
    assert replica_has(replica(libvirt_lab, domain.name, "virtio-disk0"), 2 * MiB, MiB, 0x5A)
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk1"), 16 * MiB - 4096, 4096,
                                          0x44))
    # libvirt sees no job of drtool's, and says what passing QMP through costs
    assert "tainted" in domain.virsh("dominfo", domain.name) or "custom-monitor" in \
        (libvirt_lab.host_dir("site-a") / "libvirt" / "log" / "qemu" / f"{domain.name}.log").read_text()
    manifest = json.loads((libvirt_lab.host_dir("site-b") / "replicas" / domain.name / "manifest.json").read_text())
    assert [d["node_name"] for d in manifest["disks"]] == ["libvirt-2-format", "libvirt-1-format"]


def test_hosts_check_says_whether_libvirts_qemu_user_reaches_drtools_files(libvirt_lab: Lab, domain: LabDomain,
                                                                          domain_config: Path):
    def access() -> tuple[int, dict]:
        checked = drtool(domain_config, "--json", "hosts", "check", "site-a")
        [entry] = json.loads(checked.stdout)["hosts"][0]["qemu_access"]
        return checked.returncode, entry

    code, entry = access()
    assert code == 0 and (entry["vm"], entry["user"]) == (domain.name, "libvirt-qemu"), entry
    assert (entry["psk_dir_access"], entry["relay_socket_access"]) == ("ok", "ok"), entry
    apparmor = Path("/sys/module/apparmor/parameters/enabled")
    if not apparmor.exists() or apparmor.read_text().strip() != "Y":
        assert entry["apparmor"] == "absent" and entry["missing_rules"] == [], entry
    psk_dir = Path(entry["psk_dir"])
    before = psk_dir.stat()
    os.chown(psk_dir, 0, 0)  # as if drtool had not given it to libvirt's QEMU user
    try:
        code, denied = access()
        assert code != 0 and denied["psk_dir_access"] == "denied", denied
        assert denied["error"] == f"libvirt-qemu cannot read {psk_dir}", denied
    finally:
        os.chown(psk_dir, before.st_uid, before.st_gid)


def test_checkpoint_of_a_libvirt_domain_takes_a_point_with_both_disks(libvirt_lab: Lab, domain: LabDomain,
                                                                      domain_config: Path):
    domain.guest_write(1, MiB, MiB, 0x66)
    drtool_ok(domain_config, "checkpoint", domain.name)
    manifest = json.loads((libvirt_lab.host_dir("site-b") / "replicas" / domain.name / "manifest.json").read_text())
    point = manifest["points"][-1]
    assert replica_has(Path(point["images"]["virtio-disk1"]), MiB, MiB, 0x66)
    assert domain.virsh("domstate", domain.name).strip() == "running"


def test_libvirts_own_snapshot_is_refused_and_status_says_why(libvirt_lab: Lab, domain: LabDomain,
                                                              domain_config: Path):
    refused = libvirt_lab.virsh("site-a", "snapshot-create-as", domain.name, "mine", "--disk-only", "--no-metadata")
    assert refused.returncode != 0 and "busy" in refused.stderr, refused.stderr
    backup = libvirt_lab.virsh("site-a", "backup-begin", domain.name)
    assert backup.returncode != 0 and "busy" in backup.stderr, backup.stderr
    entry = status_json(domain_config, domain.name)
    seen = entry["libvirt"]
    assert (seen["name"], seen["host"], seen["state"], seen["managed_save"]) == (domain.name, "site-a", "running",
                                                                                 False), seen
    assert "custom-monitor" in seen["tainted"] and seen["qemu_pid"] > 0 and seen["qemu_started"], seen
    assert any("snapshot-create" in n and "busy" in n for n in seen["notes"]), seen["notes"]
    assert entry["protection"] == "in-sync", entry


def domain_jobs(domain: LabDomain) -> list[dict]:
    out = domain.virsh("qemu-monitor-command", domain.name, '{"execute":"query-block-jobs"}')
    return [j for j in json.loads(out)["return"] if j["device"].startswith("drtool-")]


def test_target_killed_then_resync_catches_up(libvirt_lab: Lab, domain: LabDomain, domain_config: Path):
    pidfile = libvirt_lab.host_dir("site-b") / "replicas" / domain.name / "target.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    domain.guest_write(0, 9 * MiB, MiB, 0x91)  # waits out the reconnect delay, then the job pauses
    domain.guest_write(1, 9 * MiB, MiB, 0x92)
    assert eventually(lambda: all(j["paused"] and j["io-status"] != "ok" for j in domain_jobs(domain)), 60)
    report = json.loads(drtool_ok(domain_config, "--json", "resync", domain.name).stdout)
    assert report["target_restarted"], report
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk0"), 9 * MiB, MiB, 0x91))
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk1"), 9 * MiB, MiB, 0x92))


def test_libvirtd_restarted_during_replication_replication_goes_on(libvirt_lab: Lab, domain: LabDomain,
                                                                   domain_config: Path):
    pidfile = libvirt_lab.host_dir("site-a") / "libvirt" / "run" / "libvirtd.pid"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert eventually(lambda: not Path(f"/proc/{pidfile.read_text().strip()}").exists()
                      if pidfile.exists() else True, 30)
    subprocess.run(in_site(libvirt_lab.sshd_pid("site-a"), ["libvirtd", "-d", "-p", "/run/libvirt/libvirtd.pid"]),
                   check=True, timeout=60)
    wait_libvirtd(libvirt_lab.sshd_pid("site-a"), "site-a")
    jobs = domain_jobs(domain)  # libvirt came back, found jobs it does not track, and left them alone
    assert len(jobs) == 2 and all(j["ready"] and not j["paused"] for j in jobs), jobs
    domain.guest_write(1, 5 * MiB, MiB, 0x5D)
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk1"), 5 * MiB, MiB, 0x5D))
    drtool_ok(domain_config, "checkpoint", domain.name)


def test_managedsave_is_reported_and_resync_resumes_from_the_bitmap(libvirt_lab: Lab, domain: LabDomain,
                                                                     domain_config: Path):
    domain.virsh("managedsave", domain.name)  # libvirt-guests does this at host shutdown: QEMU exits
    status = drtool(domain_config, "status", domain.name)
    assert "managedsave" in status.stdout + status.stderr, status.stdout + status.stderr
    assert status_json(domain_config, domain.name)["libvirt"]["managed_save"] is True
    domain.virsh("start", domain.name)  # restored from the save image, without drtool's jobs
    restored = status_json(domain_config, domain.name)  # found now, not at failover: the QEMU is a new one
    assert restored["protection"] == "broken" and "restored from a managed save" in restored["reason"], restored
    assert restored["libvirt"]["reason"] == "restored" and restored["libvirt"]["managed_save"] is False
    domain.guest_write(0, 11 * MiB, MiB, 0xB1)
    drtool_ok(domain_config, "resync", domain.name)
    assert len(domain_jobs(domain)) == 2
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk0"), 11 * MiB, MiB, 0xB1))


def test_a_drill_runs_a_transient_copy_under_libvirt_and_changes_nothing(libvirt_lab: Lab, domain: LabDomain,
                                                                          domain_config: Path):
    drtool_ok(domain_config, "failover", domain.name, "--test")
    name = f"{domain.name}-drtool-test"
    assert libvirt_lab.virsh("site-b", "domstate", name).stdout.strip() == "running"
    info = libvirt_lab.virsh("site-b", "dominfo", name).stdout
    assert "Persistent:     no" in info  # transient: nothing of it stays in the DR host's libvirt
    assert status_json(domain_config, domain.name)["drill"]["running"] is True  # status sees libvirt's drill copy
    disks = libvirt_lab.virsh("site-b", "domblklist", name, "--details").stdout
    assert disks.count(str(libvirt_lab.host_dir("site-b") / "replicas" / domain.name / "test")) == 2, disks
    # replication goes on meanwhile
    domain.guest_write(1, 3 * MiB, MiB, 0x3C)
    assert eventually(lambda: replica_has(replica(libvirt_lab, domain.name, "virtio-disk1"), 3 * MiB, MiB, 0x3C))
    drtool_ok(domain_config, "failover", domain.name, "--test", "--cleanup")
    assert libvirt_lab.virsh("site-b", "domstate", name).returncode != 0  # gone


def test_planned_failover_runs_the_domain_under_libvirt_on_the_dr_host(libvirt_lab: Lab, domain: LabDomain,
                                                                       domain_config: Path):
    domain.guest_write(0, 7 * MiB, MiB, 0x77)  # the last write before the failover: it must be on the DR copy
    result = drtool_ok(domain_config, "failover", domain.name, "--yes")
    assert "planned" in result.stdout.lower()
    # the source domain is destroyed and will not start with its host; the DR copy is a libvirt domain
    assert domain.virsh("domstate", domain.name).strip() == "shut off"
    assert "Autostart:      disable" in domain.virsh("dominfo", domain.name)
    dr = libvirt_lab.virsh("site-b", "domstate", domain.name)
    assert dr.stdout.strip() == "running", dr.stderr
    sources = libvirt_lab.virsh("site-b", "domblklist", domain.name, "--details").stdout
    replicas = str(libvirt_lab.host_dir("site-b") / "replicas" / domain.name)
    assert sources.count(replicas) == 2, sources
    top = next(line.split()[-1] for line in sources.splitlines() if "vda" in line)
    assert replica_has(Path(top), 7 * MiB, MiB, 0x77)
    entry = status_json(domain_config, domain.name)  # status shows the DR copy as site-b's libvirt domain
    assert (entry["host"], entry["run_state"], entry["protection"]) == ("site-b", "running", "failed-over"), entry
    assert (entry["libvirt"]["host"], entry["libvirt"]["state"]) == ("site-b", "running"), entry["libvirt"]
    assert sorted(d["device"] for d in entry["disks"]) == ["virtio-disk0", "virtio-disk1"], entry["disks"]
    assert all(d["image"].startswith(replicas) and d["virtual_size"] > 0 for d in entry["disks"]), entry["disks"]
    assert entry["libvirt"]["tainted"] == []  # status read the DR copy through libvirt's API: no QMP passed
    libvirt_lab.virsh("site-b", "destroy", domain.name)


def test_unplanned_failover_with_force_starts_the_newest_point_under_libvirt(libvirt_lab: Lab, tmp_path: Path):
    dom = LabDomain(libvirt_lab, "lvdb", "site-a", sizes=("16M",))
    try:
        config = write_domain_config(libvirt_lab, dom.name, tmp_path / "drtool.toml")
        drtool_ok(config, "protect", dom.name)
        dom.guest_write(0, MiB, MiB, 0x0D)
        drtool_ok(config, "checkpoint", dom.name)
        dom.virsh("destroy", dom.name)  # the source's QEMU is gone
        assert drtool(config, "failover", dom.name, "--yes").returncode != 0  # not without --force
        result = drtool_ok(config, "failover", dom.name, "--force", "--yes")
        assert "unplanned" in result.stdout.lower()
        assert libvirt_lab.virsh("site-b", "domstate", dom.name).stdout.strip() == "running"
        top = next(line.split()[-1] for line in libvirt_lab.virsh("site-b", "domblklist", dom.name,
                                                                  "--details").stdout.splitlines() if "vda" in line)
        assert replica_has(Path(top), MiB, MiB, 0x0D)
    finally:
        libvirt_lab.virsh("site-b", "destroy", dom.name)
        dom.remove()


def test_rollback_of_a_libvirt_failover_gives_the_source_domain_back_as_it_was(libvirt_lab: Lab, tmp_path: Path):
    dom = LabDomain(libvirt_lab, "lvrb", "site-a", sizes=("16M",))
    try:
        dom.virsh("autostart", dom.name)
        config = write_domain_config(libvirt_lab, dom.name, tmp_path / "drtool.toml")
        drtool_ok(config, "protect", dom.name)
        dom.guest_write(0, MiB, MiB, 0x1B)
        drtool_ok(config, "failover", dom.name, "--yes")
        assert libvirt_lab.virsh("site-b", "domstate", dom.name).stdout.strip() == "running"
        assert "Autostart:      disable" in dom.virsh("dominfo", dom.name)
        drtool_ok(config, "failover", dom.name, "--rollback", "--yes")
        assert libvirt_lab.virsh("site-b", "dominfo", dom.name).returncode != 0  # destroyed and undefined
        assert dom.virsh("domstate", dom.name).strip() == "running"
        assert "Autostart:      enable" in dom.virsh("dominfo", dom.name)  # as it was before the failover
        entry = status_json(config, dom.name)
        assert (entry["host"], entry["protection"]) == ("site-a", "in-sync"), entry
        dom.guest_write(0, 3 * MiB, MiB, 0x3B)  # replication goes on from the source domain
        assert eventually(lambda: replica_has(replica(libvirt_lab, dom.name, "virtio-disk0"), 3 * MiB, MiB, 0x3B))
        assert replica_has(replica(libvirt_lab, dom.name, "virtio-disk0"), MiB, MiB, 0x1B)
    finally:
        for args in (("destroy", dom.name), ("undefine", dom.name)):
            libvirt_lab.virsh("site-b", *args)
        dom.remove()


def test_live_failover_of_a_libvirt_domain_killed_in_the_pause_rolls_back_then_moves_without_a_reboot(
        libvirt_lab: Lab, tmp_path: Path):
    """drtool's QMP flow under libvirt's eye: the DR copy is a libvirt domain that was migrated, not booted."""
    started = time.monotonic()
    dom = LabDomain(libvirt_lab, "lvlive", "site-a", sizes=("16M", "8M"))
    try:
        dom.virsh("autostart", dom.name)
        config = write_domain_config(libvirt_lab, dom.name, tmp_path / "drtool.toml")
        drtool_ok(config, "protect", dom.name)
        dom.guest_write(0, MiB, MiB, 0x1C)
        # killed inside the guest's pause (the source at pre-switchover, the destination domain listening)
        env = {**os.environ, HOOKS_ENV: "1", FAULT_ENV: "pre-switchover"}
        killed = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), "failover", dom.name,
                                 "--live", "--yes"], capture_output=True, text=True, timeout=300, env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert libvirt_lab.virsh("site-b", "domstate", dom.name).stdout.strip() == "paused"  # the destination
        drtool_ok(config, "failover", dom.name, "--rollback", "--yes")
        assert libvirt_lab.virsh("site-b", "domstate", dom.name).returncode != 0  # transient: gone
        assert dom.virsh("domstate", dom.name).strip() == "running"
        assert "Autostart:      enable" in dom.virsh("dominfo", dom.name)
        dom.guest_write(1, 2 * MiB, MiB, 0x2C)  # replication goes on after the undo
        assert eventually(lambda: replica_has(replica(libvirt_lab, dom.name, "virtio-disk1"), 2 * MiB, MiB, 0x2C))

        dom.guest_write(0, 3 * MiB, MiB, 0x3C)  # the last write before the move
        said = json.loads(drtool_ok(config, "failover", dom.name, "--live", "--yes", "--json").stdout)
        assert said["kind"] == "live" and said["live"]["ram_bytes"] > 0, said
        # the DR copy runs under site-b's libvirt, resumed after a migration (a boot says "running (booted)")
        assert libvirt_lab.virsh("site-b", "domstate", "--reason", dom.name).stdout.strip() == "running (unpaused)"
        info = libvirt_lab.virsh("site-b", "dominfo", dom.name).stdout
        assert "Persistent:     yes" in info, info
        assert "qemu:commandline" not in libvirt_lab.virsh("site-b", "dumpxml", "--inactive", dom.name).stdout
        log = (libvirt_lab.host_dir("site-b") / "libvirt" / "log" / "qemu" / f"{dom.name}.log").read_text()
        assert log.count("starting up libvirt") == 2 and "-incoming defer" in log  # the killed try and this one
        # the source domain is shut off and will not start with its host
        assert dom.virsh("domstate", dom.name).strip() == "shut off"
        assert "Autostart:      disable" in dom.virsh("dominfo", dom.name)
        sources = libvirt_lab.virsh("site-b", "domblklist", dom.name, "--details").stdout
        tops = [Path(line.split()[-1]) for line in sources.splitlines() if " vd" in line]
        replicas = str(libvirt_lab.host_dir("site-b") / "replicas" / dom.name)
        assert len(tops) == 2 and all(str(t).startswith(replicas) for t in tops), sources
        assert not (Path(replicas) / "vm" / "tls").exists()  # the key's copy for libvirt's QEMU is gone
        assert replica_has(tops[0], MiB, MiB, 0x1C) and replica_has(tops[0], 3 * MiB, MiB, 0x3C)
        assert replica_has(tops[1], 2 * MiB, MiB, 0x2C)
        entry = status_json(config, dom.name)
        assert (entry["host"], entry["run_state"], entry["protection"]) == ("site-b", "running", "failed-over")
        at_dr = DrDomain(libvirt_lab, dom.name)
        at_dr.guest_write(0, 5 * MiB, MiB, 0x5C)  # its disks are active: it writes
        assert replica_has(tops[0], 5 * MiB, MiB, 0x5C)
        # a point on the DR domain's own chain, taken through virsh; the persistent definition follows the new top
        points_started = time.monotonic()
        [taken] = json.loads(drtool_ok(config, "checkpoint", dom.name, "--json").stdout)["results"]
        assert taken["error"] is None and taken["point"]["quiesce"] == "drained", taken
        listed = json.loads(drtool_ok(config, "points", dom.name, "--json").stdout)
        assert taken["point"]["id"] in [p["id"] for p in listed["points"]], listed
        frozen = Path(taken["point"]["images"]["virtio-disk0"])
        assert frozen == tops[0], taken["point"]
        at_dr.guest_write(0, 5 * MiB, MiB, 0x6C)  # lands above the point: the point's image keeps 0x5c
        assert replica_has(frozen, 5 * MiB, MiB, 0x5C) and not replica_has(frozen, 5 * MiB, MiB, 0x6C)
        new_top = Path(json.loads((Path(replicas) / "manifest.json").read_text())["disks"][0]["replica_image"])
        assert new_top != frozen and replica_has(new_top, 5 * MiB, MiB, 0x6C)
        assert str(new_top) in libvirt_lab.virsh("site-b", "dumpxml", "--inactive", dom.name).stdout
        # libvirt restarts the domain from its definition: on the new top, which its QEMU user may write
        for verb in ("destroy", "start"):
            restarted = libvirt_lab.virsh("site-b", verb, dom.name)
            assert restarted.returncode == 0, restarted.stderr
        assert str(new_top) in libvirt_lab.virsh("site-b", "domblklist", dom.name).stdout
        new_mode, old_mode = new_top.stat(), tops[1].stat()  # QEMU made one, libvirt labelled the other
        print(f"\nnew top {new_mode.st_uid}:{new_mode.st_gid} {oct(new_mode.st_mode & 0o777)}, "
              f"libvirt's top {old_mode.st_uid}:{old_mode.st_gid} {oct(old_mode.st_mode & 0o777)}")
        assert new_mode.st_uid == old_mode.st_uid and not new_mode.st_mode & 0o002  # no wider than libvirt's own
        at_dr.guest_write(0, 6 * MiB, MiB, 0x7C)
        assert replica_has(new_top, 6 * MiB, MiB, 0x7C) and replica_has(new_top, 5 * MiB, MiB, 0x6C)
        points_seconds = time.monotonic() - points_started
        phases = json.loads((Path(replicas) / "manifest.json").read_text())["failover"]["migration"]["phases"]
        print(f"\nlibvirt live failover: downtime {said['live']['downtime_seconds']} s, move "
              f"{said['live']['move_seconds']} s, phases {phases}; a point on the DR domain held its I/O "
              f"{taken['quiesced_seconds']:.3f} s (checkpoint, points, restart: {points_seconds:.1f} s); "
              f"test {time.monotonic() - started:.1f} s")
        assert said["live"]["downtime_seconds"] is not None and said["live"]["downtime_seconds"] < 5, said["live"]
    finally:
        for args in (("destroy", dom.name), ("undefine", dom.name)):
            libvirt_lab.virsh("site-b", *args)
        dom.remove()


@pytest.mark.parametrize("kind", ["cold", "live"])
def test_a_libvirt_domain_moved_live_is_reprotected_then_failed_back_home_under_libvirt(libvirt_lab: Lab,
                                                                                        tmp_path: Path, kind: str):
    """After the move, the way home: the DR domain replicates home (from the live pause's bitmap), then fails back
    (cold: the home domain boots; live: the DR domain migrates into it)."""
    started = time.monotonic()
    dom = LabDomain(libvirt_lab, f"lvback{kind[0]}", "site-a", sizes=("16M",))
    try:
        dom.virsh("autostart", dom.name)
        config = write_domain_config(libvirt_lab, dom.name, tmp_path / "drtool.toml")
        drtool_ok(config, "protect", dom.name)
        dom.guest_write(0, MiB, MiB, 0x1E)
        drtool_ok(config, "failover", dom.name, "--live", "--yes")
        at_dr = DrDomain(libvirt_lab, dom.name)
        at_dr.guest_write(0, 2 * MiB, MiB, 0x2E)  # written at DR before the reprotect: the bitmap holds it
        said = json.loads(drtool_ok(config, "recover", dom.name, "--reprotect", "--json").stdout)
        assert said["method"] == "bitmap" and said["rewound_bytes"] == 0, said
        at_dr.guest_write(0, 4 * MiB, MiB, 0x4E)  # written at DR while reprotected: the reverse mirror carries it
        home_disk = dom.images[0]
        assert eventually(lambda: replica_has(home_disk, 4 * MiB, MiB, 0x4E))
        watchers = [lifecycle_events(libvirt_lab, host) for host in ("site-b", "site-a")]
        try:
            said = json.loads(drtool_ok(config, "recover", dom.name, "--failback",
                                        *(["--live"] if kind == "live" else []), "--json").stdout)
        finally:
            dr_events, home_events = (stop_events(w) for w in watchers)
        # the guest's pause as libvirt saw it: the DR domain suspended (live: at pre-switchover) until home resumed
        ended = min([t for t, name, what in dr_events if name == dom.name and what.startswith(("Shutdown", "Stopped"))]
                    or [float("inf")])
        suspended = [t for t, name, what in dr_events if name == dom.name and what.startswith("Suspended") and t < ended]
        resumed = [t for t, name, what in home_events if name == dom.name and what.startswith("Resumed")
                   and suspended and t > suspended[-1]]
        downtime = resumed[0] - suspended[-1] if suspended and resumed else None
        reason = dom.virsh("domstate", "--reason", dom.name).strip()
        assert reason == ("running (unpaused)" if kind == "live" else "running (booted)") or \
            (kind == "cold" and reason.startswith("running")), reason  # live: migrated, not booted
        if kind == "live":
            assert "qemu:commandline" not in dom.virsh("dumpxml", "--inactive", dom.name)
        # home runs under libvirt with every write made at DR, its autostart as before; the DR domain is gone
        assert dom.virsh("domstate", dom.name).strip() == "running"
        assert "Autostart:      enable" in dom.virsh("dominfo", dom.name)
        assert libvirt_lab.virsh("site-b", "dominfo", dom.name).returncode != 0
        for offset, pattern in ((MiB, 0x1E), (2 * MiB, 0x2E), (4 * MiB, 0x4E)):
            assert replica_has(home_disk, offset, MiB, pattern), f"0x{pattern:02x} is not on the home disk"
        entry = status_json(config, dom.name)
        assert (entry["host"], entry["protection"]) == ("site-a", "in-sync"), entry
        dom.guest_write(0, 6 * MiB, MiB, 0x6E)  # protection resumed forward
        assert eventually(lambda: replica_has(replica(libvirt_lab, dom.name, "virtio-disk0"), 6 * MiB, MiB, 0x6E))
        paused = "guest paused" if kind == "live" else "no copy running"  # cold: home boots after the DR copy ended
        print(f"\nlibvirt live failover, reprotect, {kind} failback (rto {said.get('rto_seconds')} s, {paused} "
              f"{downtime if downtime is None else round(downtime, 3)} s): test {time.monotonic() - started:.1f} s")
        if kind == "live":
            assert downtime is not None and downtime < 5, (dr_events, home_events)
    finally:
        for args in (("destroy", dom.name), ("undefine", dom.name)):
            libvirt_lab.virsh("site-b", *args)
        dom.remove()


def lifecycle_events(lab: Lab, host: str) -> subprocess.Popen[str]:
    """libvirt's lifecycle events of every domain on a lab host, as they come (virsh event --timestamp)."""
    argv = in_site(lab.sshd_pid(host), ["virsh", "-c", "qemu:///system", "event", "--all", "--loop", "--timestamp"])
    watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.5)  # registered
    return watcher


def stop_events(watcher: subprocess.Popen[str]) -> list[tuple[float, str, str]]:
    """(time, domain, what) of each lifecycle event the watcher saw, once it is stopped."""
    watcher.terminate()
    out, _ = watcher.communicate(timeout=30)
    events = []
    for line in out.splitlines():
        found = re.match(r"(\S+ \S+?)([+-]\d{4}): event 'lifecycle' for domain '([^']+)': (.*)$", line.strip())
        if found:
            stamp = datetime.strptime(found[1] + found[2], "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
            events.append((stamp, found[3], found[4]))
    return events


class DrDomain(LabDomain):
    """A domain drtool started on a lab host (no images of its own): writes through its device."""

    def __init__(self, lab: Lab, name: str, host: str = "site-b") -> None:  # not LabDomain.__init__: the domain exists
        self.lab, self.name, self.host = lab, name, host
