#!/bin/bash
# build-local.sh: build the ihb appliance image from Debian packages alone, for machines
# where no cloud base image can be downloaded. It produces the same appliance as
# appliance.pkr.hcl: the provisioning scripts in packer/scripts/ run unchanged, here in a
# chroot instead of the Packer build VM.
#
#   1. base   debootstrap bookworm (minbase + systemd, kernel, sshd, the appliance's
#             packages) into a directory, cached as a tarball under the cache dir
#   2. os     what a cloud image would bring: hostname, apt sources, network (networkd,
#             DHCP), root fstab entry, boot loader configuration
#   3. ihb    packer/scripts/[0-9][0-9]-*.sh in a chroot (no service starts: policy-rc.d
#             refuses, and systemctl enable only makes links)
#   4. disk   MBR disk, one ext4 partition filled with mke2fs -d, extlinux boot loader,
#             syslinux MBR code; converted to qcow2. Boots under QEMU without -kernel.
#
# Output (OUTPUT_DIR): ihb-appliance.qcow2 (system disk), ihb-data.qcow2 (blank data disk,
# formatted by the appliance at first boot), build-info.txt.
# --cloud-base makes instead a stand-in for the Debian cloud image that appliance.pkr.hcl
# starts from (same base, plus cloud-init, without the ihb provisioning), so that the Packer
# template can be run offline: packer build -var base_image=OUT/debian-cloud-base.qcow2 ... When nothing that goes into
# the image changed since the last build (source tree, packer/ scripts and files, this
# script, options), the build is skipped; --force rebuilds.
#
# Needs root, loop devices, and on Debian 12:
#   apt-get install debootstrap e2fsprogs fdisk mount extlinux syslinux-common qemu-utils
# (--install-deps does that). Network: the Debian mirror and PyPI.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=${IHB_SRC_DIR:-$(dirname "$HERE")}
CACHE=${IHB_BUILD_CACHE:-/var/cache/ihb-build}
OUT=${IHB_OUTPUT_DIR:-}
SUITE=${IHB_SUITE:-bookworm}
MIRROR=${IHB_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${IHB_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DISK_SIZE=${IHB_DISK_SIZE:-4G}
DATA_DISK_SIZE=${IHB_DATA_DISK_SIZE:-20G}
HOSTNAME_=${IHB_HOSTNAME:-ihb-appliance}
UPGRADE=${IHB_APT_UPGRADE:-1}
CA_BUNDLE=${IHB_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
FORCE=0 COMPRESS=0 INSTALL_DEPS=0 CLOUD_BASE=0
# what a cloud base image has and a minbase debootstrap lacks
BASE_PACKAGES=(systemd-sysv udev dbus kmod linux-image-amd64 initramfs-tools
               systemd-resolved systemd-timesyncd iputils-ping)
HOST_TOOLS=(debootstrap:debootstrap mke2fs:e2fsprogs sfdisk:fdisk losetup:mount mount:mount
            extlinux:extlinux qemu-img:qemu-utils chroot:coreutils flock:util-linux gzip:gzip)

usage() {
    cat <<EOF
usage: $0 [options]
  --output DIR         where the images go (default: CACHE/output)
  --cache DIR          debootstrap tarball, pip wheels, work files (default: $CACHE)
  --src DIR            project source tree to install (default: $SRC)
  --disk-size SIZE     system disk (default: $DISK_SIZE)
  --data-disk-size SIZE  blank data disk made beside it (default: $DATA_DISK_SIZE)
  --mirror URL         Debian mirror (default: $MIRROR)
  --security-mirror URL  (default: $SECURITY_MIRROR)
  --no-upgrade         do not install pending Debian updates during provisioning
  --compress           compressed qcow2 (smaller, slower to build)
  --force              rebuild even if the image is up to date
  --install-deps       apt-get install the host tools that are missing
  --cloud-base         build a cloud-image stand-in (cloud-init, no ihb) for appliance.pkr.hcl
EOF
}

ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --output) OUT=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --src) SRC=$2; shift 2 ;;
        --disk-size) DISK_SIZE=$2; shift 2 ;;
        --data-disk-size) DATA_DISK_SIZE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --security-mirror) SECURITY_MIRROR=$2; shift 2 ;;
        --no-upgrade) UPGRADE=0; shift ;;
        --compress) COMPRESS=1; shift ;;
        --force) FORCE=1; shift ;;
        --install-deps) INSTALL_DEPS=1; shift ;;
        --cloud-base) CLOUD_BASE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$CLOUD_BASE" = 1 ]; then
    OUT=${OUT:-$CACHE/output-cloud-base}; IMAGE_NAME=debian-cloud-base.qcow2
else
    OUT=${OUT:-$CACHE/output}; IMAGE_NAME=ihb-appliance.qcow2
fi
SRC=$(cd "$SRC" && pwd)

T_START=${IHB_BUILD_T_START:-$(date +%s)}
export IHB_BUILD_T_START=$T_START
log() { echo "[build-local +$(( $(date +%s) - T_START ))s] $*"; }
die() { echo "build-local: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, loop mount for extlinux)"
# Work in a private mount namespace: the chroot's bind mounts (/dev, /proc, ...) can never
# propagate to the host, and they all go away with this process whatever happens.
if [ -z "${IHB_BUILD_MOUNT_NS:-}" ]; then
    IHB_BUILD_MOUNT_NS=1 exec unshare --mount --propagation private "$0" "${ARGS[@]}"
fi

# --- host tools -------------------------------------------------------------------------
missing=()
for t in "${HOST_TOOLS[@]}"; do command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}"); done
[ -f /usr/lib/EXTLINUX/mbr.bin ] || missing+=(syslinux-common)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$INSTALL_DEPS" = 1 ]; then
        log "installing host tools: ${missing[*]}"
        apt-get -o DPkg::Lock::Timeout=600 -q update
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q \
            install --no-install-recommends "${missing[@]}"
    else
        die "missing host tools; run: apt-get install ${missing[*]}  (or pass --install-deps)"
    fi
fi

mkdir -p "$CACHE" "$OUT"
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE"

WORK=$CACHE/work
ROOT=$WORK/rootfs
MOUNTS=()

unmount_all() {
    local i
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
        mountpoint -q "${MOUNTS[$i]}" && { umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}"; }
    done
    MOUNTS=()
}
LOOP=""
cleanup() {
    unmount_all
    if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# never follow a bind mount (/dev!) when deleting a work tree
safe_rm() {
    local d
    for d in "$@"; do
        [ -e "$d" ] || continue
        if findmnt -rn -o TARGET | grep -q "^$d\(/\|$\)"; then die "refusing to delete $d: something is mounted below it"; fi
        rm -rf --one-file-system "$d"
    done
}

# --- inputs and the up-to-date check ----------------------------------------------------
mkdir -p "$WORK"
"$HERE/make-source-tarball.sh" "$SRC" "$WORK/ihb-src.tar.gz"
mapfile -t APPLIANCE_PACKAGES < <(bash "$HERE/scripts/10-packages.sh" --list | tr ' ' '\n')
BASE_KEY=$(printf '%s\n' "v2" "$SUITE" "$SECURITY_MIRROR" "$MIRROR" "${BASE_PACKAGES[@]}" "${APPLIANCE_PACKAGES[@]}" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-$SUITE-$BASE_KEY.tar
INPUT_HASH=$(
    {
        echo "base $BASE_KEY"
        echo "options $DISK_SIZE $DATA_DISK_SIZE $SECURITY_MIRROR $UPGRADE $COMPRESS $HOSTNAME_ $CLOUD_BASE"
        echo "source $(sha256sum < "$WORK/ihb-src.tar.gz" | cut -d' ' -f1)"
        (cd "$HERE" && find build-local.sh make-source-tarball.sh scripts files -type f -print0 \
            | sort -z | xargs -0 sha256sum)
        (cd "$HERE" && find files -printf '%p %m\n' | sort)
    } | sha256sum | cut -d' ' -f1
)
if [ "$FORCE" = 0 ] && [ -f "$OUT/build-info.txt" ] && [ -f "$OUT/$IMAGE_NAME" ] \
    && grep -qx "INPUT_HASH=$INPUT_HASH" "$OUT/build-info.txt"; then
    log "image is up to date ($OUT/$IMAGE_NAME, input $INPUT_HASH); --force rebuilds"
    exit 0
fi

write_sources() {  # deb822 sources: the release, its updates and security updates
    cat > "$1" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# --- chroot helpers ---------------------------------------------------------------------
chroot_mount() { mount "$@"; MOUNTS+=("${!#}"); }
RESOLV_LINK=""
enter_chroot() {  # enter_chroot DIR: kernel file systems, the host's DNS, no service starts
    local r=$1
    chroot_mount -t proc proc "$r/proc"
    chroot_mount -t sysfs sysfs "$r/sys"
    chroot_mount --bind /dev "$r/dev"
    chroot_mount -t devpts devpts -o newinstance,ptmxmode=0666 "$r/dev/pts"
    chroot_mount -t tmpfs tmpfs "$r/run"
    RESOLV_LINK=$(readlink "$r/etc/resolv.conf" || true)
    rm -f "$r/etc/resolv.conf"
    cp -L /etc/resolv.conf "$r/etc/resolv.conf"
    printf '#!/bin/sh\n# build-local.sh: no service starts in the chroot\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
    chmod 0755 "$r/usr/sbin/policy-rc.d"
}
leave_chroot() {
    local r=$1
    unmount_all
    rm -f "$r/usr/sbin/policy-rc.d" "$r/etc/resolv.conf"
    if [ -n "$RESOLV_LINK" ]; then ln -s "$RESOLV_LINK" "$r/etc/resolv.conf"; else : > "$r/etc/resolv.conf"; fi
}
in_chroot() {  # in_chroot DIR [VAR=value...] CMD...: clean environment, nothing of the host's
    local r=$1; shift
    chroot "$r" /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        TERM=dumb DEBIAN_FRONTEND=noninteractive "$@"
}

# --- 1. base: debootstrap + pending Debian updates, cached ------------------------------
T0=$(date +%s)
if [ ! -f "$BASE_TAR" ]; then
    log "debootstrap $SUITE from $MIRROR (cached afterwards as $(basename "$BASE_TAR"))"
    BT=$CACHE/base.tmp
    safe_rm "$BT"
    include=$(IFS=,; echo "${BASE_PACKAGES[*]},${APPLIANCE_PACKAGES[*]}")
    debootstrap --variant=minbase --include="$include" "$SUITE" "$BT" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    rm -f "$BT/etc/apt/sources.list"
    write_sources "$BT/etc/apt/sources.list.d/debian.sources"
    # kernel upgrades move /vmlinuz and /initrd.img, so the boot loader needs no update
    printf 'do_symlinks = yes\nlink_in_boot = no\n' > "$BT/etc/kernel-img.conf"
    log "base: installing the updates from $SUITE-updates and $SUITE-security"
    enter_chroot "$BT"
    apt_opts=(-o DPkg::Lock::Timeout=600 -o APT::Install-Recommends=false -y -q)
    in_chroot "$BT" apt-get "${apt_opts[@]}" update >> "$CACHE/debootstrap.log" 2>&1
    in_chroot "$BT" apt-get "${apt_opts[@]}" dist-upgrade >> "$CACHE/debootstrap.log" 2>&1 \
        || die "apt-get dist-upgrade in the base failed (log: $CACHE/debootstrap.log)"
    # one kernel only: apt keeps older ones, and the host's uname means nothing here
    newest=$(readlink "$BT/vmlinuz" | sed 's|.*/vmlinuz-||')
    old=$(in_chroot "$BT" dpkg-query -W -f='${Package}\n' 'linux-image-[0-9]*' | grep -vx "linux-image-$newest" || true)
    if [ -n "$old" ]; then
        in_chroot "$BT" apt-get "${apt_opts[@]}" purge $old >> "$CACHE/debootstrap.log" 2>&1
    fi
    in_chroot "$BT" apt-get "${apt_opts[@]}" clean
    leave_chroot "$BT"
    rm -rf "$BT"/var/lib/apt/lists/*
    tar -C "$BT" --numeric-owner --xattrs --xattrs-include='*' -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    safe_rm "$BT"
    # older bases are of no further use
    find "$CACHE" -maxdepth 1 -name "base-*.tar" ! -name "$(basename "$BASE_TAR")" -delete
else
    log "base: cached $(basename "$BASE_TAR")"
fi
T_BASE=$(( $(date +%s) - T0 ))

# --- 2. os: what a cloud image would bring ----------------------------------------------
T0=$(date +%s)
safe_rm "$ROOT"
mkdir -p "$ROOT"
tar -C "$ROOT" --numeric-owner --xattrs --xattrs-include='*' -xpf "$BASE_TAR"
ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)
KVER=$(readlink "$ROOT/vmlinuz" | sed 's|.*/vmlinuz-||')
[ -n "$KVER" ] && [ -f "$ROOT/boot/vmlinuz-$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] \
    || die "no /vmlinuz + /initrd.img in the base (kernel-img.conf do_symlinks?)"

echo "$HOSTNAME_" > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$HOSTNAME_" > "$ROOT/etc/hosts"
cat > "$ROOT/etc/fstab" <<EOF
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$ROOT_UUID  /  ext4  errors=remount-ro  0  1
EOF
mkdir -p "$ROOT/etc/systemd/network" "$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat > "$ROOT/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
cat > "$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d/10-ihb.conf" <<'EOF'
# one configured link is enough, and never hold the boot for long
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
mkdir -p "$ROOT/boot/extlinux"
cat > "$ROOT/boot/extlinux/extlinux.conf" <<EOF
# extlinux (syslinux $(dpkg-query -W -f='${Version}' extlinux 2>/dev/null)), written by packer/build-local.sh
# /vmlinuz and /initrd.img are the kernel package's symlinks: a kernel upgrade needs no change
# here. Hold Shift at boot for the prompt, then type "previous" for the kernel before.
SERIAL 0 115200
DEFAULT ihb
PROMPT 0
TIMEOUT 30
LABEL ihb
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=UUID=$ROOT_UUID ro console=tty0 console=ttyS0,115200n8 modprobe.blacklist=floppy
LABEL previous
  LINUX /vmlinuz.old
  INITRD /initrd.img.old
  APPEND root=UUID=$ROOT_UUID ro console=tty0 console=ttyS0,115200n8 modprobe.blacklist=floppy
EOF
chroot "$ROOT" systemctl enable systemd-networkd.service systemd-networkd-wait-online.service \
    systemd-resolved.service systemd-timesyncd.service >/dev/null 2>&1
T_OS=$(( $(date +%s) - T0 ))

# --- 3. ihb: the shared provisioning scripts, in a chroot -------------------------------
T0=$(date +%s)
mkdir -p "$CACHE/pip" "$ROOT/var/cache/ihb-pip"
enter_chroot "$ROOT"
chroot_mount --bind "$CACHE/pip" "$ROOT/var/cache/ihb-pip"

if [ "$CLOUD_BASE" = 1 ]; then
    log "cloud base: cloud-init instead of the ihb provisioning"
    in_chroot "$ROOT" apt-get -o DPkg::Lock::Timeout=600 -o APT::Install-Recommends=false -y -q update
    in_chroot "$ROOT" apt-get -o DPkg::Lock::Timeout=600 -o APT::Install-Recommends=false -y -q \
        install cloud-init cloud-guest-utils
    in_chroot "$ROOT" apt-get -y -q clean
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/etc/ssh/ssh_host_*
    : > "$ROOT/etc/machine-id"
else
    B=/tmp/ihb-build
    mkdir -p "$ROOT$B"
    cp -R "$HERE/scripts" "$HERE/files" "$ROOT$B/"
    cp "$WORK/ihb-src.tar.gz" "$ROOT$B/"
    # pip trusts what the host trusts (e.g. a TLS-inspecting proxy's CA); build time only
    if [ -f "$CA_BUNDLE" ]; then cp "$CA_BUNDLE" "$ROOT$B/ca-bundle.crt"; fi
    for s in "$HERE"/scripts/[0-9][0-9]-*.sh; do
        name=$(basename "$s")
        log "provision: $name"
        in_chroot "$ROOT" IHB_BUILD_DIR=$B PIP_CACHE_DIR=/var/cache/ihb-pip IHB_APT_UPGRADE="$UPGRADE" \
            IHB_BUILDER=build-local.sh /bin/bash "$B/scripts/$name" \
            || die "provisioning script $name failed"
    done
fi
leave_chroot "$ROOT"
rmdir "$ROOT/var/cache/ihb-pip"

# a kernel upgrade in the chroot moves the symlinks; the boot loader follows them
KVER=$(readlink "$ROOT/vmlinuz" | sed 's|.*/vmlinuz-||')
for f in "vmlinuz" "initrd.img"; do [ -e "$ROOT/$f" ] || die "/$f is missing after provisioning"; done
[ "$CLOUD_BASE" = 1 ] || for u in ihb-server.service ihb-firstboot.service ihb-datadisk.service ihb-mount.service nftables.service; do
    find "$ROOT/etc/systemd/system" -name "$u" -type l | grep -q . || die "$u is not enabled"
done
[ "$CLOUD_BASE" = 1 ] || [ -x "$ROOT/opt/ihb/venv/bin/ihb" ] || die "/opt/ihb/venv/bin/ihb is missing"
T_PROVISION=$(( $(date +%s) - T0 ))

# --- 4. disk: MBR + ext4 (mke2fs -d) + extlinux, then qcow2 -----------------------------
T0=$(date +%s)
RAW=$WORK/disk.raw
rm -f "$RAW"
truncate -s "$DISK_SIZE" "$RAW"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$RAW"
START=2048
SECTORS=$(( $(stat -c %s "$RAW") / 512 - START ))
sfdisk -d "$RAW" | grep -q "start= *$START, size= *$SECTORS," || die "unexpected partition layout: $(sfdisk -d "$RAW")"
OFFSET=$(( START * 512 ))
used=$(du -sxm "$ROOT" | cut -f1)
[ $(( SECTORS / 2048 )) -gt $(( used * 13 / 10 + 256 )) ] || die "--disk-size $DISK_SIZE is too small for ${used} MiB of root file system"
# 4 KiB blocks: syslinux 6.04 cannot load files from 1 KiB-block ext4
mke2fs -q -t ext4 -b 4096 -L ihb-root -U "$ROOT_UUID" -E offset=$OFFSET -d "$ROOT" \
    "$RAW" $(( SECTORS / 8 )) || die "mke2fs failed"
# extlinux --install needs the file system mounted; a loop device on the partition's
# byte range works even on kernels without partition-table support
M=$WORK/mnt
mkdir -p "$M"
LOOP=$(losetup --show -f -o "$OFFSET" --sizelimit $(( SECTORS * 512 )) "$RAW")
mount -t ext4 "$LOOP" "$M"; MOUNTS+=("$M")
extlinux --install "$M/boot/extlinux" 2>&1 | grep -v -e '^$' -e 'device geometry' || true
[ -f "$M/boot/extlinux/ldlinux.sys" ] || die "extlinux --install did not write ldlinux.sys"
unmount_all
losetup -d "$LOOP"; LOOP=""
# the boot sector's hidden-sectors field must be the partition start (extlinux takes it
# from the loop device, which it cannot always know)
hs=$(od -An -tu4 -j $(( OFFSET + 28 )) -N4 "$RAW" | tr -d ' ')
if [ "$hs" != "$START" ]; then
    log "patching the boot sector's hidden sectors $hs -> $START"
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $(( START & 255 )) $(( START >> 8 & 255 )) $(( START >> 16 & 255 )) $(( START >> 24 & 255 )))" \
        | dd of="$RAW" bs=1 seek=$(( OFFSET + 28 )) conv=notrunc status=none
fi
# syslinux MBR code: 440 bytes, so the disk signature and the partition table stay
dd if=/usr/lib/EXTLINUX/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none

mkdir -p "$OUT/.tmp"
qopts=(-O qcow2)
[ "$COMPRESS" = 1 ] && qopts+=(-c)
qemu-img convert "${qopts[@]}" "$RAW" "$OUT/.tmp/$IMAGE_NAME"
qemu-img create -q -f qcow2 "$OUT/.tmp/ihb-data.qcow2" "$DATA_DISK_SIZE"
rm -f "$RAW"
T_DISK=$(( $(date +%s) - T0 ))

IHB_VERSION=$(sed -n 's/^IHB_VERSION=//p' "$ROOT/etc/ihb/build-info" 2>/dev/null || true)
{
    echo "INPUT_HASH=$INPUT_HASH"
    echo "IHB_VERSION=$IHB_VERSION"
    echo "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "SUITE=$SUITE"
    echo "KERNEL=$KVER"
    echo "ROOT_UUID=$ROOT_UUID"
    echo "DISK_SIZE=$DISK_SIZE"
    echo "DATA_DISK_SIZE=$DATA_DISK_SIZE"
    echo "ROOTFS_MIB=$used"
    echo "SECONDS_BASE=$T_BASE"
    echo "SECONDS_OS=$T_OS"
    echo "SECONDS_PROVISION=$T_PROVISION"
    echo "SECONDS_DISK=$T_DISK"
    echo "SECONDS_TOTAL=$(( $(date +%s) - T_START ))"
} > "$OUT/.tmp/build-info.txt"
mv -f "$OUT/.tmp/$IMAGE_NAME" "$OUT/.tmp/ihb-data.qcow2" "$OUT/.tmp/build-info.txt" "$OUT/"
rmdir "$OUT/.tmp"
safe_rm "$ROOT"
log "done: $OUT/$IMAGE_NAME ($(du -h "$OUT/$IMAGE_NAME" | cut -f1), rootfs ${used} MiB)," \
    "base ${T_BASE}s, os ${T_OS}s, provision ${T_PROVISION}s, disk ${T_DISK}s"
