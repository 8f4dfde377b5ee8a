#!/usr/bin/env bash
# Install everything luanbd and its tests need on a Debian machine (run as root),
# then build .venv with luanbd installed in it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(nbdkit nbdkit-plugin-lua nbdkit-plugin-python libnbd-bin python3-libnbd
      qemu-utils fio python3-venv python3-pip python3-dev gcc openssl systemd iproute2)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# gcc and python3-dev build the compiled request loop (luanbd/server/_fastpath.c).
# Debian's python3 is the one that has the libnbd bindings (python3-libnbd);
# --system-site-packages lets the venv import them.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
