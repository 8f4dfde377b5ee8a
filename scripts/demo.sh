#!/usr/bin/env bash
# Set up, then serve examples/ramdisk.lua and look at it with nbdinfo (captive mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:/usr/bin:$PATH"
exec luanbd -U - --run 'nbdinfo "$uri"' examples/ramdisk.lua size=64M
