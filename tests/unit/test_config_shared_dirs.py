"""Each VM has drtool directories of its own: a shared one would let one VM delete the other's key or manifest."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from drtool.config import parse_inventory
from drtool.domain import Vm
from drtool.errors import ConfigError
from drtool.mechanics.dr_target import source_tls_dir

CONF = Path("/etc/drtool/drtool.toml")
TWO_VMS = """\
[hosts.kvm1]
address = "kvm1"

[hosts.kvm2]
address = "kvm2"

[vms.web]
host = "kvm1"
qmp_socket = "/run/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
source_dir = "/var/lib/drtool/src"

[vms.db]
host = "kvm1"
qmp_socket = "/run/db.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/db"
source_dir = "/var/lib/drtool/src"
"""


def test_two_vms_on_one_host_sharing_a_source_dir_are_refused():
    with pytest.raises(ConfigError) as info:
        parse_inventory(TWO_VMS, CONF)
    assert str(info.value) == (f"{CONF}: [vms.db] source_dir '/var/lib/drtool/src' on kvm1 is also VM 'web''s: "
                               "give each VM a directory of its own (line 19)")


def test_a_shared_replica_dir_is_refused():
    text = TWO_VMS.replace('replica_dir = "/var/lib/drtool/db"', 'replica_dir = "/var/lib/drtool/web"')
    text = text.replace('source_dir = "/var/lib/drtool/src"\n', "")
    with pytest.raises(ConfigError, match=r"\[vms.db\] replica_dir '/var/lib/drtool/web' on kvm2 is also VM 'web''s"):
        parse_inventory(text, CONF)


def test_the_same_source_dir_on_different_hosts_is_fine():
    text = TWO_VMS.replace('[vms.db]\nhost = "kvm1"', '[vms.db]\nhost = "kvm2"').replace(
        'qmp_socket = "/run/db.qmp"\ndr_host = "kvm2"', 'qmp_socket = "/run/db.qmp"\ndr_host = "kvm1"')
    assert set(parse_inventory(text, CONF).vms) == {"web", "db"}


def test_tls_keys_live_in_a_directory_per_vm_even_in_one_source_dir():
    shared = PurePosixPath("/var/lib/drtool/src")
    web, db = (Vm(n, "kvm1", PurePosixPath(f"/run/{n}.qmp"), "kvm2", PurePosixPath(f"/dr/{n}"), source_dir=shared)
               for n in ("web", "db"))
    assert source_tls_dir(web) != source_tls_dir(db)
    assert source_tls_dir(web).is_relative_to(shared) and source_tls_dir(web).name == "web"
