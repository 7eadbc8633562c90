"""Output: the JSON envelope, plain tables off a terminal, and --quiet."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from drtool.cli.output import JSON_SCHEMA_VERSION, Output


def recording(*, terminal: bool, **kwargs: object) -> tuple[Output, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    output = Output(stdout=Console(file=out, force_terminal=terminal, width=80),
                    stderr=Console(file=err, force_terminal=False, width=80), **kwargs)  # type: ignore[arg-type]
    return output, out, err


@dataclass(frozen=True)
class Result:
    vm: str
    rto_seconds: float | None


def test_every_json_document_has_the_envelope():
    output, out, _ = recording(terminal=False, json_mode=True)
    output.command = "failover"
    output.render(Result("web", None), lambda r: "unused")
    document = json.loads(out.getvalue())
    assert document == {"schema_version": JSON_SCHEMA_VERSION, "command": "failover", "vm": "web",
                         "rto_seconds": None}


def table() -> Table:
    t = Table("VM", "STATE")
    t.add_row("web", "in sync")
    return t


def test_tables_off_a_terminal_have_no_box_drawing():
    output, out, _ = recording(terminal=False)
    output.show(table())
    text = out.getvalue()
    assert "web" in text and "in sync" in text
    assert not set(text) & set("─│┃━┏┓┗┛╭╮╰╯┡┩└┘┌┐")


def test_tables_on_a_terminal_keep_their_box():
    output, out, _ = recording(terminal=True)
    output.show(table())
    assert set(out.getvalue()) & set("─│┃━┏┓┗┛╭╮╰╯┡┩└┘┌┐")


def test_quiet_prints_errors_only():
    output, out, err = recording(terminal=False, quiet=True)
    output.render(Result("web", 1.0), lambda r: f"{r.vm}: done")
    output.info("progress 50%")
    output.error("web: broken")
    assert out.getvalue() == "" and err.getvalue() == "drtool: error: web: broken\n"
