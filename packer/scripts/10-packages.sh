#!/bin/bash
# Provisioning step 1/4: Debian packages of the appliance, and pending updates.
# Runs as root inside the machine being built: the Packer build VM (Debian cloud image)
# or the debootstrap chroot of build-local.sh. `10-packages.sh --list` prints the list.
# Env: IHB_APT_UPGRADE=1 (default) also installs every pending update.
set -euo pipefail

PACKAGES=(
    python3 python3-venv          # the venv of /opt/ihb/venv
    fuse3                         # libfuse3 + fusermount3 for `ihb mount`
    openssl ca-certificates       # first-boot TLS certificate and secrets
    netbase                       # /etc/protocols, /etc/services (nftables resolves names)
    nftables                      # firewall
    unattended-upgrades           # security updates
    e2fsprogs xfsprogs util-linux # data disk: mkfs, blkid, wipefs, lsblk
    openssh-server sudo
    qemu-guest-agent              # fsfreeze/shutdown from the hypervisor
    curl less procps iproute2
)
if [ "${1:-}" = --list ]; then echo "${PACKAGES[@]}"; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
apt_get() {
    apt-get -o DPkg::Lock::Timeout=600 -o APT::Install-Recommends=false \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -y -q "$@"
}

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ "${IHB_APT_UPGRADE:-1}" = 1 ]; then
    apt_get update
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "10-packages: installing ${missing[*]}"
    apt_get install --no-install-recommends "${missing[@]}"
fi
if [ "${IHB_APT_UPGRADE:-1}" = 1 ]; then
    apt_get dist-upgrade
fi
echo "10-packages: done"
