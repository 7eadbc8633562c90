"""A checkpoint pauses the guest only for a short drain: never while seeding or far behind."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from drtool.domain import Vm
from drtool.errors import Refused
from drtool.mechanics.replication import JobState
from drtool.mechanics.pausing import refuse_when_behind
from drtool.services.checkpoint import MAX_BEHIND

VM = Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath("/dr/web"))


def job(offset: int, length: int = 1 << 30, ready: bool = True) -> JobState:
    return JobState("drtool-mirror0", "vd0", length, offset, ready, "ready" if ready else "running", False, "ok")


def test_a_checkpoint_while_seeding_is_refused():
    with pytest.raises(Refused, match="web is still seeding its replicas"):
        refuse_when_behind(VM, [job(1 << 20, ready=False)], MAX_BEHIND)


def test_a_checkpoint_far_behind_is_refused_and_says_how_far():
    behind = [job((1 << 30) - 40 * (1 << 20)), job((1 << 30) - 1)]
    with pytest.raises(Refused, match=r"are 40\.0 MiB behind"):
        refuse_when_behind(VM, behind, MAX_BEHIND)


def test_a_checkpoint_a_little_behind_goes_ahead():
    refuse_when_behind(VM, [job((1 << 30) - (1 << 20)), job(1 << 30)], MAX_BEHIND)
