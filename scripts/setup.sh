#!/usr/bin/env bash
# Installs what drtool, its tests and its local lab need on Debian 12, then
# drtool itself (editable) into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root: it installs Debian packages, and the lab creates network namespaces" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-system-common qemu-utils \
    openssh-server openssh-client iproute2 socat procps python3-libnbd \
    python3 python3-venv python3-pip ca-certificates \
    busybox-static
# libvirt for the lab's libvirt sites (opt-in per test); the -sysv packages keep systemd out
apt-get install -y -q --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup.sh: drtool needs Python 3.11 or newer ($python is $("$python" --version))" >&2
    exit 2
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup.sh: drtool installed in $(pwd)/.venv"
# The lab's Linux guest: Debian's cloud kernel (apt-get download, cached under
# /var/cache/drtool-lab/guest) and busybox-static in an initramfs, built now so
# that the first test or demo does not wait for it.
.venv/bin/drtool-lab guest
