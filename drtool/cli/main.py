"""drtool's command line: parse, call one service, render its result.

Every command runs inside `AppState.guard`, the single place where errors
become one line for the user and an exit code (a traceback only with
--verbose). SIGTERM and SIGHUP unwind like Ctrl-C, so a killed cron run
still closes its connections.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from drtool import __version__
from drtool.errors import DrtoolError, ExitCode, Interrupted, UsageError

from .completion import host_names, vm_names
from .output import Output

if TYPE_CHECKING:
    from .audit import Audit

T = TypeVar("T")

EXIT_CODES_HELP = """\b
Exit codes: 0 all worked; 1 the work failed (a check found a problem);
2 usage or configuration error, nothing contacted; 3 a host or VM could not be
reached; 4 refused by the state, nothing changed; 130 interrupted.
See README.md and man drtool."""

app = typer.Typer(
    name="drtool",
    help="Disaster recovery for QEMU/KVM virtual machines: replicate, fail over, recover, check.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain help: [VM]... stays as written, no <bool> metavars, and a faster start
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
hosts_app = typer.Typer(help="Inspect the hypervisor hosts of the inventory.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
inventory_app = typer.Typer(help="Work with the inventory itself.", no_args_is_help=True)
app.add_typer(inventory_app, name="inventory")

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
CRON_LOCK_WAIT = 600  # seconds: longer than a */5 resync or a */15 checkpoint --all usually holds a VM
WaitOption = Annotated[float, typer.Option(
    "--wait", min=0, metavar="SECONDS",
    help=f"Wait up to SECONDS for another drtool working on the same VM (0: refuse at once). "
         f"[default: {CRON_LOCK_WAIT}]", show_default=False)]


@dataclass
class AppState:
    config: Path | None = None
    json_mode: bool = False
    verbose: bool = False
    output: Output = field(default_factory=Output)

    def inventory(self):  # noqa: ANN201 - imported lazily to keep start-up light
        from drtool.config import find_config_path, load_inventory

        return load_inventory(find_config_path(self.config))

    def call(self, service: Callable[..., T], *args: Any, kept_vms: bool = True, lock_wait: float = 0,
             audit: Audit | None = None, **kwargs: Any) -> T:
        """Run a service with the inventory and this run's connections (closed after).

        An inventory of DR hosts alone (no [vms]) is completed with the VMs
        those hosts keep entries for, unless kept_vms is false. lock_wait:
        seconds to wait for a VM another drtool is working on; a wait is said
        on stderr (not under --quiet or --json). audit: what to record in the
        system log and the DR host's history (cli/audit.py).
        """
        from drtool.transport.connections import Connections

        inventory = self.inventory()
        with Connections(inventory, lock_wait=lock_wait) as conns:
            try:
                if kept_vms and not inventory.vms:
                    from drtool.services.dr_inventory import adopt_kept_entries

                    inventory = adopt_kept_entries(inventory, conns)
                    conns.adopt(inventory)
                try:
                    result = service(inventory, conns, *args, **kwargs)
                except DrtoolError as err:
                    if audit is not None:
                        self._audit(inventory, conns, audit, audit.failed(err))
                    raise
                if audit is not None:
                    self._audit(inventory, conns, audit, audit.changed(result))
                return result
            finally:
                for vm, seconds in conns.lock_waits:
                    if not self.output.json_mode:
                        self.output.info(f"{vm}: waited {seconds:.1f} s for another drtool working on it")

    def _audit(self, inventory: Any, conns: Any, audit: Audit, entries: list[tuple[str, str, int]]) -> None:
        from .audit import record

        record(inventory, conns, audit, entries, self.output.warning)

    @contextlib.contextmanager
    def guard(self, json_mode: bool = False, error_code: int | None = None) -> Iterator[Output]:
        """Run a command body: one error line and its exit code (or error_code) on failure."""
        if json_mode:
            self.output.json_mode = True
        try:
            yield self.output
        except typer.Exit:
            raise
        except DrtoolError as err:
            if self.verbose:
                self.output.traceback()
            if self.output.json_mode:
                self.output.json_error(int(err.exit_code) if error_code is None else error_code, err.message,
                                       err.hint)
            else:
                self.output.error(str(err))
            raise typer.Exit(int(err.exit_code) if error_code is None else error_code) from None
        except KeyboardInterrupt:
            self.output.error("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as err:  # a bug: say so in one line, the traceback with --verbose
            if self.verbose:
                self.output.traceback()
            self.output.error(
                f"internal error: {type(err).__name__}: {err} (run with --verbose for details)"
            )
            raise typer.Exit(int(ExitCode.FAILED) if error_code is None else error_code) from None


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def _configure_logging(verbose: bool) -> None:
    """Libraries (paramiko, qemu.qmp) log to stderr only under --verbose."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    elif not root.handlers:
        root.addHandler(logging.NullHandler())


def _version(value: bool) -> None:
    if value:
        typer.echo(f"drtool {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Inventory file (else $DRTOOL_CONFIG, ./drtool.toml, "
                     "~/.config/drtool/drtool.toml).", envvar=None, dir_okay=False, metavar="PATH"),
    ] = None,
    json_mode: JsonOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show causes and tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (for cron: "
                                        "mail only when something is wrong).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _configure_logging(verbose)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    ctx.obj = AppState(config, json_mode, verbose, Output(json_mode=json_mode, verbose=verbose, quiet=quiet))


def _state(ctx: typer.Context) -> AppState:
    state = ctx.find_object(AppState)
    assert state is not None  # set by main() for every command
    state.output.command = ctx.command_path.partition(" ")[2]
    return state


@inventory_app.command("export")
def inventory_export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the rebuilt drtool.toml.",
                                         dir_okay=False, metavar="FILE")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Rebuild a full inventory from the entries the inventory's (DR) hosts keep beside the replicas.

    \b
    Example, on a new machine that knows only the DR host:
      drtool --config dr-only.toml inventory export -o drtool.toml
    """
    from drtool.services.dr_inventory import export_inventory

    from .render import export_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        out.render(state.call(export_inventory, output, overwrite=overwrite, kept_vms=False), export_summary)


@hosts_app.command("check")
def hosts_check(
    ctx: typer.Context,
    hosts: Annotated[list[str] | None, typer.Argument(help="Hosts to check (default: all).", metavar="[HOST]...",
                                                     autocompletion=host_names)] = None,
    json_mode: JsonOption = False,
) -> None:
    """Check SSH reachability, host keys, QEMU tools and free space for replicas.

    \b
    Examples:
      drtool hosts check
      drtool hosts check kvm2 --json
    """
    from drtool.services.hosts import check_hosts

    from .render import hosts_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        report = state.call(check_hosts, hosts or [], kept_vms=False)
        out.render({"hosts": report.hosts}, lambda _: hosts_table(report, width=out.stdout.width))
        out.errors((h.name, h.error) for h in report.hosts if not h.ok)
    raise typer.Exit(int(report.exit_code))


@app.command("status")
def status(
    ctx: typer.Context,
    vms: Annotated[list[str] | None, typer.Argument(help="VMs to show (default: all).", metavar="[VM]...",
                                                   autocompletion=vm_names)] = None,
    prometheus: Annotated[Path | None, typer.Option("--prometheus", help="Also write node_exporter textfile "
                                                    "metrics to FILE (atomically).", dir_okay=False,
                                                    metavar="FILE")] = None,
    max_lag: Annotated[int, typer.Option("--max-lag", min=0, metavar="MIB",
                                         help="Exit 1 when a disk lags further behind than this. [default: 64]",
                                         show_default=False)] = 64,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="One row per disk (as when VMs are named).")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Show each VM's host, run state and protection; exit 1 when any is not well protected.

    Exit 1 when a shown VM's replication is broken, lags past --max-lag, or a
    VM or disk is not replicated; 0 only when all is well (seeding and failed
    over count as well).

    \b
    Examples:
      drtool status                 one line per VM
      drtool status web             with its disks
      drtool status --wide --json
    """
    from drtool.services.status import problems, vm_status

    from .render import status_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        report = state.call(vm_status, vms or [])
        if prometheus is not None:
            from .prometheus import status_metrics, write_textfile

            write_textfile(prometheus, status_metrics(report))
        found = problems(report, max_lag << 20)
        out.render({"vms": report.vms, "problems": [{"vm": vm, "problem": what} for vm, what in found]},
                   lambda _: status_table(report, wide=wide or bool(vms), width=out.stdout.width))
        out.errors((v.name, v.error) for v in report.vms if v.exit_code != ExitCode.OK)
        if not out.json_mode:
            out.errors(found)
    raise typer.Exit(int(max(report.exit_code, ExitCode.FAILED if found else ExitCode.OK)))


@app.command("protect")
def protect_command(
    ctx: typer.Context,
    vms: Annotated[list[str] | None, typer.Argument(help="The VMs to protect ([vms] keys of the inventory).",
                                                   metavar="VM...", autocompletion=vm_names)] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every VM of the inventory not protected yet.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once replication has started.")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Start replicating running VMs' disks to their DR hosts; wait for the initial sync.

    \b
    Examples:
      drtool protect web
      drtool protect web --no-wait
      drtool protect web db mail    (at once; one line each)
      drtool protect --all
    """
    from drtool.services.protect import protect, protect_many

    from .audit import Audit, fleet_entries, lines
    from .progress import SyncProgress
    from .render import fleet_table, protect_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        def protected(r: Any) -> list[tuple[str, str]]:
            return [(r.vm, f"protected to {r.dr_host}, {r.mode} mode")]

        if vms and len(vms) == 1 and not all_vms:
            with SyncProgress(out, "seeding") as progress:
                result = state.call(protect, vms[0], wait=not no_wait, on_progress=progress,
                                    audit=Audit("protect", vms, lambda r: lines(protected(r))))
            out.render(result, protect_summary)  # after the bars stopped: nothing redraws over it
            return
        report = state.call(protect_many, vms or [], all_vms=all_vms, wait=not no_wait,
                            audit=Audit("protect", vms or [], lambda rep: fleet_entries(rep, protected)))
        out.render({"results": report.outcomes}, lambda _: fleet_table("Protect", report, protect_summary))
        out.errors((o.vm, o.error) for o in report.outcomes if o.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("unprotect")
def unprotect_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The VM to stop replicating.", metavar="VM", autocompletion=vm_names)],
    delete_replicas: Annotated[
        bool, typer.Option("--delete-replicas", help="Also delete the replicas and the manifest on the DR host.")
    ] = False,
    json_mode: JsonOption = False,
) -> None:
    """End replication: jobs, NBD nodes and the DR target; replicas stay unless --delete-replicas.

    \b
    Examples:
      drtool unprotect web
      drtool unprotect web --delete-replicas
    """
    from drtool.services.protect import unprotect

    from .audit import Audit, lines
    from .render import unprotect_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        audit = Audit("unprotect", [vm], lambda r: lines(
            [(r.vm, "unprotected" + (", replicas deleted" if r.replicas_deleted else ""))]))
        out.render(state.call(unprotect, vm, delete_replicas=delete_replicas, audit=audit), unprotect_summary)


@app.command("resync")
def resync_command(
    ctx: typer.Context,
    vms: Annotated[list[str] | None, typer.Argument(help="The protected VMs whose replicas to bring up to date.",
                                                   metavar="VM...", autocompletion=vm_names)] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every protected VM of the inventory (for cron).")] = False,
    wait: WaitOption = CRON_LOCK_WAIT,
    json_mode: JsonOption = False,
) -> None:
    """Bring a broken replica up to date, sending only what changed; does nothing when all is well.

    \b
    Example (cron):
      */5 * * * * /usr/local/bin/drtool resync web
      */5 * * * * /usr/local/bin/drtool -q resync --all
    """
    from drtool.services.resync import resync, resync_many

    from .audit import Audit, fleet_entries, lines
    from .progress import SyncProgress
    from .render import fleet_table, resync_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        def resynced(r: Any) -> list[tuple[str, str]]:
            return [] if r.action == "none" else [(r.vm, f"resynced ({r.action}), {r.bytes_sent} bytes sent")]

        if vms and len(vms) == 1 and not all_vms:
            with SyncProgress(out, "resync") as progress:
                result = state.call(resync, vms[0], on_progress=progress, lock_wait=wait,
                                    audit=Audit("resync", vms, lambda r: lines(resynced(r))))
            out.render(result, resync_summary)
            return
        report = state.call(resync_many, vms or [], all_vms=all_vms, lock_wait=wait,
                            audit=Audit("resync", vms or [], lambda rep: fleet_entries(rep, resynced)))
        out.render({"results": report.outcomes}, lambda _: fleet_table("Resync", report, resync_summary))
        out.errors((o.vm, o.error) for o in report.outcomes if o.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("checkpoint")
def checkpoint_command(
    ctx: typer.Context,
    vms: Annotated[list[str] | None, typer.Argument(help="VMs to take a point of.", metavar="[VM]...",
                                                   autocompletion=vm_names)] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every protected VM of the inventory (for cron).")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Pin the new point(s): retention never deletes them.")] = False,
    wait: WaitOption = CRON_LOCK_WAIT,
    json_mode: JsonOption = False,
) -> None:
    """Take a point in time on the DR side, consistent across each VM's disks.

    \b
    Examples:
      drtool checkpoint web
      drtool checkpoint --all       (cron: every protected VM, retention applied)
      drtool checkpoint web --keep  (before an upgrade: kept until drtool points web --unkeep ID)
    """
    from drtool.errors import UsageError
    from drtool.services.checkpoint import checkpoint

    from .audit import Audit
    from .render import checkpoint_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if bool(vms) == all_vms:
            raise UsageError("name the VMs to checkpoint, or pass --all (not both)")
        def audited(rep: Any) -> list[tuple[str, str, int]]:
            return [(r.vm, (f"point {r.point.id}" + (" (kept)" if keep else "")
                            + (f"; retention deleted {', '.join(r.deleted)}" if r.deleted else ""))
                     if r.point else f"failed: {r.error}", int(r.exit_code))
                    for r in rep.results if r.point is not None or r.exit_code not in (ExitCode.OK, ExitCode.REFUSED)]

        audit = Audit("checkpoint", vms or [], audited)
        report = state.call(checkpoint, vms or [], all_vms=all_vms, keep=keep, lock_wait=wait, audit=audit)
        out.render({"results": report.results}, lambda _: checkpoint_table(report))
        out.errors((r.vm, r.error) for r in report.results if r.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("check")
def check_command(
    ctx: typer.Context,
    vms: Annotated[list[str] | None, typer.Argument(help="VMs to check.")] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every VM of the inventory (for cron).")] = False,
    warn_rpo: Annotated[str | None, typer.Option("--warn-rpo", help="WARNING when the newest point is "
                                                    "older, e.g. 15m.")] = None,
    crit_rpo: Annotated[str | None, typer.Option("--crit-rpo", help="CRITICAL when the newest point is "
                                                    "older, e.g. 2h.")] = None,
    warn_lag: Annotated[str, typer.Option("--warn-lag", help="WARNING when replication stays this far "
                                          "behind.")] = "64M",
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="Bytes hashed per digest.")] = "1M",
    repair: Annotated[bool, typer.Option("--repair", help="Re-send the ranges that differ, then check "
                                         "them again.")] = False,
    history: Annotated[bool, typer.Option("--history", help="List the VM's kept check results.")] = False,
    nagios: Annotated[bool, typer.Option("--nagios", help="Print one status line with performance "
                                         "data.")] = False,
    prometheus: Annotated[Path | None, typer.Option("--prometheus", help="Write node_exporter textfile "
                                                       "metrics to FILE (atomically).", dir_okay=False)] = None,
    json_mode: JsonOption = False,
) -> None:
    """Compare each replica with its source as of one instant (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."""
    from drtool.services.check import CheckStatus, Thresholds, check
    from drtool.units import parse_duration, parse_size

    from . import render
    from .prometheus import check_metrics, write_textfile

    state = _state(ctx)
    # monitoring-plugin convention: anything that is not a verdict is UNKNOWN (3); --nagios with --json
    # is refused in one plain line (which of the two outputs would carry the error?)
    with state.guard(json_mode and not nagios, error_code=int(CheckStatus.UNKNOWN)) as out:
        if history:
            from drtool.services.check_history import check_history

            if len(vms or []) != 1 or all_vms or repair:
                raise UsageError("--history takes one VM and no other action")
            out.render(state.call(check_history, (vms or [])[0]), render.check_history_table)
            raise typer.Exit(0)
        if nagios and json_mode:
            raise UsageError("--nagios and --json are two different outputs: pick one")
        try:
            thresholds = Thresholds(
                warn_rpo=parse_duration(warn_rpo) if warn_rpo else None,
                crit_rpo=parse_duration(crit_rpo) if crit_rpo else None,
                warn_lag=parse_size(warn_lag), chunk=parse_size(chunk_size))
        except ValueError as err:
            raise UsageError(str(err)) from None
        report = state.call(check, vms or [], all_vms=all_vms, thresholds=thresholds, repair=repair)
        if prometheus is not None:
            write_textfile(prometheus, check_metrics(report))
        if nagios:
            out.show(render.nagios_line(report))
        else:
            out.render({"vms": report.vms, "status": report.exit_code.name}, lambda _: render.check_table(report))
            out.errors((v.vm, v.summary) for v in report.vms if v.status != CheckStatus.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("points")
def points_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The protected VM whose points to list.",
                                      metavar="VM", autocompletion=vm_names)],
    keep: Annotated[str | None, typer.Option("--keep", metavar="ID",
                                                help="Pin this point: retention never deletes it.")] = None,
    unkeep: Annotated[str | None, typer.Option("--unkeep", metavar="ID",
                                                  help="Let retention delete this point again.")] = None,
    json_mode: JsonOption = False,
) -> None:
    """List a VM's points in time: id, time, how it was quiesced, space used, tested at; pin one.

    \b
    Examples:
      drtool points web
      drtool points web --keep p20261127T141107123
    """
    from drtool.errors import UsageError
    from drtool.services.checkpoint import keep_point, list_points

    from .render import points_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if keep and unkeep:
            raise UsageError("--keep and --unkeep go one at a time")
        if keep or unkeep:
            report = state.call(keep_point, vm, keep or unkeep, kept=bool(keep))
        else:
            report = state.call(list_points, vm)
        out.render(report, points_table)


@app.command("failover")
def failover_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The protected VM to run on its DR host.",
                                      metavar="VM", autocompletion=vm_names)],
    force: Annotated[bool, typer.Option("--force", help="The source does not answer and is fenced: "
                                        "fail over from the newest point anyway. With --rollback: discard "
                                        "what the DR copy wrote, however long it ran.")] = False,
    point: Annotated[str | None, typer.Option("--point", help="Start from this point (see drtool points).",
                                                 metavar="ID")] = None,
    test: Annotated[bool, typer.Option("--test", help="A drill: start a copy on a point, isolated; "
                                       "replication goes on.")] = False,
    cleanup: Annotated[bool, typer.Option("--cleanup", help="With --test: remove the test VM.")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="Undo a planned failover: the source runs "
                                           "again, protected.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every step without doing any.")] = False,
    live: Annotated[bool, typer.Option("--live", help="Planned, without a reboot: migrate the running VM onto "
                                       "its replicas (a pause of about 0.1 s).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (also DRTOOL_YES=1).")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Fail a VM over to its DR host: planned, unplanned (--force), or a drill (--test).

    A failover that changes something asks for the VM's name on a terminal
    first; scripts pass --yes (or set DRTOOL_YES=1). Run the same command again
    to finish one that was interrupted.

    \b
    Examples:
      drtool failover web --dry-run          what would be done
      drtool failover web                    planned: the source answers, RPO 0
      drtool failover web --live             planned, live-migrated: no reboot
      drtool failover web --force --yes      unplanned: the source is gone and fenced
      drtool failover web --test             a drill on the newest point
      drtool failover web --test --cleanup   end the drill
      drtool failover web --rollback         undo a planned failover
    """
    from drtool.errors import UsageError
    from drtool.services import drill, failover
    from drtool.services.resync import resync

    from . import render
    from .audit import Audit, lines
    from .confirm import confirmer
    from .progress import SyncProgress

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if cleanup and not test:
            raise UsageError("--cleanup goes with --test")
        if rollback and (test or point or dry_run):
            raise UsageError("--rollback takes no --test, --point or --dry-run")
        if test and (force or dry_run):
            raise UsageError("--test changes nothing: it takes no --force or --dry-run")
        if live and (test or force or point):
            raise UsageError("--live is a planned failover: it takes no --test, --force or --point")
        if test and cleanup:
            audit = Audit("failover --test --cleanup", [vm],
                          lambda r: lines([(r.vm, "drill removed")] if r.removed else []))
            out.render(state.call(drill.cleanup_test, vm, audit=audit), render.drill_cleanup_summary)
        elif test:
            audit = Audit("failover --test", [vm], lambda r: lines(
                [(r.vm, f"drill of point {r.point} ({r.point_chosen}) {r.run_state}")]))
            out.render(state.call(drill.test_failover, vm, point, audit=audit), render.drill_summary)
        elif rollback:
            audit = Audit("failover --rollback", [vm], lambda r: lines(
                [(r.vm, f"failover rolled back; source {r.source_state}")]))
            undone = state.call(failover.rollback, vm, force=force, confirm=confirmer(out, yes), audit=audit)
            # replication catches up from the final point: the resync command's own work
            with SyncProgress(out, "resync") as progress:
                caught_up = state.call(resync, vm, on_progress=progress)
            out.render(render.RolledBack(undone, caught_up), render.rolled_back_summary)
        elif live:
            audit = Audit("failover --live", [vm], lambda r: lines([] if r.dry_run else [
                (r.vm, f"live failover done: {r.run_state} on {r.dr_host}")]))
            result = state.call(failover.live_failover, vm, dry_run=dry_run, confirm=confirmer(out, yes),
                                audit=audit)
            out.render(result, render.failover_summary)
        else:
            audit = Audit("failover", [vm], lambda r: lines([] if r.dry_run else [
                (r.vm, f"{r.kind} failover done from {r.point or 'the replicas'}: {r.run_state} on {r.dr_host}")]))
            result = state.call(failover.failover, vm, force=force, point_id=point, dry_run=dry_run,
                                confirm=confirmer(out, yes), audit=audit)
            out.render(result, render.failover_summary)


@app.command("recover")
def recover_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The failed-over VM to bring home.", metavar="VM")],
    reprotect: Annotated[bool, typer.Option("--reprotect", help="Replicate the DR copy back onto the original "
                                            "host's old images, sending only what differs.")] = False,
    failback: Annotated[bool, typer.Option("--failback", help="Once reprotected: run the VM on its original "
                                           "host again (RPO 0), protected to its DR host.")] = False,
    restore: Annotated[bool, typer.Option("--restore", help="Write a point's content to a new image "
                                          "(--to) or back into the stopped VM's disks (--in-place).")] = False,
    point: Annotated[str | None, typer.Option("--point", help="With --restore: the point (see drtool points).",
                                                 metavar="ID")] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="With --restore: only this disk.",
                                                metavar="DEV")] = None,
    to: Annotated[str | None, typer.Option("--to", help="With --restore: a new image on an inventory host.",
                                              metavar="HOST:PATH")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="With --restore: into the VM's own disks "
                                           "(the VM stopped).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --restore --to: replace an existing "
                                            "file.")] = False,
    live: Annotated[bool, typer.Option("--live", help="With --failback: without a reboot, live-migrating the "
                                       "DR copy home.")] = False,
    json_mode: JsonOption = False,
) -> None:
    """After a failover: protect the VM back towards its original host (--reprotect), then fail back (--failback).

    Run the same command again to finish one that was interrupted. It refuses
    while a QEMU runs on the original host's old images (a split brain).

    \b
    Examples:
      drtool recover web --reprotect
      drtool recover web --failback
      drtool recover web --failback --live
      drtool recover web --restore --point p20261127T101500000 --disk vd0 --to kvm3:/srv/web-vd0.qcow2
      drtool recover web --restore --point p20261127T101500000 --in-place
    """
    from drtool.errors import UsageError
    from drtool.services import recover

    from .progress import SyncProgress
    from .render import failback_summary, reprotect_summary, restore_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if sum((reprotect, failback, restore)) != 1:
            raise UsageError("say what to recover: one of --reprotect, --failback, --restore")
        if not restore and (point or disk or to or in_place or overwrite):
            raise UsageError("--point, --disk, --to, --in-place and --overwrite go with --restore")
        if live and not failback:
            raise UsageError("--live goes with --failback")
        if restore:
            if point is None:
                raise UsageError("--restore needs --point ID (see drtool points)")
            out.render(state.call(recover.restore, vm, point_id=point, disk=disk, to=to, in_place=in_place,
                                  overwrite=overwrite), restore_summary)
            return
        if failback:
            out.render(state.call(recover.failback_live if live else recover.failback, vm), failback_summary)
            return
        with SyncProgress(out, "reprotect") as progress:
            result = state.call(recover.reprotect, vm, on_progress=progress)
        out.render(result, reprotect_summary)


def _is_usage_error(err: Exception) -> bool:
    """Click's UsageError (unknown option, missing argument...), wherever this typer keeps click."""
    return any(cls.__name__ == "UsageError" for cls in type(err).__mro__)


def run() -> None:
    """Console-script entry point: usage errors too are one line and exit 2."""
    import sys

    try:
        code = app(standalone_mode=False, prog_name="drtool")
    except typer.Abort:  # end of input at a prompt
        sys.stderr.write("drtool: error: interrupted\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as err:
        if not _is_usage_error(err):
            raise
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "drtool"
        message = str(getattr(err, "format_message", err.__str__)()).replace("\n", " ").rstrip(".")
        sys.stderr.write(f"drtool: error: {message}; see {where} --help\n")
        sys.exit(int(ExitCode.USAGE))
    sys.exit(code if isinstance(code, int) else 0)
