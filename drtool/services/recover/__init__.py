"""`drtool recover`: after a failover, protect the VM back home (--reprotect) and fail it back
(--failback); restore any point (--restore)."""

from .failback import FailbackResult, failback
from .reprotect import ReprotectResult, reprotect
from .restore import RestoreResult, restore

__all__ = ["FailbackResult", "ReprotectResult", "RestoreResult", "failback", "reprotect", "restore"]
