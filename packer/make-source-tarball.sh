#!/bin/bash
# make-source-tarball.sh SRC_DIR OUT.tar.gz
# The project source as the image builders install it (pip install of the directory):
# everything but VCS data, virtualenvs, caches, build outputs, and what the installed
# package does not need (tests/, packer/, .ci/, bench/: a change there does not make
# a new image stale). The archive is
# reproducible (sorted, fixed owner and mtime, gzip -n), so its sha256 identifies the
# source: build-local.sh uses it to tell whether the image is up to date.
set -euo pipefail
src=$(cd "${1:?usage: $0 SRC_DIR OUT.tar.gz}" && pwd)
out=${2:?usage: $0 SRC_DIR OUT.tar.gz}
tmp=$out.tmp.$$
tar -C "$src" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    --mode='u+rw,go+r,go-w' --format=gnu \
    --exclude-vcs --exclude=./.venv --exclude='./.venv*' --exclude='./venv' \
    --exclude='__pycache__' --exclude='*.pyc' --exclude='.pytest_cache' --exclude='.ruff_cache' \
    --exclude='.mypy_cache' --exclude='.hypothesis' --exclude='*.egg-info' --exclude='./build' \
    --exclude='./dist' --exclude='./tests' --exclude='./packer' --exclude='./.ci' --exclude='./bench' \
    --exclude='./packer_cache' --exclude='*.qcow2' --exclude='*.raw' --exclude='*.img' \
    -cf - . | gzip -n -6 > "$tmp"
mv "$tmp" "$out"
