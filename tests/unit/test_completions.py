"""The shipped completion scripts are the ones drtool itself generates, and they complete commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


@pytest.mark.parametrize(("shell", "name", "marker"), [
    ("bash", "drtool.bash", "complete -o default -F"),
    ("zsh", "_drtool", "#compdef drtool"),
    ("fish", "drtool.fish", "complete --command drtool"),
])
def test_shipped_scripts_are_current(shell, name, marker):
    """Regenerate with typer's generator (see the script's comment) when this fails."""
    from typer._completion_shared import get_completion_script

    shipped = (COMPLETIONS / name).read_text()
    assert marker in shipped
    assert shipped == get_completion_script(prog_name="drtool", complete_var="_DRTOOL_COMPLETE", shell=shell)


def test_bash_completion_offers_the_commands():
    result = subprocess.run([sys.executable, "-m", "drtool"], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"_DRTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "drtool fail",
                                              "COMP_CWORD": "1"})
    assert "failover" in result.stdout.split()


INVENTORY = """\
[hosts.kvm1]
address = "kvm1.example.net"
[hosts.kvm2]
address = "kvm2.example.net"
[vms.web]
host = "kvm1"
qmp_socket = "/run/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
[vms.db]
host = "kvm1"
qmp_socket = "/run/db.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/db"
"""


def _complete(words: str, cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "drtool"], capture_output=True, text=True, timeout=60, cwd=cwd,
                            env=os.environ | {"_DRTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                              "COMP_CWORD": str(len(words.split(" ")) - 1)})
    return result.stdout.split()


def test_completion_offers_vm_and_host_names_from_the_inventory(tmp_path):
    (tmp_path / "drtool.toml").write_text(INVENTORY)
    assert _complete("drtool failover w", tmp_path) == ["web"]
    assert _complete("drtool status ", tmp_path) == ["db", "web"]
    assert _complete("drtool hosts check kvm", tmp_path) == ["kvm1", "kvm2"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "named.toml").write_text(INVENTORY.replace("web", "mail"))
    assert _complete(f"drtool --config {tmp_path / 'named.toml'} resync ", other) == ["db", "mail"]
    assert _complete("drtool resync ", other) == []  # no inventory: nothing, and no error
