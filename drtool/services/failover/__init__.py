"""`drtool failover`: planned, unplanned (and a planned one made unplanned), and --rollback.

One service in a few modules: command (the entry point), plan (what will run,
where an unplanned one starts), planned and unplanned (their steps), steps
(what both do on the DR host), rollback.
"""

from drtool.state.records import LIVE_STEPS, PLANNED_STEPS, UNPLANNED_STEPS

from .command import Confirm, FailoverResult, failover
from .live import live_failover
from .plan import FailoverPlan, Start, default_start, plan
from .rollback import RollbackResult, rollback
from .steps import FAULT_ENV, HOOKS_ENV
from .unplanned import LATEST

__all__ = ["FAULT_ENV", "HOOKS_ENV", "LATEST", "LIVE_STEPS", "PLANNED_STEPS", "UNPLANNED_STEPS", "Confirm",
           "FailoverPlan", "FailoverResult", "RollbackResult", "Start", "default_start", "failover", "live_failover",
           "plan", "rollback"]
