"""drtool with one promise broken on purpose, to show that the guest drills catch it.

Run as `python lying_drtool.py ARGS...` (the same arguments as drtool), with
DRTOOL_LIE set to one of:

- no-pause: points (and a planned failover's final point) are taken without
  pausing the source or waiting for the mirrors to drain: the guest keeps
  writing past the point, and those writes are lost.
- point-not-latest: an unplanned failover in sync mode starts from the newest
  point instead of the replicas as last written: the writes after the point are lost.
"""

import os

import drtool.mechanics.pausing as pausing
import drtool.services.failover.command as failover
import drtool.services.failover.planned as planned
from drtool.cli.main import run
from drtool.services.failover import Start
from drtool.transport.qmp import QmpSession

lie = os.environ.get("DRTOOL_LIE", "")
if lie == "no-pause":
    honest_execute = QmpSession.execute

    def execute(self, command, args=None, **kw):
        return {} if command == "stop" else honest_execute(self, command, args, **kw)

    QmpSession.execute = execute
    # each module that drains imported wait_drained by name: both lie (the planned failover's own drain, left
    # honest, once waited 30 s for a writing guest's mirrors to go quiet, refused, and left nothing to judge)
    pausing.wait_drained = planned.wait_drained = lambda *args, **kw: True
elif lie == "point-not-latest":
    failover.default_start = lambda manifest: Start(manifest.points[-1].id if manifest.points else None, "a lie")
else:
    raise SystemExit(f"lying_drtool: DRTOOL_LIE={lie!r}: no-pause or point-not-latest")
run()
