"""nbdkit-ext2-filter(1), refused: nbdkit's filter reads and writes a file inside an
ext2/3/4 file system with libext2fs (e2fsprogs), for which there is no maintained Python
library; writing an ext4 implementation (extents, journal replay, htree directories) here
would be a file system driver of its own, untested against the real one.  ``--filter=ext2``
therefore stops start-up with one line saying so (exit 1)."""

from __future__ import annotations

from luanbd.backend.chain import Backend
from luanbd.backend.interface import StartupError

REASON = ("--filter=ext2: not supported by luanbd: nbdkit's ext2 filter needs libext2fs "
          "(e2fsprogs), which has no maintained Python library (use nbdkit, or export the "
          "file from a mounted copy of the file system)")


class Filter(Backend):
    name = "ext2"

    def __init__(self) -> None:
        raise StartupError(REASON)
