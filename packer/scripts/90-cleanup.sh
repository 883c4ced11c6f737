#!/bin/bash
# Provisioning step 4/4: remove what must not be shared by every appliance made from
# this image (SSH host keys, machine id, logs, caches), and the build inputs.
set -euo pipefail
B=${IHB_BUILD_DIR:-/tmp/ihb-build}
export DEBIAN_FRONTEND=noninteractive

apt-get -y -q autoremove --purge
apt-get clean
rm -rf /var/lib/apt/lists/* 2>/dev/null || true
rm -f /etc/ssh/ssh_host_*            # made per machine by ihb-sshkeys.service
: > /etc/machine-id                  # made per machine by systemd at first boot
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/lib/ihb-firstboot /root/ihb-credentials.txt
if command -v cloud-init >/dev/null 2>&1; then
    cloud-init clean --logs --seed || true   # the provider's cloud-init runs again at deploy
fi
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /var/log/journal/*/ /tmp/* /var/tmp/* /root/.cache /root/.bash_history
rm -rf "$B"
sync
# in the Packer build VM: hand the freed blocks back, so the image shrinks. Never in
# build-local.sh's chroot, where / is the build host's file system.
if [ "${IHB_BUILDER:-}" = packer ]; then
    fstrim -v / || true
fi
echo "90-cleanup: done"
