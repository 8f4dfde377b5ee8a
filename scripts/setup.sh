#!/usr/bin/env bash
# Install everything luanbd and its tests need on a Debian machine (run as root),
# then build .venv with luanbd installed in it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# pandoc: the man pages' up-to-date check (scripts/build_man.py); man-db: the real man
# the tests run; prometheus: the real server tests/integration/test_prometheus.py scrapes --metrics with.
debs=(nbdkit nbdkit-plugin-lua nbdkit-plugin-python libnbd-bin python3-libnbd
      qemu-utils fio python3-venv python3-pip python3-dev gcc make openssl systemd iproute2
      lua5.1 lua5.2 lua5.3 lua5.4 luajit lua-cjson lua-posix pandoc man-db
      prometheus)
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
# lupa built from source with each Lua configured for Linux as Debian's (io.popen, os.execute's
# exit codes, Debian's module paths): scripts/build_lupa.py says why.  The wheel is kept in
# .cache/ so that a new .venv does not build it again.
lupa_wheel=$(.venv/bin/python scripts/build_lupa.py .cache/lupa)
if ! .venv/bin/python -c 'import lupa, sys; sys.exit(lupa.__version__ != sys.argv[1])' \
        "$(basename "$lupa_wheel" | cut -d- -f2)" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$lupa_wheel"
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# The editable install leaves out the man pages and the bash completion (data-files):
# link them into .venv, where `man luanbd` looks with .venv/bin on PATH.
.venv/bin/python scripts/link_data_files.py .venv
