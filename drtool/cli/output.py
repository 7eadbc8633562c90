"""Where drtool's words go: the one object that writes to stdout and stderr.

Commands never print directly; tests swap the consoles for recording ones.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import PurePath
from typing import Any

from rich.console import Console
from rich.table import Table


def to_jsonable(value: Any) -> Any:
    """Result objects to plain JSON data: dataclasses, enums, paths, tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _console(stderr: bool) -> Console:
    """A console that, when piped (cron, logs), does not squeeze tables into 80 columns."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=200)
    return console


JSON_SCHEMA_VERSION = 1  # of every --json document: bump on an incompatible change (see docs/json.md)


class Output:
    """stdout and stderr for one run: tables or JSON, errors, and nothing but errors under --quiet."""

    def __init__(self, *, json_mode: bool = False, verbose: bool = False, quiet: bool = False,
                 stdout: Console | None = None, stderr: Console | None = None) -> None:
        self.json_mode = json_mode
        self.verbose = verbose
        self.quiet = quiet
        self.command = ""  # e.g. "status", "hosts check": named in every JSON document
        self.stdout = stdout or _console(stderr=False)
        self.stderr = stderr or _console(stderr=True)

    def envelope(self, **fields: Any) -> dict[str, Any]:
        """What every JSON document starts with, so scripts can check what they read."""
        return {"schema_version": JSON_SCHEMA_VERSION, "command": self.command, **fields}

    @property
    def is_terminal(self) -> bool:
        return self.stdout.is_terminal

    def json(self, data: Any) -> None:
        document = to_jsonable(data)
        if not isinstance(document, dict):
            document = {"result": document}
        self.stdout.file.write(json.dumps(self.envelope(**document), indent=2, sort_keys=False) + "\n")
        self.stdout.file.flush()

    def show(self, renderable: Any) -> None:
        if self.quiet:
            return
        if isinstance(renderable, Table) and not self.stdout.is_terminal:
            renderable.box = None  # plain columns for pipes, logs and mail: no box drawing
        self.stdout.print(renderable)

    def render(self, result: Any, human: Callable[[Any], Any]) -> None:
        """The result as JSON under --json, else as `human` renders it."""
        if self.json_mode:
            self.json(result)
        else:
            self.show(human(result))

    def errors(self, failures: Iterable[tuple[str, str | None]]) -> None:
        """One stderr line per failed item of a report (the table says more)."""
        for name, message in failures:
            self.error(f"{name}: {message or 'failed'}")

    def error(self, message: str) -> None:
        self.stderr.print(f"drtool: error: {message}", markup=False, highlight=False)

    def warning(self, message: str) -> None:
        """Something went wrong beside the command's own work (it stands): said even under --quiet."""
        self.stderr.print(f"drtool: warning: {message}", markup=False, highlight=False)

    def json_error(self, exit_code: int, message: str, hint: str | None) -> None:
        """The error of a --json run, as JSON on stderr (stdout stays empty)."""
        document = self.envelope(exit_code=exit_code, error=message, hint=hint)
        self.stderr.file.write(json.dumps(document, indent=2) + "\n")
        self.stderr.file.flush()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(message, markup=False, highlight=False)

    def traceback(self) -> None:
        exc = sys.exc_info()[1]
        if exc is not None:
            import traceback

            self.stderr.file.write("".join(traceback.format_exception(exc)))
