"""How drtool drives QEMU and the hosts: replication jobs, the DR target, the DR VM, points, the link."""
