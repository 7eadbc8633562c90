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
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

from drtool import __version__
from drtool.errors import DrtoolError, ExitCode, Interrupted

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
    config: Optional[Path] = None
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
    def guard(self, json_mode: bool = False) -> Iterator[Output]:
        """Run a command body: one error line and its exit code on failure."""
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
                self.output.json_error(int(err.exit_code), err.message, err.hint)
            else:
                self.output.error(str(err))
            raise typer.Exit(int(err.exit_code)) from None
        except KeyboardInterrupt:
            self.output.error("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as err:  # a bug: say so in one line, the traceback with --verbose
            if self.verbose:
                self.output.traceback()
            self.output.error(
                f"internal error: {type(err).__name__}: {err} (run with --verbose for details)"
            )
            raise typer.Exit(int(ExitCode.FAILED)) from None


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
        Optional[Path],
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
    hosts: Annotated[Optional[list[str]], typer.Argument(help="Hosts to check (default: all).", metavar="[HOST]...",
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
    vms: Annotated[Optional[list[str]], typer.Argument(help="VMs to show (default: all).", metavar="[VM]...", autocompletion=vm_names)] = None,
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
    vm: Annotated[str, typer.Argument(help="The VM to protect (a [vms] key of the inventory).", metavar="VM", autocompletion=vm_names)],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once replication has started.")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Start replicating a running VM's disks to its DR host; wait for the initial sync.

    \b
    Examples:
      drtool protect web
      drtool protect web --no-wait
    """
    from drtool.services.protect import protect

    from .audit import Audit, lines
    from .progress import SyncProgress
    from .render import protect_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        with SyncProgress(out, "seeding") as progress:
            result = state.call(protect, vm, wait=not no_wait, on_progress=progress, audit=Audit(
                "protect", [vm], lambda r: lines([(r.vm, f"protected to {r.dr_host}, {r.mode} mode")])))
        out.render(result, protect_summary)  # after the bars stopped: nothing redraws over it


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
    vm: Annotated[str, typer.Argument(help="The protected VM whose replica to bring up to date.", metavar="VM", autocompletion=vm_names)],
    wait: WaitOption = CRON_LOCK_WAIT,
    json_mode: JsonOption = False,
) -> None:
    """Bring a broken replica up to date, sending only what changed; does nothing when all is well.

    \b
    Example (cron):
      */5 * * * * /usr/local/bin/drtool resync web
    """
    from drtool.services.resync import resync

    from .audit import Audit, lines
    from .progress import SyncProgress
    from .render import resync_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        with SyncProgress(out, "resync") as progress:
            result = state.call(resync, vm, on_progress=progress, lock_wait=wait, audit=Audit(
                "resync", [vm], lambda r: lines([] if r.action == "none" else
                                                [(r.vm, f"resynced ({r.action}), {r.bytes_sent} bytes sent")])))
        out.render(result, resync_summary)


@app.command("checkpoint")
def checkpoint_command(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="VMs to take a point of.", metavar="[VM]...", autocompletion=vm_names)] = None,
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
        audit = Audit("checkpoint", vms or [], lambda rep: [
            (r.vm, f"point {r.point.id}" + (" (kept)" if keep else "")
             + (f"; retention deleted {', '.join(r.deleted)}" if r.deleted else "") if r.point else f"failed: {r.error}",
             int(r.exit_code)) for r in rep.results if r.point is not None or r.exit_code not in (ExitCode.OK, ExitCode.REFUSED)])
        report = state.call(checkpoint, vms or [], all_vms=all_vms, keep=keep, lock_wait=wait, audit=audit)
        out.render({"results": report.results}, lambda _: checkpoint_table(report))
        out.errors((r.vm, r.error) for r in report.results if r.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("points")
def points_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The protected VM whose points to list.", metavar="VM", autocompletion=vm_names)],
    keep: Annotated[Optional[str], typer.Option("--keep", metavar="ID",
                                                help="Pin this point: retention never deletes it.")] = None,
    unkeep: Annotated[Optional[str], typer.Option("--unkeep", metavar="ID",
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
    vm: Annotated[str, typer.Argument(help="The protected VM to run on its DR host.", metavar="VM", autocompletion=vm_names)],
    force: Annotated[bool, typer.Option("--force", help="The source does not answer and is fenced: "
                                        "fail over from the newest point anyway. With --rollback: discard "
                                        "what the DR copy wrote, however long it ran.")] = False,
    point: Annotated[Optional[str], typer.Option("--point", help="Start from this point (see drtool points).",
                                                 metavar="ID")] = None,
    test: Annotated[bool, typer.Option("--test", help="A drill: start a copy on a point, isolated; "
                                       "replication goes on.")] = False,
    cleanup: Annotated[bool, typer.Option("--cleanup", help="With --test: remove the test VM.")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="Undo a planned failover: the source runs "
                                           "again, protected.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every step without doing any.")] = False,
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
        else:
            audit = Audit("failover", [vm], lambda r: lines([] if r.dry_run else [
                (r.vm, f"{r.kind} failover done from {r.point or 'the replicas'}: {r.run_state} on {r.dr_host}")]))
            result = state.call(failover.failover, vm, force=force, point_id=point, dry_run=dry_run,
                                confirm=confirmer(out, yes), audit=audit)
            out.render(result, render.failover_summary)


def _usage_error_class() -> type[Exception]:
    """Click's UsageError, wherever this typer keeps click (recent typers vendor it)."""
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError  # type: ignore[no-redef]
    return UsageError


def run() -> None:
    """Console-script entry point: usage errors too are one line and exit 2."""
    import sys

    usage_error = _usage_error_class()
    try:
        code = app(standalone_mode=False, prog_name="drtool")
    except usage_error as err:  # unknown option or command, missing or bad argument
        where = err.ctx.command_path if err.ctx is not None else "drtool"
        message = err.format_message().replace("\n", " ").rstrip(".")
        sys.stderr.write(f"drtool: error: {message}; see {where} --help\n")
        sys.exit(int(ExitCode.USAGE))
    except typer.Abort:  # end of input at a prompt
        sys.stderr.write("drtool: error: interrupted\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    sys.exit(code if isinstance(code, int) else 0)
