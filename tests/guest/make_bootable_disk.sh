#!/bin/bash
# Make a raw disk that boots by itself (BIOS -> syslinux MBR -> extlinux -> kernel + initramfs of
# the test guest), for instant-recovery and bare-metal-restore tests that boot with no -kernel.
#
#   make_bootable_disk.sh OUT [SIZE_MB [DIR_TO_COPY]]        (root: losetup + mount)
#
# Layout: MBR label, partition 1 at 1 MiB to the end, bootable, ext4 with 4 KiB blocks holding
# /boot/{vmlinuz,initrd.gz}, /boot/extlinux/* and the files of DIR_TO_COPY.
# extlinux.conf has labels marker, check and serve; DEFAULT check, plus a boot-once entry marker:
# the first boot writes /marker.txt, every later boot prints MARKER-FOUND and writes
# /instant-boot-write.txt. So a copy taken after the first boot proves, when booted, that it holds
# the original's data.
# Kernel and initrd come from IHB_TEST_GUEST_CACHE (default /var/cache/ihb-test-guest), built by
# build_guest.sh when missing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ] || [ $# -gt 3 ]; then echo "usage: $0 OUT [SIZE_MB [DIR_TO_COPY]]" >&2; exit 2; fi
OUT=$1
SIZE_MB=${2:-128}
SRC=${3:-}
CACHE=${IHB_TEST_GUEST_CACHE:-/var/cache/ihb-test-guest}
PYTHON=${PYTHON:-python3}
[ -z "$SRC" ] || [ -d "$SRC" ] || { echo "make_bootable_disk: $SRC is not a directory" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "make_bootable_disk: needs root (losetup, mount, extlinux)" >&2; exit 1; }

need=()
for c in extlinux:extlinux /usr/lib/EXTLINUX/mbr.bin:syslinux-common sfdisk:fdisk mke2fs:e2fsprogs losetup:mount; do
  f=${c%%:*}
  if [ "${f:0:1}" = / ]; then [ -e "$f" ] || need+=("${c#*:}"); else command -v "$f" >/dev/null || need+=("${c#*:}"); fi
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 -q update >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends "${need[@]}" >&2
fi
if [ ! -s "$CACHE/vmlinuz" ] || [ ! -s "$CACHE/initrd.gz" ]; then
  bash "$HERE/build_guest.sh" "$CACHE"
fi

STAGE=$(mktemp -d)
MNT=$(mktemp -d)
LOOP=""
quiet_extlinux() {  # extlinux chats about loop devices and disk geometry; keep errors and the status
  local out rc=0
  out=$(extlinux "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -e '^$' -e 'device geometry' -e 'is device /dev/loop' -e 'usually harmless' >&2 || true
  return $rc
}
cleanup() {
  if mountpoint -q "$MNT"; then umount "$MNT"; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP"; fi
  rm -rf "$STAGE"
  rmdir "$MNT" 2>/dev/null || true
}
trap cleanup EXIT

[ -z "$SRC" ] || cp -a "$SRC/." "$STAGE/"
mkdir -p "$STAGE/boot/extlinux"
cp "$CACHE/vmlinuz" "$STAGE/boot/vmlinuz"   # bzImage: extlinux cannot boot the PVH vmlinux
cp "$CACHE/initrd.gz" "$STAGE/boot/initrd.gz"
{
  echo "SERIAL 0 115200"
  echo "DEFAULT check"
  echo "PROMPT 0"
  echo "TIMEOUT 0"
  for label in marker check serve; do
    echo "LABEL $label"
    echo "  LINUX /boot/vmlinuz"
    echo "  INITRD /boot/initrd.gz"
    echo "  APPEND console=ttyS0 quiet loglevel=3 panic=-1 ihb.root=/dev/vda1 ihb.action=$label"
  done
} > "$STAGE/boot/extlinux/extlinux.conf"

rm -f "$OUT"
truncate -s "${SIZE_MB}M" "$OUT"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$OUT"
read -r START SECTORS < <(sfdisk -d "$OUT" | sed -n 's/.*start= *\([0-9]*\), *size= *\([0-9]*\).*/\1 \2/p' | head -1)
OFF=$((START * 512))
BLOCKS=$((SECTORS * 512 / 4096))
# -b 4096 is required: syslinux 6.04 cannot load files from ext4 with 1 KiB blocks (the mke2fs
# default below 512 MiB) and then waits at its boot: prompt forever.
mke2fs -q -F -t ext4 -b 4096 -L ihbboot -E offset=$OFF -d "$STAGE" "$OUT" "$BLOCKS"

# extlinux --install works only on a mounted file system. This kernel may parse no partition
# tables, so the loop device maps the partition itself (-o/--sizelimit), not the whole disk.
LOOP=$(losetup --show -f -o "$OFF" --sizelimit $((BLOCKS * 4096)) "$OUT")
mount -t ext4 "$LOOP" "$MNT"
quiet_extlinux --install "$MNT/boot/extlinux"
quiet_extlinux --once=marker "$MNT/boot/extlinux"  # ADV boot-once entry; ldlinux clears it
umount "$MNT"
losetup -d "$LOOP"
LOOP=""

# The boot sector's bsHiddenSecs (offset 0x1C) must be the partition's first LBA, or ldlinux looks
# for itself in the wrong place. extlinux derives it from the loop offset; make sure it did.
"$PYTHON" - "$OUT" "$OFF" "$START" <<'EOF'
import struct, sys
path, off, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    f.seek(off + 0x1C)
    old = struct.unpack("<I", f.read(4))[0]
    if old != start:
        f.seek(off + 0x1C)
        f.write(struct.pack("<I", start))
        print(f"make_bootable_disk: patched bsHiddenSecs {old} -> {start}", file=sys.stderr)
EOF
# 440 bytes of boot code only: the disk signature and partition table after it stay intact
dd if=/usr/lib/EXTLINUX/mbr.bin of="$OUT" bs=440 count=1 conv=notrunc status=none
echo "make_bootable_disk: $OUT ${SIZE_MB} MiB, ext4 at offset $OFF, first boot: marker, then: check"
