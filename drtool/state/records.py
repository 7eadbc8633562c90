"""Typed records the manifest keeps beside the protection state: a failover, a drill, a pending point, a pause.

Each reads its format-1 shape (the plain dicts drtool wrote before) as well
as its own, so a DR host's existing manifest.json still loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any


class FailoverKind(str, Enum):
    PLANNED = "planned"  # the source answers: it is stopped after a final point, RPO 0
    UNPLANNED = "unplanned"  # the source is gone (fenced, --force): start from a point or the replicas


class Step(str, Enum):
    """A failover's steps, each recorded once done (planned: all five; unplanned: the last two)."""

    SOURCE_PAUSED = "source-paused"
    FINAL_POINT = "final-point"
    REPLICATION_STOPPED = "replication-stopped"
    SOURCE_STOPPED = "source-stopped"
    DR_STARTED = "dr-started"


PLANNED_STEPS = (Step.SOURCE_PAUSED, Step.FINAL_POINT, Step.REPLICATION_STOPPED, Step.SOURCE_STOPPED,
                 Step.DR_STARTED)
UNPLANNED_STEPS = (Step.REPLICATION_STOPPED, Step.DR_STARTED)


@dataclass(frozen=True)
class FailoverRecord:
    """The failover under way or done, step by step."""

    kind: FailoverKind
    started_at: str
    steps: tuple[Step, ...] = ()
    point: str | None = None  # the point the DR copy starts above (planned: the final point)
    start_reason: str = ""  # why that point (unplanned): said in the plan and the result
    source_was: str | None = None  # the source's run state before drtool paused it
    state_before: str | None = None  # the protection state when the failover began (were the replicas in sync?)
    converted_from: tuple[Step, ...] | None = None  # an interrupted planned failover's steps, made unplanned
    step_seconds: dict[str, float] = field(default_factory=dict)
    source_seen: dict[str, Any] | None = None  # unplanned: what the DR host saw of the source (recovery_objectives)
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    rpo_bound: str | None = None  # exact | upper bound | unknown
    finished_at: str | None = None

    def done(self, step: Step) -> bool:
        return step in self.steps

    def with_step(self, step: Step, seconds: float) -> FailoverRecord:
        return replace(self, steps=(*self.steps, step) if step not in self.steps else self.steps,
                       step_seconds=self.step_seconds | {step.value: round(seconds, 3)})

    def without(self, *steps: Step) -> FailoverRecord:
        """The record once these steps are undone: a re-run does them again."""
        return replace(self, steps=tuple(s for s in self.steps if s not in steps),
                       step_seconds={k: v for k, v in self.step_seconds.items() if k not in {s.value for s in steps}})

    @classmethod
    def load(cls, raw: dict[str, Any]) -> FailoverRecord:
        return cls(
            kind=FailoverKind(raw["kind"]),
            started_at=str(raw.get("started_at", "")),
            steps=tuple(Step(s) for s in raw.get("steps", ())),
            point=raw.get("point"),
            start_reason=str(raw.get("start_reason", "")),
            source_was=raw.get("source_was"),
            state_before=raw.get("state_before"),
            converted_from=tuple(Step(s) for s in raw["converted_from"]) if raw.get("converted_from") else None,
            step_seconds={str(k): float(v) for k, v in raw.get("step_seconds", {}).items()},
            source_seen=raw.get("source_seen"),
            rto_seconds=raw.get("rto_seconds"),
            rpo_seconds=raw.get("rpo_seconds"),
            rpo_bound=raw.get("rpo_bound"),
            finished_at=raw.get("finished_at"),
        )


@dataclass(frozen=True)
class DrillRecord:
    """A test failover that runs on the DR host (on overlays of a point)."""

    point: str
    started_at: str
    seconds: float | None = None  # command start to the test VM running
    run_state: str | None = None

    @classmethod
    def load(cls, raw: dict[str, Any]) -> DrillRecord:
        return cls(str(raw["point"]), str(raw.get("started_at", "")), raw.get("seconds"),
                   raw.get("run_state", raw.get("state")))


@dataclass(frozen=True)
class RecoveryPoint:
    """A point in time on the DR side, consistent across all the VM's disks.

    Its images are the frozen tops of each replica's chain when it was taken:
    read-only from then on, since replication writes to the overlay above.
    """

    id: str
    time: str
    quiesce: str  # frozen (guest agent fsfreeze) | paused (QMP stop) | final (failover) | unplanned-latest
    quiesce_seconds: float
    images: dict[str, str]  # device id -> the point's image on the DR host
    tested_at: str | None = None
    kept: bool = False  # pinned (checkpoint --keep, points --keep): retention never deletes it


@dataclass(frozen=True)
class PendingPoint:
    """A point recorded before its snapshot transaction (see mechanics/points.py)."""

    point: RecoveryPoint
    tops: dict[str, str]  # device id -> the new overlay that takes replication's writes after it

    @classmethod
    def load(cls, raw: dict[str, Any]) -> PendingPoint:
        return cls(RecoveryPoint(**raw["point"]), dict(raw["tops"]))


@dataclass(frozen=True)
class SourcePause:
    """drtool paused the source VM (written before the QMP stop): whoever finds it, resumes it."""

    by: str  # the command that paused it: checkpoint, resync
    at: str

    @classmethod
    def load(cls, raw: dict[str, Any]) -> SourcePause:
        return cls(str(raw["by"]), str(raw["at"]))


@dataclass(frozen=True)
class ReprotectRecord:
    """`drtool recover --reprotect`: the DR copy replicated back onto the original host's old images.

    Written before each step acts (see services/recover.py); a re-run reads it
    and re-checks on the hosts what each step left.
    """

    started_at: str
    method: str  # how the blocks that differ are known: "final point" (planned) or "hashes" (unplanned)
    point: str | None  # the point the DR copy started above
    nbd_port: int  # the reverse target's port on the original host
    steps: tuple[str, ...] = ()  # rewound, target-started, mirrors-started, in-sync
    rewound_bytes: int = 0  # old-host blocks set back to the point (unplanned: newer writes that never reached DR)
    hashed_bytes: int = 0  # digests that crossed the network for that
    sent_bytes: int = 0  # what the mirrors copied
    disk_bytes: int = 0  # the disks' virtual size, beside it
    step_seconds: dict[str, float] = field(default_factory=dict)  # how long each step took (its last run)
    seconds: float | None = None
    finished_at: str | None = None

    def done(self, step: str) -> bool:
        return step in self.steps

    def with_step(self, step: str, **changes: Any) -> ReprotectRecord:
        return replace(self, steps=(*self.steps, step) if step not in self.steps else self.steps, **changes)

    def without(self, *steps: str) -> ReprotectRecord:
        return replace(self, steps=tuple(s for s in self.steps if s not in steps))

    @classmethod
    def load(cls, raw: dict[str, Any]) -> ReprotectRecord:
        return cls(**(raw | {"steps": tuple(raw.get("steps", ()))}))


def dump(record: object) -> dict[str, Any] | None:
    """A record as JSON-ready data (enums as their values), None for no record."""
    if record is None:
        return None
    data: dict[str, Any] = asdict(record)  # type: ignore[call-overload]  # a dataclass instance
    return data
