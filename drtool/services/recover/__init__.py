"""`drtool recover`: after a failover, protect the VM back home (--reprotect) and fail it back
(--failback); restore any point (--restore)."""

from .failback import FailbackResult, failback
from .failback_live import failback_live
from .reprotect import ReprotectResult, reprotect
from .restore import RestoreResult, restore

__all__ = ["FailbackResult", "ReprotectResult", "RestoreResult", "failback", "failback_live", "reprotect", "restore"]
