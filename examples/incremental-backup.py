#!/usr/bin/python3
"""Incremental backup from an NBD server with a dirty bitmap (luanbd --filter=cbt).

    incremental-backup.py URI BACKUP [CONTEXT]

Copies into BACKUP (a full copy taken earlier) only the blocks that CONTEXT
(default qemu:dirty-bitmap:cbt) reports as changed, and prints how many bytes it copied.
Needs libnbd's Python module (Debian: python3-libnbd).
"""

import sys

import nbd

CHUNK = 32 << 20  # block status and reads of at most this much at a time


def main() -> None:
    uri, backup = sys.argv[1], sys.argv[2]
    context = sys.argv[3] if len(sys.argv) > 3 else "qemu:dirty-bitmap:cbt"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        sys.exit(f"incremental-backup: the server has no {context}")
    size, offset, copied = h.get_size(), 0, 0
    with open(backup, "r+b") as out:
        while offset < size:
            dirty: list[tuple[int, int]] = []

            def extents(meta: str, start: int, entries: list[int], err: int) -> int:
                pos = start
                for length, flags in zip(entries[0::2], entries[1::2]):
                    if flags & 1:
                        dirty.append((pos, length))
                    pos += length
                found.append(pos)
                return 0

            found: list[int] = []
            h.block_status(min(CHUNK, size - offset), offset, extents)
            end = min(found[0], size)
            for start, length in dirty:
                length = min(length, end - start)
                for at in range(start, start + length, CHUNK):
                    n = min(CHUNK, start + length - at)
                    out.seek(at)
                    out.write(h.pread(n, at))
                    copied += n
            offset = end
    h.shutdown()
    print(f"copied {copied} bytes")


main()
