"""Asking before destructive actions: the exact VM name on a terminal, --yes or DRTOOL_YES=1 elsewhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from drtool.errors import UsageError
from drtool.services.failover import FailoverPlan

from .output import Output


def confirmer(out: Output, yes: bool) -> Callable[[FailoverPlan], bool]:
    def confirm(plan: FailoverPlan) -> bool:
        if yes or os.environ.get("DRTOOL_YES") == "1":
            return True
        if not sys.stdin.isatty():
            raise UsageError(f"{plan.kind} failover of {plan.vm} needs confirmation",
                             hint="pass --yes (or set DRTOOL_YES=1) to run it unattended")
        out.info(f"{plan.kind} of {plan.vm}:")
        for step in plan.steps:
            out.info(f"  {step}")
        for warning in plan.warnings:
            out.info(f"  warning: {warning}")
        answer = input(f"type the VM name ({plan.vm}) to go ahead: ")
        return answer.strip() == plan.vm

    return confirm
