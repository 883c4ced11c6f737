#!/bin/bash
# Provisioning step 3/4: appliance configuration and systemd units.
# Copies $IHB_BUILD_DIR/files/rootfs/ over / (units, configs, first-boot scripts), then
# enables what must run. Nothing is started: in a chroot, `systemctl enable` only links.
set -euo pipefail
B=${IHB_BUILD_DIR:-/tmp/ihb-build}
F=$B/files/rootfs

cp -R --no-preserve=ownership "$F/." /
chmod 0755 /usr/lib/ihb/*
chown -R root:ihb /etc/ihb
chmod 0750 /etc/ihb
chmod 0640 /etc/ihb/config.toml /etc/ihb/datadisk.conf
chmod 0644 /etc/ihb/build-info 2>/dev/null || true

# data disk: mounted by label if present (see ihb-datadisk.service), never blocks boot
install -d -m 0755 /srv/ihb
if ! grep -q 'LABEL=ihb-data' /etc/fstab; then
    printf '%s\n' "# ihb data disk (repository, appliance secrets): formatted at boot by ihb-datadisk if blank" \
        "LABEL=ihb-data  /srv/ihb  auto  defaults,noatime,nofail,x-systemd.device-timeout=30s  0  2" >> /etc/fstab
fi

# FUSE: let the restore mount use allow_other even through fusermount3
if ! grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null; then
    echo 'user_allow_other' >> /etc/fuse.conf
fi

# persistent journal
install -d -m 2755 -g systemd-journal /var/log/journal

systemctl enable ihb-datadisk.service ihb-sshkeys.service ihb-firstboot.service \
    ihb-server.service ihb-mount.service ihb-scheduler.timer
systemctl enable nftables.service ssh.service unattended-upgrades.service \
    apt-daily.timer apt-daily-upgrade.timer
# e2scrub checks ext4 on LVM snapshots; the appliance has no LVM, and its boot pass is slow
systemctl disable e2scrub_reap.service e2scrub_all.timer 2>/dev/null || true
echo "30-configure: done"
