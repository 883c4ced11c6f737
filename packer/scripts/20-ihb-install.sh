#!/bin/bash
# Provisioning step 2/4: the ihb package in its own venv (/opt/ihb/venv), its users.
# Input: $IHB_BUILD_DIR/ihb-src.tar.gz, the project source made by
# packer/make-source-tarball.sh. Wheels come from PyPI. Packages without a wheel
# (pyfuse3) are compiled: if that needs a compiler, one is installed for the build
# and removed again. Env: PIP_CACHE_DIR (build-local.sh keeps compiled wheels there),
# IHB_REQUIRE_CLI=1 to fail when the installed `ihb --help` does not run.
set -euo pipefail
B=${IHB_BUILD_DIR:-/tmp/ihb-build}
VENV=/opt/ihb/venv
BUILD_DEPS=(gcc pkg-config libfuse3-dev python3-dev)
export DEBIAN_FRONTEND=noninteractive

# the service user, and the admin log-in (password set at first boot)
getent group ihb >/dev/null || groupadd --system ihb
getent passwd ihb >/dev/null || useradd --system --gid ihb --home-dir /var/lib/ihb \
    --no-create-home --shell /usr/sbin/nologin --comment "ihb appliance" ihb
id ihbadmin >/dev/null 2>&1 || useradd --create-home --shell /bin/bash --groups sudo \
    --comment "ihb appliance administrator" ihbadmin
passwd -l ihbadmin >/dev/null     # locked until ihb-firstboot sets a one-time password
install -d -m 0750 -o ihb -g ihb /var/lib/ihb

src=$(mktemp -d /tmp/ihb-src.XXXXXX)
tar -xzf "$B/ihb-src.tar.gz" -C "$src"
pip_opts=(--disable-pip-version-check --no-input --progress-bar off)
# a CA bundle handed in by the builder (e.g. for a TLS-inspecting proxy); build time only
[ -f "$B/ca-bundle.crt" ] && export PIP_CERT=$B/ca-bundle.crt
[ -n "${PIP_CACHE_DIR:-}" ] || pip_opts+=(--no-cache-dir)

rm -rf "$VENV"
python3 -m venv "$VENV"
if ! "$VENV/bin/pip" install -q "${pip_opts[@]}" "$src" 2>/tmp/ihb-pip.err; then
    echo "20-ihb-install: first attempt failed: $(grep -E '^(ERROR|error)' /tmp/ihb-pip.err | tail -n 1)"
    echo "20-ihb-install: a package must be compiled; installing ${BUILD_DEPS[*]} for the build"
    added=()
    for p in "${BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || added+=("$p")
    done
    apt-get -o DPkg::Lock::Timeout=600 -q update
    [ ${#added[@]} -eq 0 ] || apt-get -o DPkg::Lock::Timeout=600 -y -q install --no-install-recommends "${added[@]}"
    "$VENV/bin/pip" install "${pip_opts[@]}" "$src"
    if [ ${#added[@]} -gt 0 ]; then
        apt-mark auto "${added[@]}" >/dev/null
        apt-get -o DPkg::Lock::Timeout=600 -y -q purge --autoremove "${added[@]}"
    fi
fi
rm -f /tmp/ihb-pip.err

ln -sf "$VENV/bin/ihb" /usr/local/bin/ihb
"$VENV/bin/pip" freeze --all > /opt/ihb/requirements.lock
version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("interhost-backup"))')
install -d /etc/ihb /usr/share/doc/ihb
[ -f "$src/docs/appliance.md" ] && install -m 0644 "$src/docs/appliance.md" /usr/share/doc/ihb/appliance.md
{
    echo "IHB_VERSION=$version"
    echo "IHB_SOURCE_SHA256=$(sha256sum "$B/ihb-src.tar.gz" | cut -d' ' -f1)"
    echo "IHB_BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "IHB_BUILDER=${IHB_BUILDER:-unknown}"
} > /etc/ihb/build-info
rm -rf "$src"

if "$VENV/bin/ihb" --help >/dev/null 2>&1; then
    echo "20-ihb-install: interhost-backup $version installed, ihb command works"
elif [ "${IHB_REQUIRE_CLI:-0}" = 1 ]; then
    echo "20-ihb-install: ERROR: the installed ihb command does not run" >&2
    "$VENV/bin/ihb" --help || true
    exit 1
else
    echo "20-ihb-install: WARNING: interhost-backup $version installed, but 'ihb --help' fails" \
         "(is appliance.cli written yet?); first boot will retry what needs it"
fi
