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
from typing import Annotated, Any, Optional, TypeVar

import typer

from drtool import __version__
from drtool.errors import DrtoolError, ExitCode, Interrupted

from .output import Output

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


@dataclass
class AppState:
    config: Optional[Path] = None
    json_mode: bool = False
    verbose: bool = False
    output: Output = field(default_factory=Output)

    def inventory(self):  # noqa: ANN201 - imported lazily to keep start-up light
        from drtool.config import find_config_path, load_inventory

        return load_inventory(find_config_path(self.config))

    def call(self, service: Callable[..., T], *args: Any, kept_vms: bool = True, **kwargs: Any) -> T:
        """Run a service with the inventory and this run's connections (closed after).

        An inventory of DR hosts alone (no [vms]) is completed with the VMs
        those hosts keep entries for, unless kept_vms is false.
        """
        from drtool.transport.connections import Connections

        inventory = self.inventory()
        with Connections(inventory) as conns:
            if kept_vms and not inventory.vms:
                from drtool.services.dr_inventory import adopt_kept_entries

                inventory = adopt_kept_entries(inventory, conns)
                conns.adopt(inventory)
            return service(inventory, conns, *args, **kwargs)

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
    hosts: Annotated[Optional[list[str]], typer.Argument(help="Hosts to check (default: all).", metavar="[HOST]...")] = None,
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
        out.render({"hosts": report.hosts}, lambda _: hosts_table(report))
        out.errors((h.name, h.error) for h in report.hosts if not h.ok)
    raise typer.Exit(int(report.exit_code))


@app.command("status")
def status(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="VMs to show (default: all).", metavar="[VM]...")] = None,
    json_mode: JsonOption = False,
) -> None:
    """Show each VM's host, run state, disks and protection state.

    \b
    Examples:
      drtool status
      drtool status web --json
    """
    from drtool.services.status import vm_status

    from .render import status_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        report = state.call(vm_status, vms or [])
        out.render({"vms": report.vms}, lambda _: status_table(report))
        out.errors((v.name, v.error) for v in report.vms if v.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("protect")
def protect_command(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="The VMs to protect ([vms] keys of the inventory).",
                                                       metavar="VM...")] = None,
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

    from .progress import SyncProgress
    from .render import fleet_table, protect_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if vms and len(vms) == 1 and not all_vms:
            with SyncProgress(out, "seeding") as progress:
                result = state.call(protect, vms[0], wait=not no_wait, on_progress=progress)
            out.render(result, protect_summary)  # after the bars stopped: nothing redraws over it
            return
        report = state.call(protect_many, vms or [], all_vms=all_vms, wait=not no_wait)
        out.render({"results": report.outcomes}, lambda _: fleet_table("Protect", report, protect_summary))
        out.errors((o.vm, o.error) for o in report.outcomes if o.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("unprotect")
def unprotect_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The VM to stop replicating.", metavar="VM")],
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

    from .render import unprotect_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        out.render(state.call(unprotect, vm, delete_replicas=delete_replicas), unprotect_summary)


@app.command("resync")
def resync_command(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="The protected VMs whose replicas to bring up to date.",
                                                       metavar="VM...")] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every protected VM of the inventory (for cron).")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Bring a broken replica up to date, sending only what changed; does nothing when all is well.

    \b
    Example (cron):
      */5 * * * * /usr/local/bin/drtool resync web
      */5 * * * * /usr/local/bin/drtool -q resync --all
    """
    from drtool.services.resync import resync, resync_many

    from .progress import SyncProgress
    from .render import fleet_table, resync_summary

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if vms and len(vms) == 1 and not all_vms:
            with SyncProgress(out, "resync") as progress:
                result = state.call(resync, vms[0], on_progress=progress)
            out.render(result, resync_summary)
            return
        report = state.call(resync_many, vms or [], all_vms=all_vms)
        out.render({"results": report.outcomes}, lambda _: fleet_table("Resync", report, resync_summary))
        out.errors((o.vm, o.error) for o in report.outcomes if o.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("checkpoint")
def checkpoint_command(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="VMs to take a point of.", metavar="[VM]...")] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Every protected VM of the inventory (for cron).")] = False,
    json_mode: JsonOption = False,
) -> None:
    """Take a point in time on the DR side, consistent across each VM's disks.

    \b
    Examples:
      drtool checkpoint web
      drtool checkpoint --all       (cron: every protected VM, retention applied)
    """
    from drtool.errors import UsageError
    from drtool.services.checkpoint import checkpoint

    from .render import checkpoint_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        if bool(vms) == all_vms:
            raise UsageError("name the VMs to checkpoint, or pass --all (not both)")
        report = state.call(checkpoint, vms or [], all_vms=all_vms)
        out.render({"results": report.results}, lambda _: checkpoint_table(report))
        out.errors((r.vm, r.error) for r in report.results if r.exit_code != ExitCode.OK)
    raise typer.Exit(int(report.exit_code))


@app.command("points")
def points_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The protected VM whose points to list.", metavar="VM")],
    json_mode: JsonOption = False,
) -> None:
    """List a VM's points in time: id, time, how it was quiesced, tested-at, space used.

    \b
    Example:
      drtool points web
    """
    from drtool.services.checkpoint import list_points

    from .render import points_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        out.render(state.call(list_points, vm), points_table)


@app.command("failover")
def failover_command(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="The protected VM to run on its DR host.", metavar="VM")],
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
            out.render(state.call(drill.cleanup_test, vm), render.drill_cleanup_summary)
        elif test:
            out.render(state.call(drill.test_failover, vm, point), render.drill_summary)
        elif rollback:
            undone = state.call(failover.rollback, vm, force=force, confirm=confirmer(out, yes))
            # replication catches up from the final point: the resync command's own work
            with SyncProgress(out, "resync") as progress:
                caught_up = state.call(resync, vm, on_progress=progress)
            out.render(render.RolledBack(undone, caught_up), render.rolled_back_summary)
        else:
            result = state.call(failover.failover, vm, force=force, point_id=point, dry_run=dry_run,
                                confirm=confirmer(out, yes))
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
