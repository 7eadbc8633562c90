"""Which ~/.ssh/config options drtool honours, and ProxyJump's host list.

drtool honours HostName, Port, User, IdentityFile, IdentitiesOnly,
UserKnownHostsFile, GlobalKnownHostsFile, ProxyCommand and ProxyJump. An
option that changes how the connection is made or authenticated and that
drtool cannot honour is an error naming it, never silently ignored: the
operator would otherwise believe drtool connects as `ssh` does.
"""

from __future__ import annotations

from typing import Any

from drtool.errors import ConfigError

# option (as paramiko's lookup spells it, lower case) -> what it would change
UNSUPPORTED: dict[str, str] = {
    "hostkeyalias": "the name the host key is looked up under",
    "certificatefile": "a certificate for login",
    "pkcs11provider": "a PKCS#11 token for login",
    "securitykeyprovider": "a security key for login",
    "identityagent": "the agent socket (drtool uses $SSH_AUTH_SOCK)",
    "bindaddress": "the local address connections leave from",
    "bindinterface": "the local interface connections leave from",
    "kexalgorithms": "the key exchange algorithms allowed",
    "ciphers": "the ciphers allowed",
    "macs": "the MACs allowed",
    "hostkeyalgorithms": "the host key algorithms allowed",
    "pubkeyacceptedalgorithms": "the public key algorithms allowed",
    "pubkeyacceptedkeytypes": "the public key algorithms allowed",
    "proxyusefdpass": "how ProxyCommand hands over its connection",
}
# options that are fine at these values (OpenSSH's defaults)
HARMLESS_VALUES: dict[str, set[str]] = {"addressfamily": {"any"}, "canonicalizehostname": {"no"}}
MAX_JUMPS = 8


def check_supported(host_name: str, options: dict[str, Any], config_path: str) -> None:
    """Refuse an ssh config option drtool would otherwise ignore."""
    for option, what in UNSUPPORTED.items():
        if option in options:
            raise ConfigError(
                f"{config_path} sets {option} for host {host_name}, which drtool cannot honour ({what})",
                hint="remove it from the ssh config's entry for this host, or give the host another "
                     "address (a Host alias without it) in the inventory",
            )
    for option, fine in HARMLESS_VALUES.items():
        value = str(options.get(option, next(iter(fine)))).lower()
        if value not in fine:
            raise ConfigError(f"{config_path} sets {option} {value} for host {host_name}, which drtool cannot "
                              "honour", hint="remove it from the ssh config's entry for this host")
    if options.get("proxycommand") and options.get("proxyjump", "none").lower() != "none":
        raise ConfigError(f"{config_path} sets both ProxyCommand and ProxyJump for host {host_name}",
                          hint="keep one of them")


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
