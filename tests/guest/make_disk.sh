#!/bin/bash
# Make a raw data disk for the test guest: GPT label, one ext4 partition (4 KiB blocks) from 1 MiB
# to the end, filled from DIR_TO_COPY. No mount and no loop device: mke2fs -d writes the file
# system into a scratch file, which dd then copies to the partition offset.
#
#   make_disk.sh OUT SIZE_MB [DIR_TO_COPY]
#
# The guest sees the partition as /dev/vda1 (first virtio disk). From the host, e2fsprogs reads it
# in place: debugfs -R 'cat /file' 'OUT?offset=1048576'. Prints the partition offset and size.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "usage: $0 OUT SIZE_MB [DIR_TO_COPY]" >&2; exit 2; fi
OUT=$1
SIZE_MB=$2
SRC=${3:-}
LABEL=${LABEL:-ihbdata}
[ "$SIZE_MB" -ge 8 ] || { echo "make_disk: SIZE_MB must be >= 8" >&2; exit 2; }
[ -z "$SRC" ] || [ -d "$SRC" ] || { echo "make_disk: $SRC is not a directory" >&2; exit 2; }

need=()
for c in sfdisk:fdisk mke2fs:e2fsprogs; do command -v "${c%%:*}" >/dev/null || need+=("${c#*:}"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 -q update >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends "${need[@]}" >&2
fi

PART="$OUT.part.tmp"
cleanup() { rm -f "$PART"; }
trap cleanup EXIT
rm -f "$OUT" "$PART"
truncate -s "${SIZE_MB}M" "$OUT"
# 0FC63DAF-... is the "Linux filesystem" partition type GUID
printf 'label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D477DE47DE4, name=%s\n' "$LABEL" | sfdisk -q "$OUT"
read -r START SECTORS < <(sfdisk -d "$OUT" | sed -n 's/.*start= *\([0-9]*\), *size= *\([0-9]*\).*/\1 \2/p' | head -1)
[ "$START" = 2048 ] || { echo "make_disk: partition starts at sector $START, not 2048" >&2; exit 1; }
# -b 4096 explicitly: below 512 MiB mke2fs would pick 1 KiB blocks
BLOCKS=$((SECTORS * 512 / 4096))
EMPTY=""
if [ -z "$SRC" ]; then EMPTY=$(mktemp -d); SRC=$EMPTY; fi
mke2fs -q -F -t ext4 -b 4096 -L "$LABEL" -d "$SRC" "$PART" "$BLOCKS" >/dev/null  # "Creating regular file"
[ -z "$EMPTY" ] || rmdir "$EMPTY"
dd if="$PART" of="$OUT" bs=1M seek=1 conv=notrunc,sparse status=none
echo "make_disk: $OUT ${SIZE_MB} MiB, ext4 partition at offset $((START * 512)), $((BLOCKS * 4096)) bytes"
