"""drtool-lab demo | up [--dir D] [--vm NAME ...] | down --dir D | guest

`demo` runs drtool's main job on a lab it starts and tears down (README's first command).

`up` starts a two-site lab (site-a, site-b) with VMs on site-a (default: one VM
"demo" with disks vd0 64M and vd1 32M), writes D/drtool.toml replicating them
to site-b, prints where things are, and exits leaving the lab running.
`down` tears it down from the state file in D.
`guest` builds (or finds in its cache) the lab's Linux guest and prints its files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drtool.lab.lab import Lab, teardown_dir
from drtool.lab.netns import LabError


def _up(args: argparse.Namespace) -> int:
    lab = Lab(root_dir=args.dir, hosts=("site-a", "site-b"))
    lab.start()
    try:
        for name in args.vm or ["demo"]:
            lab.add_vm(name, "site-a", {"vd0": "64M", "vd1": "32M"})
        config = lab.write_config(lab.dir / "drtool.toml", {name: {"dr_host": "site-b"} for name in lab.vms})
    except BaseException:
        lab.stop()
        raise
    state = lab.detach()
    print(f"config: {config}")
    print(f"state:  {state}")
    for host in lab.hosts:
        print(f"host {host}: root@{lab.address(host)} (namespace {lab.namespace(host)}, dir {lab.host_dir(host)})")
    for vm in lab.vms.values():
        print(f"vm {vm.name}: on {vm.host}, pid {vm.pid}, QMP {vm.qmp_socket}")
    # ssh splits UserKnownHostsFile on blanks: the path needs quotes inside the option too.
    print(
        f"ssh: ssh -i '{lab.identity_file}' -o 'UserKnownHostsFile=\"{lab.known_hosts}\"' "
        f"root@{lab.address('site-a')}"
    )
    print(f"down: python -m drtool.lab down --dir '{lab.dir}'")
    return 0


def _down(args: argparse.Namespace) -> int:
    problems = teardown_dir(args.dir.absolute())
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drtool-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run drtool on a throw-away lab, then tear it down")
    up = sub.add_parser("up", help="start a lab and leave it running")
    up.add_argument("--dir", type=Path, help="lab directory (default: a new /tmp/drlab-*)")
    up.add_argument("--vm", action="append", metavar="NAME", help="a VM to create on site-a (repeatable)")
    down = sub.add_parser("down", help="tear down the lab in --dir")
    down.add_argument("--dir", type=Path, required=True)
    sub.add_parser("guest", help="build the lab's Linux guest (kernel from apt, busybox initramfs) and print it")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from drtool.lab.demo import run_demo

            return run_demo()
        if args.command == "guest":
            from drtool.lab.guest import build_guest

            image = build_guest()
            print(f"guest kernel {image.version}: {image.kernel}\ninitramfs: {image.initrd}")
            return 0
        return _up(args) if args.command == "up" else _down(args)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
