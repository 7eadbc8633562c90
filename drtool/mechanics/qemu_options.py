"""QEMU command-line options as data (pure): split argv into options, read and edit their values.

An option's value is QEMU's `key=value,...` list (`,,` a literal comma, an
optional leading word for the backend or driver) or, as libvirt 9 writes it,
a JSON object. `OptionValue` reads and edits both and writes each back in the
form it came in, so that a mapped command line differs from the source's only
where drtool changed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# QEMU options that take no argument (everything else takes exactly one).
FLAGS = frozenset({
    "-S", "-nodefaults", "-daemonize", "-no-reboot", "-no-shutdown", "-enable-kvm", "-nographic",
    "-snapshot", "-no-hpet", "-no-acpi", "-no-user-config", "-full-screen", "-alt-grab", "-ctrl-grab",
    "-win2k-hack", "-no-fd-bootchk", "-s", "-old-param", "-only-migratable", "-preconfig",
    "-mem-prealloc", "-usb", "-enable-fips", "-no-quit", "-semihosting", "-rtc-td-hack", "-no-kvm-pit-reinjection",
})

# The leading word of a key=value option, under the name its JSON form gives it.
_HEAD_KEY = {"-chardev": "backend", "-netdev": "type", "-nic": "type", "-net": "type", "-device": "driver",
             "-object": "qom-type", "-fsdev": "fsdriver", "-virtfs": "fsdriver"}


@dataclass
class Option:
    """One option of a command line: its name and its argument (None for a flag or a stray word)."""

    name: str
    value: str | None


def split_options(argv: list[str]) -> list[Option]:
    """argv[1:] as options; an option not known as a flag takes the next word unless it is an option."""
    options, i = [], 1
    while i < len(argv):
        opt = argv[i]
        if opt in FLAGS or not opt.startswith("-") or i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            options.append(Option(opt, None))
            i += 1
        else:
            options.append(Option(opt, argv[i + 1]))
            i += 2
    return options


def join_options(program: str, options: list[Option]) -> list[str]:
    argv = [program]
    for option in options:
        argv.append(option.name)
        if option.value is not None:
            argv.append(option.value)
    return argv


def split_opts(value: str) -> list[str]:
    """QEMU's key=value,... list; ',,' is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def join_opts(parts: list[str]) -> str:
    return ",".join(p.replace(",", ",,") for p in parts)


@dataclass
class OptionValue:
    """An option's argument as keys and values, in either of QEMU's two notations.

    Keys are flat: a dotted key (`file.filename`) of the key=value form and the
    nested objects of the JSON form are read and written the same way.
    """

    option: str
    json_form: bool
    data: dict[str, Any] = field(default_factory=dict)  # JSON form
    pairs: list[list[str]] = field(default_factory=list)  # key=value form, in order

    @classmethod
    def parse(cls, option: str, value: str) -> OptionValue:
        if value.lstrip().startswith("{"):
            return cls(option, True, data=json.loads(value))
        pairs = []
        for i, part in enumerate(split_opts(value)):
            key, sep, val = part.partition("=")
            if not sep and i == 0 and option in _HEAD_KEY:
                pairs.append([_HEAD_KEY[option], part])
            elif sep:
                pairs.append([key, val])
            else:
                pairs.append([part, ""])  # a bare word: a boolean in QEMU's old notation
        return cls(option, False, pairs=pairs)

    def render(self) -> str:
        if self.json_form:
            return json.dumps(self.data, separators=(",", ":"))
        head = _HEAD_KEY.get(self.option)
        parts = []
        for i, (key, val) in enumerate(self.pairs):
            parts.append(val if i == 0 and key == head else f"{key}={val}" if val != "" else key)
        return join_opts(parts)

    def flat(self) -> dict[str, str]:
        """Every key as a dotted name and its value as a string."""
        if not self.json_form:
            return dict(self.pairs)
        out: dict[str, str] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, val in node.items():
                if isinstance(val, dict):
                    walk(f"{prefix}{key}.", val)
                else:
                    out[f"{prefix}{key}"] = _text(val)
        walk("", self.data)
        return out

    def get(self, key: str) -> str | None:
        return self.flat().get(key)

    def set(self, key: str, value: str) -> None:
        if self.json_form:
            *path, last = key.split(".")
            node = self.data
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
            return
        for pair in self.pairs:
            if pair[0] == key:
                pair[1] = value
                return
        self.pairs.append([key, value])

    def remove(self, key: str) -> None:
        if self.json_form:
            *path, last = key.split(".")
            node: Any = self.data
            for part in path:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(last, None)
            return
        self.pairs = [pair for pair in self.pairs if pair[0] != key]

    def tree(self) -> dict[str, Any]:
        """The value as nested objects (a dotted key becomes a nested one), for following block graphs."""
        if self.json_form:
            return self.data
        root: dict[str, Any] = {}
        for key, val in self.pairs:
            *path, last = key.split(".")
            node = root
            for part in path:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            node[last] = val
        return root


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
