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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from drtool import __version__
from drtool.errors import DrtoolError, ExitCode, Interrupted

from .output import Output

app = typer.Typer(
    name="drtool",
    help="Disaster recovery for QEMU/KVM virtual machines: replicate, fail over, recover, check.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
hosts_app = typer.Typer(help="Inspect the hypervisor hosts of the inventory.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")

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
                     "~/.config/drtool/drtool.toml).", envvar=None, dir_okay=False),
    ] = None,
    json_mode: JsonOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show causes and tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _configure_logging(verbose)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    ctx.obj = AppState(config, json_mode, verbose, Output(json_mode=json_mode, verbose=verbose))


def _state(ctx: typer.Context) -> AppState:
    return ctx.find_object(AppState)


@hosts_app.command("check")
def hosts_check(
    ctx: typer.Context,
    hosts: Annotated[Optional[list[str]], typer.Argument(help="Hosts to check (default: all).")] = None,
    json_mode: JsonOption = False,
) -> None:
    """Check SSH reachability, host keys, QEMU tools and free space for replicas."""
    from drtool.services.hosts import check_hosts
    from drtool.transport.connections import Connections

    from .render import hosts_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        inventory = state.inventory()
        with Connections(inventory) as conns:
            report = check_hosts(inventory, conns, hosts or [])
        out.json({"hosts": report.hosts}) if out.json_mode else out.show(hosts_table(report))
    raise typer.Exit(int(report.exit_code))


@app.command("status")
def status(
    ctx: typer.Context,
    vms: Annotated[Optional[list[str]], typer.Argument(help="VMs to show (default: all).")] = None,
    json_mode: JsonOption = False,
) -> None:
    """Show each VM's host, run state, disks and protection state."""
    from drtool.services.status import vm_status
    from drtool.transport.connections import Connections

    from .render import status_table

    state = _state(ctx)
    with state.guard(json_mode) as out:
        inventory = state.inventory()
        with Connections(inventory) as conns:
            report = vm_status(inventory, conns, vms or [])
        out.json({"vms": report.vms}) if out.json_mode else out.show(status_table(report))
    raise typer.Exit(int(report.exit_code))


def run() -> None:
    """Console-script entry point."""
    app()
