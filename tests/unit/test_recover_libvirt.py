"""`drtool recover --reprotect` and `--failback` of a VM that libvirt runs on both hosts, in the fake world.

The DR copy is reached through the DR host's libvirt (the reverse Vm keeps libvirt_domain), its QEMU user is
given the relay socket and the key; failback destroys the DR domain, starts the home domain paused under
libvirt, undefines the DR domain and restores the home autostart. Killed after each recorded step, the same
command run again finishes, and never do two copies run (the world asserts it on every monitor command).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from drtool.errors import Refused
from drtool.mechanics import dr_target, link
from drtool.services.recover import reprotect
from drtool.state.protection import Protection

from .libvirt_recover_world import LibvirtRecoverWorld, reprotected_libvirt_world
from . import test_failback_live
from .world import Killed

failback = importlib.import_module("drtool.services.recover.failback")
REPROTECT_STEPS = ("reprotecting", "rewound", "target-started", "mirrors-started", "reprotected")
FAILBACK_STEPS = ("failing-back", failback.DR_PAUSED, failback.REVERSE_STOPPED, failback.DR_STOPPED,
                  failback.HOME_STARTED, failback.FORWARD_STARTED)


def saved(step: str):  # noqa: ANN201
    def pred(raw: dict) -> bool:
        if step in ("reprotecting", "reprotected", "failing-back"):
            return raw.get("state") == step
        return bool(raw.get("reprotect")) and step in raw["reprotect"]["steps"]
    return pred


def qmp_hosts(reach: Any) -> list[tuple[str, str | None]]:
    """Each Reach.qmp call's (host, libvirt domain): the DR copy must be reached through libvirt."""
    seen: list[tuple[str, str | None]] = []
    original = reach.qmp

    def qmp(vm: Any) -> Any:
        seen.append((vm.host, vm.libvirt_domain))
        return original(vm)

    reach.qmp = qmp
    return seen


def assert_reprotected(world: LibvirtRecoverWorld) -> None:
    assert world.manifest.state is Protection.REPROTECTED
    assert world.home == world.dr_view(), "the old image differs from the DR copy"
    assert world.rev_target and world.rev_link and world.rev_job == "running"


@pytest.mark.parametrize("step", REPROTECT_STEPS)
def test_reprotect_of_a_libvirt_dr_copy_goes_through_virsh_and_finishes_after_a_kill(
        step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch, reprotect_first=False)
    world.writing = False
    seen = qmp_hosts(reach)
    world.kill_after_save(saved(step))
    with pytest.raises(Killed):
        reprotect(inv, reach, "web")
    world.revive()
    world.dr_guest_writes(7, "dr7-meanwhile")
    reprotect(inv, reach, "web")
    assert_reprotected(world)
    assert ("kvm2", "web") in seen and {h for h, _ in seen} == {"kvm2"}, seen  # the DR domain, through virsh
    rvm = reprotect_module().reverse_vm(inv, inv.vm("web"))
    given = {p for host, p in world.chowned if host == "dr"}
    assert str(link.link_socket(rvm)) in given, "libvirt's QEMU cannot reach the reverse relay"
    assert str(dr_target.source_tls_dir(rvm)) in given, "libvirt's QEMU cannot read the reverse key"


def reprotect_module() -> Any:
    return importlib.import_module("drtool.services.recover.reprotect")


def assert_home_under_libvirt(world: LibvirtRecoverWorld) -> None:
    assert world.manifest.state is Protection.PROTECTED and world.manifest.reprotect is None
    assert world.home_qemu == "running" and world.home_starts == 1, "the home domain started more than once"
    assert world.dr_vm is None and not world.dr_domain_defined, "the DR domain is not gone"
    assert world.home_autostart and world.autostart_record is None, "autostart not restored as recorded"
    assert world.forward_jobs and not world.rev_target and not world.rev_link
    assert not world.home_has_every_dr_write(), "a write of the DR copy is missing at home"


def test_failback_of_a_libvirt_vm_starts_the_home_domain_and_removes_the_dr_domain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    seen = qmp_hosts(reach)
    failback.failback(inv, reach, "web")
    assert_home_under_libvirt(world)
    log = "\n".join(world.log)
    assert log.index("dr virsh destroy") < log.index("home virsh start") < log.index("dr virsh undefine")
    assert ("kvm1", "web") in seen, "the home domain's QMP is not libvirt's"
    assert ("home", str(dr_target.source_tls_dir(inv.vm("web")))) in world.chowned


@pytest.mark.parametrize("step", FAILBACK_STEPS)
def test_failback_of_a_libvirt_vm_killed_after_each_step_finishes_with_one_copy(
        step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    world.kill_after_save(saved(step))
    with pytest.raises(Killed):
        failback.failback(inv, reach, "web")
    world.revive()
    failback.failback(inv, reach, "web")
    assert_home_under_libvirt(world)


def test_failback_redefines_a_home_domain_libvirt_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    world.home_domain_defined = False  # e.g. undefined by hand while the VM ran at DR
    failback.failback(inv, reach, "web")
    assert "home virsh define" in world.log
    assert_home_under_libvirt(world)


# --- recover --failback --live of a libvirt VM ------------------------------------------------------------

failback_live = importlib.import_module("drtool.services.recover.failback_live")
calls = test_failback_live.calls  # the fixture: resync after the move and reprotect after an undo, counted
LIVE_STEPS = ("failing-back", failback_live.LIVE_HOME_STARTED, failback_live.LIVE_MIGRATING, failback.DR_STOPPED)


def assert_home_live_under_libvirt(world: LibvirtRecoverWorld) -> None:
    assert world.manifest.state is Protection.PROTECTED and world.manifest.reprotect is None
    assert world.home_qemu == "running" and world.running_copies() == 1
    assert world.dr_vm is None and not world.dr_domain_defined, "the DR domain is not gone"
    assert world.home_autostart and world.autostart_record is None, "autostart not restored as recorded"
    assert "home virsh define" in world.log, "the home domain keeps the incoming definition"
    assert not world.home_has_every_dr_write(), "a write of the DR copy is missing at home"


def test_live_failback_of_a_libvirt_vm_migrates_into_the_home_domain(calls: dict[str, list[str]],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    seen = qmp_hosts(reach)
    failback_live.failback_live(inv, reach, "web")
    assert_home_live_under_libvirt(world)
    assert world.home_starts == 1 and "home virsh start" not in world.log  # created incoming, not booted
    log = world.log
    assert log.index("home virsh create") < log.index("dr migrate") < log.index("dr migrate-continue")
    assert log.index("home cont") < log.index("dr virsh destroy") < log.index("dr virsh undefine")
    assert ("kvm2", "web") in seen and ("kvm1", "web") in seen
    assert calls == {"resync": ["web"], "reprotect": []}


@pytest.mark.parametrize("step", LIVE_STEPS)
def test_live_failback_of_a_libvirt_vm_killed_after_each_step_finishes_with_one_copy(
        step: str, calls: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    world.kill_after_save(saved(step) if step == "failing-back" else
                          (lambda raw: bool(raw.get("reprotect")) and step in raw["reprotect"]["steps"]))
    with pytest.raises(Killed):
        failback_live.failback_live(inv, reach, "web")
    world.revive()
    assert world.running_copies() == 1
    failback_live.failback_live(inv, reach, "web")
    assert_home_live_under_libvirt(world)
    assert calls["reprotect"] == ([] if step == failback.DR_STOPPED else ["web"])


@pytest.mark.parametrize("command", ["block-job-cancel", "migrate-continue"])
def test_live_failback_of_a_libvirt_vm_killed_in_the_pause_is_undone_by_destroying_the_home_domain(
        command: str, calls: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    world.dr_faults[command] = "kill"
    with pytest.raises(Killed):
        failback_live.failback_live(inv, reach, "web")
    world.revive()
    failback_live.failback_live(inv, reach, "web")  # undone (home destroyed), caught up, moved afresh
    assert world.home_starts == 2 and "home virsh destroy" in world.log
    assert_home_live_under_libvirt(world)
    assert calls["reprotect"] == ["web"]


def test_live_failback_refuses_while_libvirt_runs_the_home_domain(calls: dict[str, list[str]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    world, reach, inv = reprotected_libvirt_world(monkeypatch)
    world.home_qemu = "running"  # someone started it by hand: a migration home would make a second copy
    world.writing = False
    before = world.files[str(world_manifest_path())]
    with pytest.raises(Refused, match="already has domain 'web' running") as err:
        failback_live.failback_live(inv, reach, "web")
    assert "virsh destroy web" in (err.value.hint or "")
    assert world.files[str(world_manifest_path())] == before


def world_manifest_path() -> Any:
    from .world import REPLICAS

    return REPLICAS / "manifest.json"
