"""`drtool failover --live` of a libvirt domain in the fake world: the destination is a libvirt domain.

Whatever happens: never two running copies; when the VM ends on the DR host it
runs there as a persistent libvirt domain (defined without the -incoming line),
the source domain is destroyed and kept from autostart, and the DR copy has
every record the guest wrote at the source.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from drtool.errors import DrtoolError, Refused
from drtool.services import failover
from drtool.services.failover import live_libvirt
from drtool.services.recover.failback_live import failback_live
from drtool.state.protection import Protection
from drtool.state.records import LIVE_STEPS, FailoverKind, Step

from . import test_live_failover
from .libvirt_live_world import LibvirtLiveWorld, protected_libvirt_world, session_with_event_streams
from .world import REPLICAS, Killed

catch_up = test_live_failover.catch_up  # autouse here too: resync's catch-up after an undo, counted


@pytest.fixture(autouse=True)
def events_through_virsh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's session: VirshQmp on the fake DR host, with an event stream that stays quiet."""
    monkeypatch.setattr(live_libvirt, "domain_session", session_with_event_streams)


def assert_libvirt_domain_on_dr_with_every_write(world: LibvirtLiveWorld) -> None:
    assert world.manifest.state is Protection.FAILED_OVER
    assert world.dr_domain == "running" and world.dr_persistent, (world.dr_domain, world.dr_persistent)
    assert not world.source_alive and not world.source_autostart
    assert world.running_copies() == 1
    assert world.dr_sees() == world.written, f"the DR copy lacks {world.written - world.dr_sees()} records"
    assert not world.target_running and not world.link_up


def test_the_destination_is_a_paused_transient_domain_with_incoming_defer_then_defined_clean() -> None:
    world, reach, inv = protected_libvirt_world()
    result = failover.live_failover(inv, reach, "web")
    assert (result.kind, result.rpo_seconds, result.run_state) == ("live", 0.0, "running")
    assert_libvirt_domain_on_dr_with_every_write(world)
    assert world.incoming_args[-2:] == ("-incoming", "defer"), world.incoming_args
    assert world.dr_vm is not None and world.dr_vm.startswith(str(inv.vms["web"].replica_dir))
    record = world.manifest.failover
    assert record is not None and record.kind is FailoverKind.LIVE and record.steps == LIVE_STEPS
    log = world.log
    # created paused, the mirrors completed in the pause, resumed through libvirt, then persistent, then the
    # source destroyed (its autostart off first)
    assert log.index("dr virsh create") < log.index("source migrate") < log.index("block-job-cancel") \
        < log.index("source migrate-continue") < log.index("dr virsh resume") < log.index("dr virsh define") \
        < log.index("source virsh autostart") < log.index("source virsh destroy")
    assert world.bitmaps_at_cont and record.migration is not None  # reverse bitmap before the DR copy ran
    assert "<name>web</name>" in world.dr_defined_xml and "vd0.qcow2" in world.dr_defined_xml


def test_plan_names_libvirts_own_steps() -> None:
    world, reach, inv = protected_libvirt_world()
    result = failover.live_failover(inv, reach, "web", dry_run=True)
    assert result.plan is not None
    lines = dict(line.split(": ", 1) for line in result.plan.steps)
    assert "virsh create --paused" in lines["destination-started"]
    assert "virsh resume web" in lines["dr-started"] and "virsh destroy web" in lines["source-stopped"]
    assert world.dr_domain == "" and world.manifest.failover is None


@pytest.mark.parametrize("step", LIVE_STEPS)
def test_killed_after_each_step_a_rerun_ends_with_one_libvirt_copy_and_every_write(step: Step) -> None:
    world, reach, inv = protected_libvirt_world()
    world.kill_after_save(lambda raw: bool(raw.get("failover")) and step.value in raw["failover"]["steps"])
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    assert world.running_copies() <= 1
    world.tick()
    result = failover.live_failover(inv, reach, "web")
    assert_libvirt_domain_on_dr_with_every_write(world)
    undone = step in (Step.DESTINATION_STARTED, Step.MIGRATION_STARTED)
    assert any("undone" in n for n in result.notes) == undone, result.notes


@pytest.mark.parametrize("command", ["migrate", "block-job-cancel", "migrate-continue"])
def test_rollback_before_the_switch_destroys_the_destination_domain_and_the_source_runs_on(command: str) -> None:
    world, reach, inv = protected_libvirt_world()
    world.qmp_faults[command] = "kill"
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    assert world.dr_domain == "paused"  # the destination waits, in inmigrate
    result = failover.rollback(inv, reach, "web")
    assert result.source_state == "running" and "migration-started" in result.undone
    assert world.dr_domain == "" and world.dr_vm is None  # transient: gone with its destroy
    assert world.manifest.state is Protection.PROTECTED and world.manifest.failover is None
    assert world.source_status == "running" and world.source_autostart and world.target_running


def test_a_destination_that_cannot_run_is_destroyed_and_the_source_resumes(catch_up: list[str]) -> None:
    world, reach, inv = protected_libvirt_world()
    world.dest_cannot_run = True
    with pytest.raises(DrtoolError, match="failed and was undone"):
        failover.live_failover(inv, reach, "web")
    assert world.dr_domain == "" and world.source_status == "running" and world.source_autostart
    assert world.manifest.state is Protection.PROTECTED and world.running_copies() == 1 and catch_up == ["web"]


def test_refused_when_the_dr_hosts_libvirt_runs_a_domain_of_that_name() -> None:
    world, reach, inv = protected_libvirt_world()
    world.domain_other_on_dr = True
    before = world.manifest.to_json()
    with pytest.raises(Refused, match="libvirt on kvm2 already has domain 'web' running") as err:
        failover.live_failover(inv, reach, "web")
    assert "virsh destroy web" in (err.value.hint or "")
    assert world.manifest.to_json() == before and "dr virsh create" not in world.log


def test_refused_without_the_domains_definition_in_the_manifest() -> None:
    world, reach, inv = protected_libvirt_world()
    manifest = world.manifest
    hardware = {k: v for k, v in manifest.hardware.items() if k != "libvirt_xml"}
    world.files[str(REPLICAS / "manifest.json")] = replace(manifest, hardware=hardware).to_json()
    with pytest.raises(Refused, match="keeps no libvirt definition"):
        failover.live_failover(inv, reach, "web")
    assert world.manifest.failover is None


def test_live_failback_of_a_libvirt_domain_before_reprotect_is_refused_with_why_and_changes_nothing() -> None:
    world, reach, inv = protected_libvirt_world()
    failover.live_failover(inv, reach, "web")
    before = world.manifest.to_json()
    with pytest.raises(Refused, match="not reprotected") as err:
        failback_live(inv, reach, "web")
    assert "--reprotect" in (err.value.hint or "")
    assert world.manifest.to_json() == before and world.dr_domain == "running"


def test_over_tls_the_destination_reads_a_copy_of_the_key_its_qemu_user_owns_and_the_copy_goes() -> None:
    world, reach, inv = protected_libvirt_world(transport="tls-psk")
    failover.live_failover(inv, reach, "web")
    assert_libvirt_domain_on_dr_with_every_write(world)
    run_dir = str(inv.vms["web"].replica_dir / "vm")
    [(directory, source, owner)] = world.key_copies
    assert (directory, source, owner) == (f"{run_dir}/tls", f"{REPLICAS}/tls/keys.psk", "64055:64055")
    tls_object = next(a for a in world.incoming_args if "tls-creds-psk" in a)
    assert f'"dir": "{run_dir}/tls"' in tls_object and '"endpoint": "server"' in tls_object
    assert world.incoming_args.index(tls_object) < world.incoming_args.index("-incoming")
    assert f"dr rm {run_dir}/tls" in world.log  # dropped once the destination migrated
