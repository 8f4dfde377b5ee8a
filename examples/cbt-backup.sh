#!/bin/sh
# A full and an incremental backup of a disk served with --filter=cbt, and a check that the
# backup equals the disk.  Run from the repository: sh examples/cbt-backup.sh [DIR]
set -eu
dir=${1:-$(mktemp -d)}
mkdir -p "$dir"
sock=$dir/cbt.sock uri="nbd+unix:///?socket=$dir/cbt.sock"
truncate -s 64M "$dir/disk.img"
luanbd -U "$sock" -P "$dir/cbt.pid" --filter=cbt examples/file.lua file="$dir/disk.img" \
       cbt-file="$dir/disk.cbt"                        # daemonises once it listens
kill -USR1 "$(cat "$dir/cbt.pid")"                     # a new generation: nothing changed
nbdcopy "$uri" "$dir/backup.img"                       # the full backup
nbdsh -u "$uri" -c 'h.pwrite(b"changed!" * 8192, 10 << 20)' \
      -c 'h.pwrite(b"more" * 100, 40 << 20)'           # the disk changes
nbdinfo --map=qemu:dirty-bitmap:cbt "$uri"             # 2 changed blocks of 64K
/usr/bin/python3 examples/incremental-backup.py "$uri" "$dir/backup.img"  # copies 131072
cmp "$dir/disk.img" "$dir/backup.img" && echo "backup equals the disk"
kill "$(cat "$dir/cbt.pid")"
