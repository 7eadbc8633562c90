"""Which ~/.ssh/config options drtool honours, how it reads their values, and ProxyJump's host list.

Every keyword of ssh_config(5) falls in one of four groups:

- honoured: HostName, Port, User, IdentityFile, IdentitiesOnly,
  UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, ProxyCommand,
  ProxyJump, ConnectTimeout, ServerAliveInterval, ServerAliveCountMax,
  TCPKeepAlive, Compression, IdentityAgent `none`/`SSH_AUTH_SOCK`, and a
  top-level Include (config_text);
- stricter in drtool: StrictHostKeyChecking and NoHostAuthenticationForLocalhost
  (drtool always verifies host keys and never adds one, whatever they say);
- not about what drtool does (NOT_APPLICABLE): forwardings, terminals,
  multiplexing, logging, other login methods (drtool logs in with a key only);
- anything else (UNSUPPORTED, an unknown keyword, or a value other than the
  default for HARMLESS_VALUES) is an error naming it: the operator would
  otherwise believe drtool connects as `ssh` does. IgnoreUnknown is honoured.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import shlex
from pathlib import Path
from typing import Any

from drtool.errors import ConfigError

HONOURED = frozenset({
    "host", "match", "hostname", "port", "user", "identityfile", "identitiesonly", "userknownhostsfile",
    "globalknownhostsfile", "hostkeyalias", "proxycommand", "proxyjump", "connecttimeout",
    "serveraliveinterval", "serveralivecountmax", "tcpkeepalive", "compression", "identityagent",
    "ignoreunknown", "canonicalizehostname", "canonicaldomains", "canonicalizemaxdots",
    "canonicalizefallbacklocal", "stricthostkeychecking", "nohostauthenticationforlocalhost",
})

# keywords about things drtool never does (it opens its own connections, runs commands, forwards nothing)
NOT_APPLICABLE = frozenset({
    "addkeystoagent", "batchmode", "clearallforwardings", "controlmaster", "controlpath", "controlpersist",
    "dynamicforward", "enableescapecommandline", "escapechar", "exitonforwardfailure", "fingerprinthash",
    "forkafterauthentication", "forwardagent", "forwardx11", "forwardx11timeout", "forwardx11trusted",
    "gatewayports", "hashknownhosts", "localcommand", "localforward", "loglevel", "logverbose",
    "numberofpasswordprompts", "permitlocalcommand", "permitremoteopen", "remotecommand", "remoteforward",
    "requesttty", "sessiontype", "sendenv", "setenv", "stdinnull", "streamlocalbindmask",
    "streamlocalbindunlink", "syslogfacility", "tunnel", "tunneldevice", "updatehostkeys", "usekeychain",
    "visualhostkey", "xauthlocation", "obscurekeystroketiming", "ipqos", "casignaturealgorithms",
    # login methods besides keys: drtool logs in with a key only, so these enable nothing it would use
    "passwordauthentication", "kbdinteractiveauthentication", "kbdinteractivedevices",
    "challengeresponseauthentication", "gssapiauthentication", "gssapidelegatecredentials",
    "gssapikeyexchange", "gssapiclientidentity", "gssapiserveridentity", "gssapirenewalforceskeyx",
    "gssapitrustdns", "gssapikexalgorithms", "hostbasedauthentication", "hostbasedacceptedalgorithms",
    "hostbasedkeytypes", "enablesshkeysign",
})

# option (as paramiko's lookup spells it, lower case) -> what it would change
UNSUPPORTED: dict[str, str] = {
    "certificatefile": "a certificate for login",
    "pkcs11provider": "a PKCS#11 token for login",
    "securitykeyprovider": "a security key for login",
    "bindaddress": "the local address connections leave from",
    "bindinterface": "the local interface connections leave from",
    "kexalgorithms": "the key exchange algorithms allowed",
    "ciphers": "the ciphers allowed",
    "macs": "the MACs allowed",
    "hostkeyalgorithms": "the host key algorithms allowed",
    "pubkeyacceptedalgorithms": "the public key algorithms allowed",
    "pubkeyacceptedkeytypes": "the public key algorithms allowed",
    "requiredrsasize": "the smallest RSA key accepted",
    "rekeylimit": "how often session keys are renewed",
    "knownhostscommand": "a command that lists host keys",
    "revokedhostkeys": "host keys refused",
    "canonicalizepermittedcnames": "which CNAMEs canonicalization follows",
    "include": "further config files inside a Host or Match block (drtool reads Include at the top level only)",
}
# options that are fine at these values (OpenSSH's defaults, or what drtool does anyway)
HARMLESS_VALUES: dict[str, set[str]] = {
    "addressfamily": {"any"},
    "connectionattempts": {"1"},
    "pubkeyauthentication": {"yes", "unbound", "host-bound"},
    "verifyhostkeydns": {"no"},
    "checkhostip": {"no"},
    "proxyusefdpass": {"no"},
}
IDENTITY_AGENT_DEFAULT = {"ssh_auth_sock", "$ssh_auth_sock"}
MAX_JUMPS = 8
DEFAULT_ALIVE_INTERVAL = 15.0  # drtool's default (OpenSSH's is 0, off): a dead host is noticed in a minute
DEFAULT_ALIVE_COUNT_MAX = 3  # OpenSSH's default


def _refuse(config_path: str, host_name: str, setting: str, why: str) -> ConfigError:
    return ConfigError(
        f"{config_path} sets {setting} for host {host_name}, which drtool cannot honour ({why})",
        hint="remove it from the ssh config's entry for this host, or give the host another "
             "address (a Host alias without it) in the inventory",
    )


def check_supported(host_name: str, options: dict[str, Any], config_path: str) -> None:
    """Refuse an ssh config option drtool would otherwise ignore."""
    ignored = str(options.get("ignoreunknown", "")).replace(",", " ").split()
    for option in options:
        if option in UNSUPPORTED:
            raise _refuse(config_path, host_name, option, UNSUPPORTED[option])
        known = option in HONOURED or option in NOT_APPLICABLE or option in HARMLESS_VALUES
        if not known and not any(fnmatch.fnmatch(option, pattern.lower()) for pattern in ignored):
            raise ConfigError(f"{config_path} sets {option} for host {host_name}, an option drtool does not know",
                              hint="remove it from the ssh config's entry for this host, or list it in "
                                   "IgnoreUnknown")
    for option, fine in HARMLESS_VALUES.items():
        value = str(options.get(option, next(iter(fine)))).lower()
        if value not in fine:
            raise _refuse(config_path, host_name, f"{option} {value}", f"drtool does only {'/'.join(sorted(fine))}")
    agent = str(options.get("identityagent", "SSH_AUTH_SOCK")).lower()
    if agent not in IDENTITY_AGENT_DEFAULT | {"none"}:
        raise _refuse(config_path, host_name, f"identityagent {agent}", "drtool uses the agent at $SSH_AUTH_SOCK")
    canonical = str(options.get("canonicalizehostname", "no")).lower()
    proxied = options.get("proxycommand") or options.get("proxyjump", "none").lower() != "none"
    if canonical not in ("no", "yes", "always") or (canonical == "yes" and proxied):
        # paramiko canonicalizes proxied hosts too, as OpenSSH does only with `always`
        raise _refuse(config_path, host_name, f"canonicalizehostname {canonical}",
                      "drtool does no and always, and yes without a proxy")
    if options.get("proxycommand") and options.get("proxyjump", "none").lower() != "none":
        raise ConfigError(f"{config_path} sets both ProxyCommand and ProxyJump for host {host_name}",
                          hint="keep one of them")


MAX_INCLUDE_DEPTH = 16  # as OpenSSH's
_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)")


def config_text(path: Path, _depth: int = 0) -> str:
    """The ssh config with each top-level Include replaced by the files it names (paramiko reads none).

    As OpenSSH: relative names are in ~/.ssh, wildcards expand in order, a
    name that matches nothing is skipped. After an included file the top level
    is restored (`Host *`), so its last Host block does not swallow what follows.
    """
    if _depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: Include nests more than {MAX_INCLUDE_DEPTH} deep (a loop?)")
    lines, in_block = [], False
    for line in path.read_text(errors="replace").splitlines():
        match = _KEYWORD.match(line)
        keyword = match.group(1).lower() if match else ""
        in_block = in_block or keyword in ("host", "match")
        if keyword != "include" or in_block:
            lines.append(line)
            continue
        for name in shlex.split(match.group(2)):  # type: ignore[union-attr]  # matched: keyword is set
            pattern = Path(name).expanduser()
            pattern = pattern if pattern.is_absolute() else Path("~/.ssh").expanduser() / pattern
            for included in sorted(glob.glob(str(pattern))):
                if Path(included).is_file():
                    lines += [config_text(Path(included), _depth + 1), "Host *"]
    return "\n".join(lines) + "\n"


def flag(options: dict[str, Any], name: str, default: bool, config_path: str) -> bool:
    """A yes/no option."""
    value = str(options.get(name, "yes" if default else "no")).lower()
    if value not in ("yes", "no"):
        raise ConfigError(f"{config_path}: {name} {value!r} is not yes or no")
    return value == "yes"


def seconds(options: dict[str, Any], name: str, config_path: str) -> float | None:
    """A time option (OpenSSH's `30`, `30s`, `1m`, `1h`); None when unset or `none`/0 (off)."""
    raw = str(options.get(name, "none")).strip().lower()
    if raw == "none":
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw[-1:] in units else float(raw)
    except ValueError:
        raise ConfigError(f"{config_path}: {name} {raw!r} is not a time (seconds, or 30s, 1m, 1h)") from None
    if value < 0 or value != value or value == float("inf"):
        raise ConfigError(f"{config_path}: {name} {raw!r} is not a time (seconds, or 30s, 1m, 1h)")
    return value or None


def count(options: dict[str, Any], name: str, default: int, config_path: str) -> int:
    raw = str(options.get(name, default))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{config_path}: {name} {raw!r} is not a whole number of 1 or more")
    return int(raw)


def parse_jumps(spec: str) -> list[tuple[str | None, str, int | None]]:
    """ProxyJump's `[user@]host[:port]` list (also `ssh://[user@]host[:port]`), in connection order."""
    jumps = []
    for item in spec.split(","):
        item = item.strip().removeprefix("ssh://")
        if not item:
            raise ConfigError(f"ProxyJump {spec!r} has an empty host", hint="write [user@]host[:port],...")
        user, _, rest = item.rpartition("@")
        host, port = rest, None
        if rest.startswith("["):  # [v6 address]:port
            host, _, tail = rest[1:].partition("]")
            port = tail.removeprefix(":") or None
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        try:
            jumps.append((user or None, host, int(port) if port else None))
        except ValueError:
            raise ConfigError(f"ProxyJump {spec!r}: {port!r} is not a port number") from None
    return jumps
