"""Each checkpoint reads the source's command line again and maps it as a failover would (fake world)."""

from __future__ import annotations

from drtool.errors import ExitCode
from drtool.services import checkpoint

from .world import HARDWARE_ARGV, protected_world

RBD_DISK = ["-drive", "file=rbd:pool/web-logs,format=raw,if=none,id=drive-logs",
            "-device", "virtio-blk-pci,drive=drive-logs,id=logs"]


def test_a_vm_restarted_with_a_network_disk_is_reported_at_the_next_checkpoint() -> None:
    world, reach, inv = protected_world()
    world.source_argv = [*HARDWARE_ARGV, *RBD_DISK]
    result = checkpoint.checkpoint(inv, reach, ["web"]).results[0]
    assert result.point is not None  # the point stands: the replicas are fine
    assert result.exit_code is ExitCode.FAILED
    assert "a failover could not start the VM as it runs now" in result.error and "logs (rbd" in result.error
    assert world.manifest.hardware["argv"] == HARDWARE_ARGV  # the last command line that maps stays


def test_a_command_line_that_maps_is_kept_for_failover() -> None:
    world, reach, inv = protected_world()
    world.source_argv = [*HARDWARE_ARGV, "-rtc", "base=utc"]
    result = checkpoint.checkpoint(inv, reach, ["web"]).results[0]
    assert (result.exit_code, result.error) == (ExitCode.OK, None)
    assert world.manifest.hardware["argv"] == world.source_argv
