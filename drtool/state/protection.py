"""A VM's protection state and the transitions between them.

Services never write a state by name: they ask the manifest to `transition`
to one, and an edge not listed here raises. Whether a drill runs is a record
(Manifest.drill), not a state: protection goes on beside it.

    SEEDING ------> PROTECTED <------> RESYNCING
       |               |                  |
       +---------------+------------------+--> FAILING_OVER --> FAILED_OVER
       |               |                  |          |               |
       +---------------+------------------+--> UNPROTECTED           |
                       ^  (rollback)                  |               |
                       +------------------------------+---------------+

After a failover, `drtool recover` protects the VM in the reverse direction
(DR host -> original host) and fails it back:

    FAILED_OVER --> REPROTECTING --> REPROTECTED --> FAILING_BACK --> PROTECTED
                        ^  |                            (original direction)
                        +--+ (a re-run resumes; a cut link leaves it reprotecting)
"""

from __future__ import annotations

from enum import Enum

from drtool.errors import DrtoolError


class Protection(str, Enum):
    SEEDING = "seeding"  # the initial full copy runs: the replicas are not yet an image of anything
    PROTECTED = "protected"  # the replicas follow the source
    RESYNCING = "resyncing"  # a resync (any tier) is copying into the replicas: not a consistent image
    FAILING_OVER = "failing-over"  # a failover is under way (see Manifest.failover)
    FAILED_OVER = "failed-over"  # the VM runs on its DR host, on the replicas or a point's overlays
    UNPROTECTED = "unprotected"  # replication stopped; the replicas and points are kept
    REPROTECTING = "reprotecting"  # the DR copy is being replicated back onto the original host's old images
    REPROTECTED = "reprotected"  # the DR copy runs, replicated to the original host (the reverse direction)
    FAILING_BACK = "failing-back"  # a planned failover back to the original host is under way

    @property
    def replicating(self) -> bool:
        """The replicas take the source's writes (mirror jobs exist or should)."""
        return self in (Protection.SEEDING, Protection.PROTECTED, Protection.RESYNCING)

    @property
    def failing_over(self) -> bool:
        """The replicas are (becoming) the DR copy's disks: nothing else may touch them."""
        return self in (Protection.FAILING_OVER, Protection.FAILED_OVER, Protection.REPROTECTING,
                        Protection.REPROTECTED, Protection.FAILING_BACK)

    @property
    def reverse(self) -> bool:
        """The DR copy runs and `drtool recover` owns replication (DR host -> original host)."""
        return self in (Protection.REPROTECTING, Protection.REPROTECTED, Protection.FAILING_BACK)

    @property
    def replicas_consistent(self) -> bool:
        """The replicas as last written are a crash-consistent image (in sync mode)."""
        return self is Protection.PROTECTED


ALLOWED: dict[Protection, frozenset[Protection]] = {
    Protection.SEEDING: frozenset({Protection.PROTECTED, Protection.FAILING_OVER, Protection.UNPROTECTED}),
    Protection.PROTECTED: frozenset({Protection.RESYNCING, Protection.FAILING_OVER, Protection.UNPROTECTED}),
    Protection.RESYNCING: frozenset({Protection.PROTECTED, Protection.FAILING_OVER, Protection.UNPROTECTED}),
    Protection.FAILING_OVER: frozenset({Protection.FAILED_OVER, Protection.PROTECTED}),  # PROTECTED: rollback
    Protection.FAILED_OVER: frozenset({Protection.PROTECTED,  # rollback of a planned failover
                                       Protection.REPROTECTING}),
    Protection.REPROTECTING: frozenset({Protection.REPROTECTED}),
    Protection.REPROTECTED: frozenset({Protection.REPROTECTING, Protection.FAILING_BACK}),  # REPROTECTING: broken
    Protection.FAILING_BACK: frozenset({Protection.PROTECTED, Protection.REPROTECTED}),  # REPROTECTED: undone
    Protection.UNPROTECTED: frozenset(),  # protect again only after the replicas are deleted
}


class ForbiddenTransition(DrtoolError):
    """drtool tried a state change its state model forbids: a bug, nothing was written."""


def allowed(source: Protection, target: Protection) -> bool:
    """Whether a manifest in state `source` may become `target` (staying put is always allowed)."""
    return source is target or target in ALLOWED[source]


def check_transition(source: Protection, target: Protection, vm: str) -> None:
    if not allowed(source, target):
        raise ForbiddenTransition(f"{vm}: protection state {source.value} cannot become {target.value}",
                                  hint="this is a drtool bug; nothing was changed, please report it")


class Health(str, Enum):
    """How one disk's replication is, ranked from good to bad (status shows the worst)."""

    IN_SYNC = "in-sync"
    LAGGING = "lagging"
    SEEDING = "seeding"
    BROKEN = "broken"
    UNKNOWN = "unknown"
    FAILED_OVER = "failed-over"
    FAILING_OVER = "failing-over"
    SPLIT_BRAIN = "split-brain"
    UNPROTECTED = "unprotected"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def ok(self) -> bool:
        return self is Health.IN_SYNC

    @property
    def label(self) -> str:
        """For people: "in sync" (the value, "in-sync", is for scripts)."""
        return self.value.replace("-", " ")


_RANK = {Health.UNPROTECTED: 0, Health.FAILED_OVER: 0, Health.IN_SYNC: 1, Health.LAGGING: 2, Health.SEEDING: 3,
         Health.FAILING_OVER: 4, Health.UNKNOWN: 5, Health.BROKEN: 5, Health.SPLIT_BRAIN: 6}


def worst(healths: list[Health]) -> Health:
    return max(healths, key=lambda h: h.rank, default=Health.UNPROTECTED)
