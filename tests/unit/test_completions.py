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
