"""The CLI's contract: exit codes, one-line errors, no tracebacks, nothing contacted on bad input."""

import subprocess
import sys

import pytest

from drtool.errors import ExitCode


def drtool(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drtool", *args], capture_output=True, text=True,
                          timeout=60, env=env)


GOOD = """
[hosts.kvm1]
address = "{addr}"
connect_timeout = 1
[hosts.kvm2]
address = "{addr}"
[vms.web]
host = "kvm1"
qmp_socket = "/run/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[hosts.kvm1]\nadress = 'x'\n", '[hosts.kvm1] unknown key "adress"'),
        ("[vms.web]\nhost = 'nope'\n", "[vms.web]"),
        ("[hosts\n", "TOML syntax error"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, expected):
    cfg = tmp_path / "drtool.toml"
    cfg.write_text(text)
    for command in (["status"], ["hosts", "check"]):
        result = drtool("--config", str(cfg), *command)
        assert result.returncode == ExitCode.USAGE, result.stderr
        assert expected in result.stderr and str(cfg) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_config_says_where_it_looked(tmp_path):
    result = drtool("--config", str(tmp_path / "absent.toml"), "status")
    assert result.returncode == ExitCode.USAGE
    assert "absent.toml" in result.stderr and "--config" in result.stderr


def test_unknown_vm_is_refused_before_contacting_anything(tmp_path):
    # The hosts' address is a name that cannot resolve: any contact attempt would show as exit 3.
    cfg = tmp_path / "drtool.toml"
    cfg.write_text(GOOD.format(addr="kvm.invalid"))
    result = drtool("--config", str(cfg), "status", "db")
    assert result.returncode == ExitCode.USAGE and "unknown VM 'db'" in result.stderr
    result = drtool("--config", str(cfg), "hosts", "check", "kvm9")
    assert result.returncode == ExitCode.USAGE and "unknown host 'kvm9'" in result.stderr


def test_version_and_usage_error():
    assert drtool("--version").stdout.startswith("drtool ")
    assert drtool("no-such-command").returncode == ExitCode.USAGE


@pytest.mark.parametrize(("args", "expected"), [
    (["no-such-command"], "No such command 'no-such-command'"),
    (["failover", "--nope", "web"], "No such option: --nope"),
    (["failover"], "Missing argument 'VM'"),
    (["checkpoint", "--all", "--keep-going"], "No such option: --keep-going"),
])
def test_usage_errors_are_one_line_and_exit_2(args, expected):
    result = drtool(*args)
    assert result.returncode == ExitCode.USAGE, result
    assert result.stderr.startswith("drtool: error: ") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == "", result.stderr


def test_config_that_is_a_directory_is_one_line(tmp_path):
    result = drtool("--config", str(tmp_path), "status")
    assert result.returncode == ExitCode.USAGE and "is a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_is_plain_and_says_what_a_user_needs():
    top = drtool("--help")
    assert top.returncode == 0 and "Exit codes: 0" in top.stdout and "130 interrupted" in top.stdout
    status = drtool("status", "--help").stdout
    assert "[VM]..." in status and "<bool>" not in status and "Examples:" in status
    failover = drtool("failover", "--help").stdout
    assert "--yes" in failover and "asks for the VM's name" in failover and "--point ID" in failover
    for box in "╭│─":
        assert box not in top.stdout + status + failover


def test_errors_under_json_are_json_on_stderr(tmp_path):
    cfg = tmp_path / "drtool.toml"
    cfg.write_text(GOOD.format(addr="kvm.invalid"))
    result = drtool("--config", str(cfg), "--json", "status", "db")
    assert result.returncode == ExitCode.USAGE and result.stdout == ""
    import json

    error = json.loads(result.stderr)
    assert error["schema_version"] == 1 and error["command"] == "status" and error["exit_code"] == 2
    assert "unknown VM 'db'" in error["error"] and error["hint"]
