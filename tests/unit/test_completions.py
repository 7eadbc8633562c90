"""The shipped completion scripts are the ones drtool itself generates, and they complete commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


@pytest.mark.parametrize(("shell", "name"), [("bash", "drtool.bash"), ("zsh", "_drtool"), ("fish", "drtool.fish")])
def test_shipped_scripts_are_current(shell, name):
    drtool = Path(sys.executable).parent / "drtool"  # the console script: completions name the program
    generated = subprocess.run([str(drtool), "--show-completion", shell], capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == (COMPLETIONS / name).read_text(), f"regenerate: drtool --show-completion {shell}"


def test_bash_completion_offers_the_commands():
    result = subprocess.run([sys.executable, "-m", "drtool"], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"_DRTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "drtool fail",
                                              "COMP_CWORD": "1"})
    assert "failover" in result.stdout.split()
