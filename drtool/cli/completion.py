"""Shell completion of VM and host names, read from the inventory the command line would use.

The shipped completion scripts (completions/) call drtool itself, which calls
these; a missing or broken inventory completes nothing rather than erring.
"""

from __future__ import annotations

from typing import Any

import typer


def _names(ctx: typer.Context, table: str) -> list[str]:
    from drtool.config import find_config_path, load_inventory
    from drtool.errors import DrtoolError

    config = ctx.find_root().params.get("config")
    try:
        inventory: Any = load_inventory(find_config_path(config))
    except (DrtoolError, OSError):
        return []
    return sorted(getattr(inventory, table))


def vm_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return [n for n in _names(ctx, "vms") if n.startswith(incomplete)]


def host_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return [n for n in _names(ctx, "hosts") if n.startswith(incomplete)]
