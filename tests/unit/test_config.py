"""Unit tests for drtool.config: pure, no network, no real home directory."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from drtool.config import _Locator, find_config_path, load_inventory, parse_inventory
from drtool.domain import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    Host,
    Inventory,
    ReplicationMode,
    Vm,
)
from drtool.errors import ConfigError, ExitCode

CONF = Path("/etc/drtool/drtool.toml")

VALID = """\
# drtool inventory
[hosts.kvm1]
address = "kvm1.example.net"
port = 2222
user = "root"
identity_file = "~/.ssh/id_drtool"
known_hosts = "keys/known_hosts"
connect_timeout = 5
command_timeout = 120.5

[hosts.kvm2]
address = "192.0.2.7"

[vms.web]
host = "kvm1"
qmp_socket = "/run/drtool/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
disks = ["vd0", "vd1"]
mode = "sync"

[vms."db-1.prod"]
host = "kvm2"
qmp_socket = "/run/drtool/db.qmp"
dr_host = "kvm1"
replica_dir = "/var/lib/drtool/db"
"""

# A small valid base for error cases: each test edits one spot.
BASE = """\
[hosts.kvm1]
address = "kvm1"

[hosts.kvm2]
address = "kvm2"

[vms.web]
host = "kvm1"
qmp_socket = "/run/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
"""


def config_error(text: str, path: Path = CONF) -> str:
    with pytest.raises(ConfigError) as info:
        parse_inventory(text, path)
    err = info.value
    assert err.exit_code == ExitCode.USAGE == 2
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# -- valid files ---------------------------------------------------------------


def test_complete_file_gives_exact_domain_objects(monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    inv = parse_inventory(VALID, CONF)
    assert inv == Inventory(
        path=CONF,
        hosts={
            "kvm1": Host(
                name="kvm1",
                address="kvm1.example.net",
                port=2222,
                user="root",
                identity_file=Path("/home/op/.ssh/id_drtool"),
                known_hosts=Path("/etc/drtool/keys/known_hosts"),
                connect_timeout=5.0,
                command_timeout=120.5,
            ),
            "kvm2": Host(name="kvm2", address="192.0.2.7"),
        },
        vms={
            "web": Vm(
                name="web",
                host="kvm1",
                qmp_socket=PurePosixPath("/run/drtool/web.qmp"),
                dr_host="kvm2",
                replica_dir=PurePosixPath("/var/lib/drtool/web"),
                disks=("vd0", "vd1"),
                mode=ReplicationMode.SYNC,
            ),
            "db-1.prod": Vm(
                name="db-1.prod",
                host="kvm2",
                qmp_socket=PurePosixPath("/run/drtool/db.qmp"),
                dr_host="kvm1",
                replica_dir=PurePosixPath("/var/lib/drtool/db"),
            ),
        },
    )
    assert list(inv.hosts) == ["kvm1", "kvm2"]


def test_defaults_and_types():
    inv = parse_inventory(BASE, CONF)
    host, vm = inv.host("kvm2"), inv.vm("web")
    assert (host.port, host.user, host.identity_file, host.known_hosts) == (None, None, None, None)
    assert host.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert host.command_timeout == DEFAULT_COMMAND_TIMEOUT
    assert vm.disks == ()
    assert vm.mode is ReplicationMode.ASYNC
    assert type(vm.qmp_socket) is PurePosixPath and type(vm.replica_dir) is PurePosixPath
    assert isinstance(inv.host("kvm1").connect_timeout, float)


def test_empty_file_is_an_empty_inventory():
    assert parse_inventory("", CONF) == Inventory(path=CONF)
    assert parse_inventory("# nothing yet\n", CONF) == Inventory(path=CONF)


def test_hosts_without_vms_is_valid():
    inv = parse_inventory('[hosts.a]\naddress = "a"\n', CONF)
    assert list(inv.hosts) == ["a"] and inv.vms == {}


def test_local_paths_relative_to_a_relative_config_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inv = parse_inventory('[hosts.a]\naddress = "a"\nidentity_file = "id"\n', Path("drtool.toml"))
    assert inv.host("a").identity_file == tmp_path / "id"
    assert inv.path == Path("drtool.toml")


def test_absolute_local_path_kept():
    inv = parse_inventory('[hosts.a]\naddress = "a"\nknown_hosts = "/srv/kh"\n', CONF)
    assert inv.host("a").known_hosts == Path("/srv/kh")


def test_other_ways_to_write_tables():
    text = """\
[hosts]
kvm1 = { address = "kvm1", port = 22 }
kvm2.address = "kvm2"

[vms.web]
host = "kvm1"
qmp_socket = "/q"
dr_host = "kvm2"
replica_dir = "/r"
"""
    inv = parse_inventory(text, CONF)
    assert inv.host("kvm1").port == 22 and inv.host("kvm2").address == "kvm2"


# -- errors --------------------------------------------------------------------


def test_unknown_key_with_suggestion():
    msg = config_error(BASE.replace('address = "kvm1"', 'adress = "kvm1"'))
    assert msg == (
        f'{CONF}: [hosts.kvm1] unknown key "adress" (did you mean "address"?) (line 2)'
    )


def test_unknown_key_without_close_match_lists_allowed_keys():
    msg = config_error(BASE + 'colour = "blue"\n')
    assert '[vms.web] unknown key "colour"; allowed keys: host, qmp_socket,' in msg
    assert msg.endswith("(line 12)")


def test_vm_names_undefined_host():
    msg = config_error(BASE.replace('host = "kvm1"', 'host = "kvm9"'))
    assert msg == f'{CONF}: [vms.web] host = "kvm9": no such host; defined hosts: kvm1, kvm2 (line 8)'


def test_vm_names_undefined_dr_host():
    msg = config_error(BASE.replace('dr_host = "kvm2"', 'dr_host = "kvm3"'))
    assert msg == f'{CONF}: [vms.web] dr_host = "kvm3": no such host; defined hosts: kvm1, kvm2 (line 10)'


def test_vm_without_any_hosts():
    text = BASE.split("[vms.web]")[1]
    msg = config_error("[vms.web]" + text)
    assert '[vms.web] host = "kvm1": no such host; defined hosts: none (line 2)' in msg


def test_missing_required_key_points_at_the_table():
    msg = config_error(BASE.replace('replica_dir = "/var/lib/drtool/web"\n', ""))
    assert msg == f'{CONF}: [vms.web]: missing required key "replica_dir" (line 7)'


def test_missing_address():
    msg = config_error(BASE.replace('address = "kvm2"\n', 'user = "root"\n'))
    assert msg == f'{CONF}: [hosts.kvm2]: missing required key "address" (line 4)'


def test_misspelt_required_key_is_reported_once():
    msg = config_error(BASE.replace("replica_dir", "replica_dri"))
    assert msg == (
        f'{CONF}: [vms.web] unknown key "replica_dri" (did you mean "replica_dir"?) (line 11)'
    )


@pytest.mark.parametrize(
    ("key", "line"), [("qmp_socket", 9), ("replica_dir", 11)]
)
def test_relative_remote_paths(key, line):
    text = BASE.replace(f'{key} = "/', f'{key} = "')
    msg = config_error(text)
    assert f"[vms.web] {key} = " in msg
    assert msg.endswith(f": must be an absolute path (line {line})")


def test_dr_host_same_as_host():
    msg = config_error(BASE.replace('dr_host = "kvm2"', 'dr_host = "kvm1"'))
    assert msg == (
        f'{CONF}: [vms.web] dr_host = "kvm1": '
        'a VM\'s DR host must differ from its host "kvm1" (line 10)'
    )


def test_toml_syntax_error():
    msg = config_error(BASE.replace('address = "kvm2"', "address = kvm2"))
    assert msg.startswith(f"{CONF}: TOML syntax error: ")
    assert "line 5" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("port = \"22\"", '[hosts.kvm1] port = "22": must be an integer (line 3)'),
        ("port = true", "[hosts.kvm1] port = true: must be an integer, not true/false (line 3)"),
        ("port = 0", "[hosts.kvm1] port = 0: must be between 1 and 65535 (line 3)"),
        ("port = 65536", "[hosts.kvm1] port = 65536: must be between 1 and 65535 (line 3)"),
        ("port = 22.0", "[hosts.kvm1] port = 22.0: must be an integer (line 3)"),
        ("user = 0", "[hosts.kvm1] user = 0: must be a string (line 3)"),
        ('user = ""', '[hosts.kvm1] user = "": must not be empty (line 3)'),
        ('user = "a b"', '[hosts.kvm1] user = "a b": must not contain spaces or control characters (line 3)'),
        ("identity_file = 1", "[hosts.kvm1] identity_file = 1: must be a string (line 3)"),
        ("connect_timeout = 0", "[hosts.kvm1] connect_timeout = 0: must be a finite number of seconds > 0 (line 3)"),
        ("command_timeout = -1.5", "[hosts.kvm1] command_timeout = -1.5: must be a finite number of seconds > 0 (line 3)"),
        ("command_timeout = inf", "[hosts.kvm1] command_timeout = inf: must be a finite number of seconds > 0 (line 3)"),
        ('connect_timeout = "10"', '[hosts.kvm1] connect_timeout = "10": must be a number of seconds (line 3)'),
        ("connect_timeout = false", "[hosts.kvm1] connect_timeout = false: must be a number of seconds (line 3)"),
    ],
)
def test_host_field_types(edit, expected):
    text = BASE.replace('address = "kvm1"\n', f'address = "kvm1"\n{edit}\n')
    assert config_error(text) == f"{CONF}: {expected}"


def test_address_wrong_type():
    msg = config_error(BASE.replace('address = "kvm1"', "address = 10"))
    assert msg == f"{CONF}: [hosts.kvm1] address = 10: must be a string (line 2)"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ('mode = "asynch"', '[vms.web] mode = "asynch": unknown mode; choose one of: "async", "sync" (line 12)'),
        ("mode = 1", '[vms.web] mode = 1: unknown mode; choose one of: "async", "sync" (line 12)'),
        ('disks = ["vd0", "vd0"]', '[vms.web] disks = ["vd0", "vd0"]: duplicate device id "vd0" (line 12)'),
        ('disks = ["vd0", ""]', '[vms.web] disks = ["vd0", ""]: item "" is not a non-empty string (line 12)'),
        ("disks = [1]", "[vms.web] disks = [1]: item 1 is not a non-empty string (line 12)"),
        ('disks = "vd0"', '[vms.web] disks = "vd0": must be a list of device ids (line 12)'),
        ('exclude_disks = ["rbd0", "rbd0"]', '[vms.web] exclude_disks = ["rbd0", "rbd0"]: duplicate device id "rbd0" '
                                             '(line 12)'),
        ('disks = ["vd0"]\nexclude_disks = ["vd0"]', '[vms.web] exclude_disks = ["vd0"]: vd0 cannot be both protected '
                                                     '(disks) and excluded (line 13)'),
    ],
)
def test_vm_optional_field_errors(edit, expected):
    assert config_error(BASE + edit + "\n") == f"{CONF}: {expected}"


def test_excluded_disks_reach_the_vm():
    vm = parse_inventory(BASE + 'exclude_disks = ["virtio-disk2", "fs0"]\n', CONF).vms["web"]
    assert vm.exclude_disks == ("virtio-disk2", "fs0")


def test_vm_required_field_wrong_type():
    msg = config_error(BASE.replace('qmp_socket = "/run/web.qmp"', "qmp_socket = 5"))
    assert msg == f"{CONF}: [vms.web] qmp_socket = 5: must be a string (line 9)"


def test_multiline_disks_list_is_located():
    text = BASE + 'disks = [\n  "vd0",\n  "vd0",\n]\n'
    assert config_error(text).endswith('duplicate device id "vd0" (line 12)')


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('[vms."web server"]', '"web server"'),
        ('[vms."a/b"]', '"a/b"'),
        ('[vms.".."]', '".."'),
        ('[vms.""]', '""'),
        ('[vms."wéb"]', '"wéb"'),
    ],
)
def test_bad_vm_names(header, name):
    msg = config_error(BASE.replace("[vms.web]", header))
    assert msg == (
        f"{CONF}: [vms.{name}]: invalid VM name {name}: use only letters, digits, "
        "'.', '_' and '-' (names become file names) (line 7)"
    )


def test_bad_host_name():
    msg = config_error('[hosts."kvm 1"]\naddress = "x"\n')
    assert msg.startswith(f'{CONF}: [hosts."kvm 1"]: invalid host name "kvm 1"')
    assert msg.endswith("(line 1)")


def test_unknown_top_level_table():
    msg = config_error(BASE + '\n[vm.db]\nhost = "kvm1"\n')
    assert msg == (
        f"{CONF}: unknown top-level table [vm] (did you mean [vms]?); allowed: [hosts], [vms] (line 13)"
    )


def test_unknown_top_level_key():
    msg = config_error('version = 1\n' + BASE)
    assert msg == f"{CONF}: unknown top-level key [version]; allowed: [hosts], [vms] (line 1)"


def test_section_that_is_not_a_table():
    assert config_error('hosts = "kvm1"\n') == (
        f'{CONF}: hosts = "kvm1": must be a table ([hosts.NAME] sections) (line 1)'
    )
    assert config_error('[vms]\nweb = "kvm1"\n') == (
        f'{CONF}: [vms] web = "kvm1": must be a table ([vms.web]) (line 2)'
    )


def test_first_error_in_file_order_with_count():
    text = BASE.replace('address = "kvm2"', "address = 2").replace(
        'host = "kvm1"', 'host = "nope"'
    )
    text = "[vmz.x]\n" + text  # earlier in the file than both, seen last by the validator
    msg = config_error(text)
    assert msg.startswith(f"{CONF}: unknown top-level table [vmz]")
    assert msg.endswith("(line 1) (and 2 more)")


def test_errors_inside_inline_and_dotted_tables_are_located():
    text = """\
[hosts]
kvm1 = { address = "kvm1", port = "22" }
kvm2.address = "kvm2"
kvm2.prot = 22
"""
    msg = config_error(text)
    assert msg == f'{CONF}: [hosts.kvm1] port = "22": must be an integer (line 2) (and 1 more)'
    msg = config_error(text.replace('"22"', "22"))
    assert msg == f'{CONF}: [hosts.kvm2] unknown key "prot" (did you mean "port"?) (line 4)'


def test_quoted_headers_and_keys_are_located():
    text = BASE.replace("[vms.web]", "[ vms . 'web' ]").replace(
        'dr_host = "kvm2"', '"dr_host" = "kvm1"'
    )
    assert config_error(text).endswith("(line 10)")


def test_multiline_strings_do_not_confuse_the_locator():
    decoy = 'note = """\n[vms.web]\ndisks = 1\n"""\n'  # lines 1-4
    locate = _Locator(decoy + BASE + "disks = 1\n").line
    assert locate("vms", "web") == 11
    assert locate("vms", "web", "disks") == 16
    assert locate("note") == 1


def test_locator_returns_none_when_unsure():
    locate = _Locator(BASE).line
    assert locate("vms", "web", "mode") is None
    assert locate("vms", "db") is None
    assert locate("hosts", "kvm2", "address") == 5


def test_unlocatable_error_has_no_line_number(monkeypatch):
    monkeypatch.setattr("drtool.config._Locator.line", lambda self, *path: None)
    msg = config_error(BASE.replace('host = "kvm1"', 'host = "kvm9"'))
    assert msg == f'{CONF}: [vms.web] host = "kvm9": no such host; defined hosts: kvm1, kvm2'


def test_array_of_tables_is_not_a_section():
    msg = config_error("[[vms]]\nhost = 1\n")
    assert msg == f"{CONF}: vms = [{{ host = 1 }}]: must be a table ([vms.NAME] sections) (line 1)"


def test_long_values_are_shortened():
    msg = config_error(BASE.replace('"/run/web.qmp"', '"' + "r" * 200 + '"'))
    assert "..." in msg and len(msg) < 200


# -- load_inventory: reading the file ----------------------------------------------


def test_load_inventory_reads_file(tmp_path):
    path = tmp_path / "drtool.toml"
    path.write_text(BASE.replace('address = "kvm1"', 'address = "kvm1"\nidentity_file = "id"'))
    inv = load_inventory(path)
    assert inv.path == path and inv.host("kvm1").identity_file == tmp_path / "id"


def test_load_inventory_accepts_bom(tmp_path):
    path = tmp_path / "drtool.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert set(load_inventory(path).hosts) == {"kvm1", "kvm2"}


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b'[hosts.a]\naddress = "\xff"\n'), "not UTF-8 text (invalid byte at line 2)"),
    ],
)
def test_load_inventory_unreadable(tmp_path, make, reason):
    path = tmp_path / "drtool.toml"
    make(path)
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{path}: ")
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_load_inventory_permission_denied(tmp_path, monkeypatch):
    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    path = tmp_path / "drtool.toml"
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert str(info.value) == f"{path}: cannot read configuration file: permission denied"


# -- find_config_path ------------------------------------------------------------


@pytest.fixture
def places(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (home / ".config" / "drtool").mkdir(parents=True)
    cwd.mkdir()
    files = {
        "explicit": tmp_path / "explicit.toml",
        "env": tmp_path / "env.toml",
        "local": cwd / "drtool.toml",
        "user": home / ".config" / "drtool" / "drtool.toml",
    }
    for f in files.values():
        f.write_text("")
    return cwd, home, files


def find(explicit, env, cwd, home):
    return find_config_path(explicit, env=env, cwd=cwd, home=home)


def test_precedence(places):
    cwd, home, files = places
    env = {"DRTOOL_CONFIG": str(files["env"])}
    assert find(files["explicit"], env, cwd, home) == files["explicit"]
    assert find(None, env, cwd, home) == files["env"]
    assert find(None, {}, cwd, home) == files["local"]
    assert find(None, {"DRTOOL_CONFIG": ""}, cwd, home) == files["local"]
    files["local"].unlink()
    assert find(None, {}, cwd, home) == files["user"]


def test_relative_and_tilde_paths(places):
    cwd, home, files = places
    assert find(Path("drtool.toml"), {}, cwd, home) == files["local"]
    env = {"DRTOOL_CONFIG": "~/.config/drtool/drtool.toml"}
    assert find(None, env, cwd, home) == files["user"]


def test_default_cwd_is_process_cwd(places, monkeypatch):
    cwd, home, files = places
    monkeypatch.chdir(cwd)
    assert find_config_path(None, env={}, home=home) == Path("drtool.toml")


@pytest.mark.parametrize(
    ("which", "said"), [("explicit", "given with --config"), ("env", "from $DRTOOL_CONFIG")]
)
def test_missing_chosen_file_does_not_fall_back(places, which, said):
    cwd, home, files = places
    files[which].unlink()
    explicit = files["explicit"] if which == "explicit" else None
    env = {"DRTOOL_CONFIG": str(files["env"])}
    with pytest.raises(ConfigError) as info:
        find(explicit, env, cwd, home)
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert f"configuration file {files[which]} not found ({said})" in msg
    assert "--config" in msg and "README" in msg and "\n" not in msg


def test_nothing_found_lists_places_looked_at(places):
    cwd, home, files = places
    files["local"].unlink()
    files["user"].unlink()
    with pytest.raises(ConfigError) as info:
        find(None, {}, cwd, home)
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert str(files["local"]) in msg and str(files["user"]) in msg
    assert "$DRTOOL_CONFIG" in msg and "--config" in msg and "README" in msg


LIBVIRT_VM = BASE.replace('qmp_socket = "/run/web.qmp"', 'libvirt_domain = "web-prod"')


def test_a_libvirt_domain_instead_of_a_qmp_socket():
    vm = parse_inventory(LIBVIRT_VM + 'libvirt_uri = "qemu:///system"\n', CONF).vms["web"]
    assert (vm.libvirt_domain, vm.libvirt_uri, vm.qmp_socket) == ("web-prod", "qemu:///system", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LIBVIRT_VM + 'qmp_socket = "/run/web.qmp"\n',
         '[vms.web] libvirt_domain = "web-prod": a VM names qmp_socket (QEMU run by hand) or libvirt_domain '
         "(libvirt runs it), not both (line 9)"),
        (BASE + 'libvirt_uri = "qemu:///system"\n',
         '[vms.web] libvirt_uri = "qemu:///system": libvirt_uri goes with libvirt_domain (line 12)'),
        (BASE.replace('qmp_socket = "/run/web.qmp"\n', ""),
         '[vms.web]: missing required key "qmp_socket" (or "libvirt_domain" for a libvirt domain) (line 7)'),
    ],
)
def test_one_monitor_per_vm(text, expected):
    assert config_error(text) == f"{CONF}: {expected}"
