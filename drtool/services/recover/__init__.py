"""`drtool recover`: after a failover, protect the VM back home (--reprotect) and fail it back (--failback)."""

from .failback import FailbackResult, failback
from .reprotect import ReprotectResult, reprotect

__all__ = ["FailbackResult", "ReprotectResult", "failback", "reprotect"]
