#!/bin/bash
# Build the tiny Linux test guest of the ihb tests from Debian packages only.
#
#   build_guest.sh [CACHE_DIR]        (default /var/cache/ihb-test-guest)
#
# Produces in CACHE_DIR:
#   vmlinuz       the current Debian kernel (linux-image-*-amd64), bzImage: for bootloaders
#   vmlinux       the same kernel uncompressed; QEMU boots it via its PVH note, which skips the xz
#                 decompressor that costs ~3.5 s under TCG
#   initrd.gz     busybox-static + virtio/ext4/ACPI-button modules + qemu-ga and its libraries,
#                 /init = init.sh from this directory
#   make_disk.sh  copy of the data-disk helper, so the cache is usable on its own
#   stamp         package versions + script hashes; a matching stamp makes the next run a no-op
#
# Needs apt-get (root) for the downloads; no mounts, no loop devices. Concurrent runs serialize on
# CACHE_DIR/.lock. PYTHON selects the python3 used for two small helpers (needs lzma).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${1:-/var/cache/ihb-test-guest}
PYTHON=${PYTHON:-python3}
MODULES=(virtio_pci virtio_blk crc32c_generic ext4 virtio_console button evdev)
APT_OPTS=(-o DPkg::Lock::Timeout=600 -q)

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
exec 9>"$CACHE/.lock"
flock -w 900 9 || { echo "build_guest: cannot lock $CACHE/.lock" >&2; exit 1; }
T0=$(date +%s%N)

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "$@" >&2
}

# tools the build itself runs (busybox from the package does the cpio part)
need=()
for c in dpkg-deb:dpkg gzip:gzip ldd:libc-bin flock:util-linux; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
"$PYTHON" -c 'import lzma' 2>/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get "${APT_OPTS[@]}" update >&2
  apt_install "${need[@]}"
  command -v "$PYTHON" >/dev/null && "$PYTHON" -c 'import lzma' 2>/dev/null || PYTHON=/usr/bin/python3
fi

kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
resolve() {  # sets KPKG, PKGS, STAMP from the current package lists (apt-cache is slow: call it twice)
  KPKG=$(kernel_pkg)
  PKGS=("$KPKG" busybox-static qemu-guest-agent)
  STAMP=$(
    [ -z "$KPKG" ] || apt-cache policy "${PKGS[@]}" | awk '/^[^ ]/{pkg=$1} /Candidate:/{print pkg $2}'
    sha256sum "$HERE/build_guest.sh" "$HERE/init.sh" | awk '{print $1}'
  )
}
resolve
if [ -z "$KPKG" ]; then  # no package lists yet (fresh machine)
  apt-get "${APT_OPTS[@]}" update >&2
  resolve
fi
[ -n "$KPKG" ] || { echo "build_guest: apt knows no linux-image-*-amd64" >&2; exit 1; }
if [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$STAMP" ] \
   && [ -s "$CACHE/vmlinuz" ] && [ -s "$CACHE/vmlinux" ] && [ -s "$CACHE/initrd.gz" ]; then
  cp "$HERE/make_disk.sh" "$CACHE/make_disk.sh"
  echo "build_guest: $CACHE is up to date ($KPKG)"
  exit 0
fi

W="$CACHE/.work"
rm -rf "$W"
mkdir -p "$W/dl" "$W/out"
trap 'rm -rf "$W"' EXIT
cd "$W/dl"
download() {
  # "Download is performed unsandboxed as root" is apt's harmless warning for root-owned dirs
  apt-get "${APT_OPTS[@]}" download "${PKGS[@]}" 2>&1 | grep -v -e unsandboxed -e '^Get:' >&2 || true
  for p in "${PKGS[@]}"; do ls "$p"_*.deb >/dev/null 2>&1 || return 1; done
}
if ! download; then  # stale lists point at versions the mirror dropped (e.g. after a kernel update)
  apt-get "${APT_OPTS[@]}" update >&2
  resolve
  download || { echo "build_guest: apt-get download ${PKGS[*]} failed" >&2; exit 1; }
fi
dpkg -x "$KPKG"_*.deb k
dpkg -x busybox-static_*.deb bb
dpkg -x qemu-guest-agent_*.deb qga
BB="$W/dl/bb/bin/busybox"
KV=$(basename "$(find k/lib/modules -mindepth 1 -maxdepth 1 -type d | head -1)")
cp "k/boot/vmlinuz-$KV" "$W/out/vmlinuz"

"$PYTHON" - "$W/out/vmlinuz" "$W/out/vmlinux" <<'EOF'
# bzImage = setup code + compressed payload; Debian 12 uses xz (CONFIG_KERNEL_XZ). The payload ends
# in padding/trailer bytes, which the decompressor leaves in unused_data.
import lzma, sys
blob = open(sys.argv[1], "rb").read()
start = blob.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vmlinuz: no xz payload found")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("vmlinuz: xz payload is not an ELF image")
open(sys.argv[2], "wb").write(elf)
EOF

# The .deb ships no modules.dep (its postinst runs depmod); busybox depmod writes one.
"$BB" depmod -b k "$KV"
R="$W/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,mnt,run,tmp,etc,usr/bin,usr/sbin,var/log,"lib/modules/$KV"}
cp "$BB" "$R/bin/busybox"
cp "$HERE/init.sh" "$R/init"
chmod 755 "$R/init"
"$PYTHON" - "k/lib/modules/$KV" "$R/lib/modules/$KV" "${MODULES[@]}" <<'EOF'
# Copy only the dependency closure of the wanted modules, with a modules.dep trimmed to match.
import os, shutil, sys
src, dst, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps = {}
with open(os.path.join(src, "modules.dep")) as f:
    for line in f:
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
def name(path):
    return os.path.basename(path).split(".ko")[0].replace("-", "_")
by_name = {name(m): m for m in deps}
missing = [w for w in wanted if w not in by_name]
if missing:
    sys.exit(f"modules not in this kernel: {missing}")
todo, seen = [by_name[w] for w in wanted], {}
while todo:
    mod = todo.pop()
    if mod not in seen:
        seen[mod] = deps[mod]
        todo.extend(deps[mod])
with open(os.path.join(dst, "modules.dep"), "w") as out:
    for mod, mdeps in seen.items():
        os.makedirs(os.path.join(dst, os.path.dirname(mod)), exist_ok=True)
        shutil.copy(os.path.join(src, mod), os.path.join(dst, mod))
        out.write(f"{mod}: {' '.join(mdeps)}\n")
print("build_guest: modules:", " ".join(sorted(name(m) for m in seen)), file=sys.stderr)
EOF

# qemu-ga is dynamically linked. The host is the same Debian release, so its libraries fit; copy
# the loader and every library ldd names, installing qemu-ga's library packages if any is missing.
QGA="$W/dl/qga/usr/sbin/qemu-ga"
if ldd "$QGA" | grep -q 'not found'; then
  mapfile -t libpkgs < <(apt-cache depends qemu-guest-agent | awk '/Depends: lib/{print $2}')
  apt_install "${libpkgs[@]}"
fi
if ldd "$QGA" | grep -q 'not found'; then
  echo "build_guest: libraries of qemu-ga missing on this host:" >&2
  ldd "$QGA" | grep 'not found' >&2
  exit 1
fi
cp "$QGA" "$R/usr/sbin/qemu-ga"
for lib in $(ldd "$QGA" | grep -o '/[^ ]*'); do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done

(cd "$R" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) | gzip -n -9 > "$W/out/initrd.gz"

for f in vmlinuz vmlinux initrd.gz; do mv -f "$W/out/$f" "$CACHE/$f"; done
cp "$HERE/make_disk.sh" "$CACHE/make_disk.sh"
echo "$STAMP" > "$CACHE/stamp.new" && mv -f "$CACHE/stamp.new" "$CACHE/stamp"
ms=$(( ($(date +%s%N) - T0) / 1000000 ))
echo "build_guest: $KPKG ($KV) vmlinuz $(du -h "$CACHE/vmlinuz" | cut -f1)," \
     "vmlinux $(du -h "$CACHE/vmlinux" | cut -f1), initrd.gz $(du -h "$CACHE/initrd.gz" | cut -f1)" \
     "in $((ms / 1000)).$(( (ms % 1000) / 100 ))s -> $CACHE"
