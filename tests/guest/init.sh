#!/bin/busybox sh
# /init of the ihb test guest: busybox-static, a few kernel modules, qemu-ga. PID 1 for its whole life.
#
# Kernel command line:
#   ihb.action=marker|check|serve   what to do (default: serve)
#   ihb.root=/dev/vda1              ext4 device to mount read-write at /mnt when present
# Every line meant for the host starts with "IHBGUEST:"; tests grep the serial log for them.
#   marker  write /mnt/marker.txt with the boot id, MARKER-WRITTEN <id>, sync, power off
#   check   MARKER-FOUND <content> (or MARKER-MISSING), write /mnt/instant-boot-write.txt,
#           OVERLAY-WRITE-DONE, power off
#   serve   READY, then stay up with qemu-ga so the host drives the guest (guest-exec, guest-file-*,
#           fsfreeze, fstrim). Ends with QMP quit, or system_powerdown / guest-shutdown, which
#           unmount cleanly before powering off.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt /run /tmp /var/log
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

say() { echo "IHBGUEST: $*" > /dev/console; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

ACTION=serve
ROOT=/dev/vda1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ihb.action=*) ACTION="${arg#ihb.action=}" ;;
    ihb.root=*) ROOT="${arg#ihb.root=}" ;;
  esac
done
say "BOOTED action=$ACTION uptime=$(uptime_s)s"

# busybox modprobe resolves dependencies from the trimmed modules.dep built by build_guest.sh.
# button + evdev: the ACPI power button, so QMP system_powerdown reaches acpid below.
for m in virtio_pci virtio_blk crc32c_generic ext4 virtio_console button evdev; do
  modprobe "$m" 2>/dev/null || say "WARN cannot load module $m"
done

# device nodes appear asynchronously (devtmpfs): give the partition a moment when there is a disk
MOUNTED=""
i=0
set -- /sys/block/vd*
if [ -e "$1" ]; then
  while [ ! -b "$ROOT" ] && [ $i -lt 60 ]; do sleep 0.05; i=$((i + 1)); done
fi
if [ -b "$ROOT" ]; then
  if mount -t ext4 -o rw "$ROOT" /mnt; then
    MOUNTED=1
    say "MOUNTED $ROOT uptime=$(uptime_s)s"
  else
    say "ERROR cannot mount $ROOT"
  fi
else
  say "NO-DISK $ROOT"
fi

# Clean power off, shared by the actions, acpid (power button) and qemu-ga's guest-shutdown,
# which runs /sbin/shutdown. Unmounting first leaves an ext4 that needs no journal replay.
cat > /sbin/ihb-poweroff <<'EOF'
#!/bin/sh
sync
if grep -q ' /mnt ' /proc/mounts; then
  umount /mnt 2>/dev/null || mount -o remount,ro /mnt 2>/dev/null
fi
echo "IHBGUEST: POWEROFF uptime=$(cut -d' ' -f1 /proc/uptime)s" > /dev/console
poweroff -f
EOF
chmod 755 /sbin/ihb-poweroff
ln -sf /sbin/ihb-poweroff /sbin/shutdown

need_disk() {
  [ -n "$MOUNTED" ] && return 0
  say "ERROR action $ACTION needs $ROOT"
  /sbin/ihb-poweroff
}

start_acpid() {
  # busybox acpid maps the power button (PWRF) to the handler file /etc/acpi/PWRF/00000080
  mkdir -p /etc/acpi/PWRF
  ln -sf /sbin/ihb-poweroff /etc/acpi/PWRF/00000080
  printf 'PWRF PWRF/00000080\nPWRB PWRF/00000080\n' > /etc/acpid.conf
  acpid -c /etc/acpi -a /etc/acpid.conf -l /var/log/acpid.log
}

start_qga() {
  [ -x /usr/sbin/qemu-ga ] || { say "ERROR no qemu-ga in the initramfs"; return 1; }
  # no udev, so no /dev/virtio-ports/<name> symlink: find the port by its sysfs name
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ]; then
      dev=/dev/$(basename "$p")
      /usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run -d -f /run/qga.pid -l /var/log/qga.log
      say "QGA-STARTED $dev"
      return 0
    fi
  done
  say "NO-QGA-PORT org.qemu.guest_agent.0"
  return 1
}

case "$ACTION" in
  marker)
    need_disk
    id=$(cat /proc/sys/kernel/random/boot_id)
    echo "ihb marker boot_id=$id" > /mnt/marker.txt
    sync
    say "MARKER-WRITTEN $id"
    ;;
  check)
    need_disk
    if [ -f /mnt/marker.txt ]; then say "MARKER-FOUND $(cat /mnt/marker.txt)"; else say "MARKER-MISSING"; fi
    echo "written in instant-boot session $(cat /proc/sys/kernel/random/boot_id)" > /mnt/instant-boot-write.txt
    sync
    say "OVERLAY-WRITE-DONE"
    if [ -f /mnt/ihb-stay ]; then  # instant-recovery tests: keep running so the VM can be migrated live
      start_acpid
      start_qga
      say "READY uptime=$(uptime_s)s"
      while true; do sleep 3600; done
    fi
    ;;
  serve)
    start_acpid
    start_qga
    say "READY uptime=$(uptime_s)s"
    # PID 1 must never exit (kernel panic); the host ends the guest.
    while true; do sleep 3600; done
    ;;
  *)
    say "ERROR unknown ihb.action=$ACTION"
    ;;
esac
/sbin/ihb-poweroff
