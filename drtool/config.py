"""The inventory file: where to find it, how to read it, and full validation.

The whole file is checked before anything is returned, so a typo in the last
VM fails ``drtool`` before any host is contacted.  Every problem becomes a
one-line :class:`~drtool.errors.ConfigError` naming the file, the table, the
key and (when it can be found) the line.  tomllib reports no positions for
keys, so :class:`_Locator` recovers them from the text on its own.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from drtool.domain import Host, Inventory, ReplicationMode, Transport, Vm
from drtool.errors import ConfigError
from drtool.retention import RetentionRule, RetentionRuleError, parse_rule, parse_rules

ENV_VAR = "DRTOOL_CONFIG"
LOCAL_NAME = "drtool.toml"
USER_CONFIG = Path(".config") / "drtool" / "drtool.toml"  # relative to $HOME
_HINT = "pass --config PATH or create the file (README.md has an example)"

# Names become file names (replica dirs, state, logs): keep them boring.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def find_config_path(
    explicit: Path | None,
    env: Mapping[str, str] = os.environ,
    cwd: Path | None = None,
    home: Path | None = None,
) -> Path:
    """Pick the inventory file: --config, $DRTOOL_CONFIG, ./drtool.toml, ~/.config/drtool.

    The first two are taken as given (a missing file is then an error rather
    than a silent fallback to another inventory).  ``cwd``/``home`` exist for
    tests; by default relative paths stay relative to the process's cwd.
    """
    home = home if home is not None else Path.home()

    def place(p: Path | str) -> Path:
        p = str(p)
        if p == "~" or p.startswith("~/"):
            p = str(home / p[2:])
        try:
            path = Path(p).expanduser()
        except RuntimeError as e:  # ~someone who does not exist
            raise ConfigError(f"configuration file {p}: {e}", hint=_HINT) from None
        return cwd / path if cwd is not None else path

    if explicit is not None:
        chosen, looked = place(explicit), "given with --config"
    elif env.get(ENV_VAR):
        chosen, looked = place(env[ENV_VAR]), f"from ${ENV_VAR}"
    else:
        local = place(LOCAL_NAME)
        if local.exists():
            return local
        chosen = home / USER_CONFIG
        looked = f"also looked for {local.absolute()}; no --config given, ${ENV_VAR} not set"
    if not chosen.exists():
        raise ConfigError(f"configuration file {chosen} not found ({looked})", hint=_HINT)
    return chosen


def load_inventory(path: Path) -> Inventory:
    """Read and validate the whole inventory file; nothing is contacted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read configuration file: no such file", hint=_HINT) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read configuration file: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read configuration file: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate an editor's BOM
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at line {line})") from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: Path) -> Inventory:
    """Validate TOML text (read from ``path``) into an Inventory, or raise ConfigError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    return _Validator(doc, text, path).run()


# --------------------------------------------------------------------------
# Field specs: one converter per key.  A converter returns the domain value or
# raises _Bad with the problem (the caller adds file, table, key and line).


class _Bad(Exception):
    pass


@dataclass(frozen=True)
class _Ctx:
    config_dir: Path
    host_names: tuple[str, ...]


Convert = Callable[[Any, _Ctx], Any]


def _string(value: Any, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise _Bad("must be a string")
    if not value or value.isspace():
        raise _Bad("must not be empty")
    return value


def _word(value: Any, ctx: _Ctx) -> str:
    """A string passed to ssh as one argument: no whitespace or control characters."""
    value = _string(value, ctx)
    if any(c.isspace() or not c.isprintable() for c in value):
        raise _Bad("must not contain spaces or control characters")
    return value


def _port(value: Any, ctx: _Ctx) -> int:
    if isinstance(value, bool):  # an int subclass to Python, not to the user
        raise _Bad("must be an integer, not true/false")
    if not isinstance(value, int):
        raise _Bad("must be an integer")
    if not 1 <= value <= 65535:
        raise _Bad("must be between 1 and 65535")
    return value


def _seconds(value: Any, ctx: _Ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad("must be a number of seconds")
    if not (value > 0 and math.isfinite(value)):
        raise _Bad("must be a finite number of seconds > 0")
    return float(value)


def _local_path(value: Any, ctx: _Ctx) -> Path:
    """A file on this machine: ~ expanded, relative to the config file's directory."""
    try:
        p = Path(_string(value, ctx)).expanduser()
    except RuntimeError as e:  # ~unknownuser
        raise _Bad(f"cannot expand ~ ({e})") from None
    return p if p.is_absolute() else ctx.config_dir / p


def _remote_path(value: Any, ctx: _Ctx) -> PurePosixPath:
    """A path on a host: must be absolute, there is no sensible base to resolve against."""
    p = PurePosixPath(_string(value, ctx))
    if not p.is_absolute():
        raise _Bad("must be an absolute path")
    return p


def _host_ref(value: Any, ctx: _Ctx) -> str:
    value = _string(value, ctx)
    if value not in ctx.host_names:
        defined = ", ".join(ctx.host_names) or "none"
        raise _Bad(f"no such host; defined hosts: {defined}")
    return value


def _disks(value: Any, ctx: _Ctx) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad("must be a list of device ids")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _Bad(f"item {_show(item)} is not a non-empty string")
        if item in seen:
            raise _Bad(f'duplicate device id "{item}"')
        seen.append(item)
    return tuple(seen)


def _retention(value: Any, ctx: _Ctx) -> tuple[RetentionRule, ...]:
    if not isinstance(value, list):
        raise _Bad('must be a list of rules like ["hourly for 24h", "daily for 7d"]')
    if not value:
        raise _Bad('must list at least one rule, like ["hourly for 24h", "daily for 7d"]; '
                   "leave the key out for that default")
    for item in value:
        if not isinstance(item, str):
            raise _Bad(f"item {_show(item)} is not a string")
        try:
            parse_rule(item)
        except RetentionRuleError as e:
            raise _Bad(f"{_show(item)}: {e}") from None
    try:
        return parse_rules(value)
    except RetentionRuleError as e:
        raise _Bad(str(e)) from None


def _mode(value: Any, ctx: _Ctx) -> ReplicationMode:
    choices = [m.value for m in ReplicationMode]
    if not isinstance(value, str) or value not in choices:
        raise _Bad("unknown mode; choose one of: " + ", ".join(f'"{c}"' for c in choices))
    return ReplicationMode(value)


def _transport(value: Any, ctx: _Ctx) -> Transport:
    choices = [t.value for t in Transport]
    if not isinstance(value, str) or value not in choices:
        raise _Bad("unknown transport; choose one of: " + ", ".join(f'"{c}"' for c in choices))
    return Transport(value)


def _dr_differs(values: dict[str, Any]) -> tuple[str, str] | None:
    if "host" in values and values.get("dr_host") == values["host"]:
        return "dr_host", f'a VM\'s DR host must differ from its host "{values["host"]}"'
    return None


def _one_monitor(values: dict[str, Any]) -> tuple[str, str] | None:
    if "qmp_socket" in values and "libvirt_domain" in values:
        return "libvirt_domain", ("a VM names qmp_socket (QEMU run by hand) or libvirt_domain (libvirt runs it), "
                                  "not both")
    if "libvirt_uri" in values and "libvirt_domain" not in values:
        return "libvirt_uri", "libvirt_uri goes with libvirt_domain"
    return None


def _excluded_not_protected(values: dict[str, Any]) -> tuple[str, str] | None:
    both = set(values.get("disks", ())) & set(values.get("exclude_disks", ()))
    if both:
        return "exclude_disks", f"{', '.join(sorted(both))} cannot be both protected (disks) and excluded"
    return None


@dataclass(frozen=True)
class _Field:
    convert: Convert
    required: bool = False


@dataclass(frozen=True)
class _Section:
    """One top-level table: its kind (for messages), keys, domain type and cross-key checks."""

    kind: str
    fields: dict[str, _Field]
    build: Callable[..., Any]
    checks: tuple[Callable[[dict[str, Any]], tuple[str, str] | None], ...] = ()
    one_of: tuple[str, ...] = ()  # keys of which one is required


# Key names are the domain dataclasses' attribute names, so build(name=, **values) works.
_SECTIONS: dict[str, _Section] = {
    "hosts": _Section(
        kind="host",
        build=Host,
        fields={
            "address": _Field(_word, required=True),
            "port": _Field(_port),
            "user": _Field(_word),
            "identity_file": _Field(_local_path),
            "known_hosts": _Field(_local_path),
            "connect_timeout": _Field(_seconds),
            "command_timeout": _Field(_seconds),
            "replication_address": _Field(_word),
            "drtool_dir": _Field(_remote_path),
        },
    ),
    "vms": _Section(
        kind="VM",
        build=lambda **values: Vm(**{"qmp_socket": None, **values}),
        one_of=("qmp_socket", "libvirt_domain"),
        fields={
            "host": _Field(_host_ref, required=True),
            "qmp_socket": _Field(_remote_path),
            "libvirt_domain": _Field(_word),
            "libvirt_uri": _Field(_word),
            "dr_host": _Field(_host_ref, required=True),
            "replica_dir": _Field(_remote_path, required=True),
            "disks": _Field(_disks),
            "exclude_disks": _Field(_disks),
            "mode": _Field(_mode),
            "transport": _Field(_transport),
            "source_dir": _Field(_remote_path),
            "retention": _Field(_retention),
        },
        checks=(_dr_differs, _one_monitor, _excluded_not_protected),
    ),
}


# --------------------------------------------------------------------------
# Validation


def _key(k: str) -> str:
    """A key as it would be written in TOML (quoted unless bare)."""
    return k if _BARE_KEY_RE.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    """A value in TOML-ish notation, on one line, shortened if long."""
    if isinstance(value, bool):
        s = "true" if value else "false"
    elif isinstance(value, str):
        s = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        s = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        s = "{ " + ", ".join(f"{_key(k)} = {_show(v, limit)}" for k, v in value.items()) + " }"
    else:
        s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Validator:
    """Collects every problem of a parsed document, then reports the first in file order."""

    def __init__(self, doc: dict[str, Any], text: str, path: Path) -> None:
        self.doc, self.path = doc, path
        self.locate = _Locator(text).line
        self.problems: list[tuple[int | None, str]] = []
        hosts = doc.get("hosts")
        self.ctx = _Ctx(
            config_dir=path.absolute().parent,
            host_names=tuple(hosts) if isinstance(hosts, dict) else (),
        )

    def problem(self, where: tuple[str, ...], message: str) -> None:
        self.problems.append((self.locate(*where), message))

    def run(self) -> Inventory:
        built: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for top, tables in self.doc.items():
            section = _SECTIONS.get(top)
            if section is None:
                what = "table" if isinstance(tables, dict) else "key"
                allowed = ", ".join(f"[{s}]" for s in _SECTIONS)
                close = difflib.get_close_matches(top, list(_SECTIONS), n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                self.problem((top,), f"unknown top-level {what} [{_key(top)}]{hint}; allowed: {allowed}")
            elif not isinstance(tables, dict):
                self.problem((top,), f"{top} = {_show(tables)}: must be a table ([{top}.NAME] sections)")
            else:
                for name, table in tables.items():
                    obj = self.table(top, section, name, table)
                    if obj is not None:
                        built[top][name] = obj
        self.check_dirs_not_shared(built["vms"])
        if self.problems:
            ordered = sorted(self.problems, key=lambda p: (p[0] is None, p[0] or 0))
            line, message = ordered[0]
            text = f"{self.path}: {message}" + (f" (line {line})" if line else "")
            if len(ordered) > 1:
                text += f" (and {len(ordered) - 1} more)"
            raise ConfigError(text)
        return Inventory(path=self.path, hosts=built["hosts"], vms=built["vms"])

    def check_dirs_not_shared(self, vms: dict[str, Vm]) -> None:
        """Two VMs must not share drtool's directory on a host: each deletes its own files (TLS key,
        manifest) there on unprotect, and would delete the other's with them."""
        for what, host_of, dir_of in (("source_dir", lambda v: v.host, lambda v: v.source_state_dir),
                                      ("replica_dir", lambda v: v.dr_host, lambda v: v.replica_dir)):
            owner: dict[tuple[str, PurePosixPath], str] = {}
            for name, vm in vms.items():
                key = (host_of(vm), dir_of(vm))
                if key in owner:
                    self.problem(("vms", name, what) if what in self.doc["vms"][name] else ("vms", name),
                                 f"[vms.{_key(name)}] {what} {str(key[1])!r} on {key[0]} is also VM "
                                 f"{owner[key]!r}'s: give each VM a directory of its own")
                else:
                    owner[key] = name

    def table(self, top: str, section: _Section, name: str, table: Any) -> Any:
        """Validate one [top.name] table; return the domain object or None."""
        label = f"[{top}.{_key(name)}]"
        ok = True
        if not _NAME_RE.fullmatch(name) or set(name) == {"."}:
            self.problem(
                (top, name),
                f"{label}: invalid {section.kind} name {json.dumps(name, ensure_ascii=False)}: "
                "use only letters, digits, '.', '_' and '-' (names become file names)",
            )
            ok = False
        if not isinstance(table, dict):
            self.problem((top, name), f"[{top}] {_key(name)} = {_show(table)}: must be a table ({label})")
            return None
        values: dict[str, Any] = {}
        suggested: set[str] = set()
        for key, raw in table.items():
            spec = section.fields.get(key)
            if spec is None:
                close = difflib.get_close_matches(key, list(section.fields), n=1)
                suggested.update(close)
                if close:
                    hint = f' (did you mean "{close[0]}"?)'
                else:
                    hint = "; allowed keys: " + ", ".join(section.fields)
                self.problem((top, name, key), f'{label} unknown key "{key}"{hint}')
                ok = False
                continue
            try:
                values[key] = spec.convert(raw, self.ctx)
            except _Bad as e:
                self.problem((top, name, key), f"{label} {_key(key)} = {_show(raw)}: {e}")
                ok = False
        for key, spec in section.fields.items():
            # A misspelt required key is reported once, as the unknown key.
            if spec.required and key not in table and key not in suggested:
                self.problem((top, name), f'{label}: missing required key "{key}"')
                ok = False
        if section.one_of and not any(k in table or k in suggested for k in section.one_of):
            self.problem((top, name), f'{label}: missing required key "{section.one_of[0]}" (or '
                                      f'"{section.one_of[1]}" for a libvirt domain)')
            ok = False
        for check in section.checks:
            failed = check(values)
            if failed:
                key, message = failed
                self.problem((top, name, key), f"{label} {key} = {_show(table[key])}: {message}")
                ok = False
        return section.build(name=name, **values) if ok else None


# --------------------------------------------------------------------------
# Locating keys in the text


_TOKEN_RE = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|("(?:[^"\\]|\\.)*")|'([^']*)')\s*""")


def _parse_key(s: str) -> tuple[tuple[str, ...], str] | None:
    """Parse a (dotted, maybe quoted) TOML key at the start of ``s``: (parts, rest)."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _TOKEN_RE.match(s, pos)
        if not m:
            return None
        bare, basic, literal = m.groups()
        if basic is not None:
            try:
                basic = tomllib.loads(f"k = {basic}")["k"]  # let tomllib do the escapes
            except tomllib.TOMLDecodeError:
                return None
        parts.append(next(p for p in (bare, basic, literal) if p is not None))
        pos = m.end()
        if not s.startswith(".", pos):
            return tuple(parts), s[pos:]
        pos += 1


class _Locator:
    """Best-effort map from key paths to the line that defines them.

    Understands [a.b] / [[a.b]] headers (quoted parts too), dotted keys and
    one-line inline tables, and skips multi-line strings.  A path not found
    gives None, and the message simply goes without "(line N)".
    """

    def __init__(self, text: str) -> None:
        # path -> (line, defined by "key = value" on that line)
        self.lines: dict[tuple[str, ...], tuple[int, bool]] = {}
        table: tuple[str, ...] = ()
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                if line.count(in_string) % 2:
                    in_string = None
                continue
            stripped = line.lstrip()
            if stripped.startswith("["):
                array = stripped.startswith("[[")
                parsed = _parse_key(stripped[2 if array else 1 :])
                close = "]]" if array else "]"
                if parsed and re.fullmatch(rf"{re.escape(close)}\s*(#.*)?", parsed[1]):
                    table = parsed[0]
                    self.record(table, number, keyval=False)
                continue
            parsed = _parse_key(stripped)
            if parsed and parsed[1].startswith("="):
                self.record(table + parsed[0], number, keyval=True)
                for quote in ('"""', "'''"):
                    if parsed[1].count(quote) % 2:
                        in_string = quote

    def record(self, path: tuple[str, ...], number: int, keyval: bool) -> None:
        for i in range(1, len(path)):  # [a.b.c] and a.b = 1 also define a and a.b
            self.lines.setdefault(path[:i], (number, False))
        self.lines.setdefault(path, (number, keyval))

    def line(self, *path: str) -> int | None:
        if path in self.lines:
            return self.lines[path][0]
        for i in range(len(path) - 1, 0, -1):  # inside an inline table: its line
            found = self.lines.get(path[:i])
            if found:
                return found[0] if found[1] else None
        return None
