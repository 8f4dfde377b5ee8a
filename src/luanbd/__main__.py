"""The ``luanbd`` command (and ``python -m luanbd``): what must hold before anything else runs.

- Ctrl-C during start-up ends the process as it ends nbdkit's, by the signal and silently,
  not with a KeyboardInterrupt traceback: SIGINT keeps its default action until the server
  installs its own handlers (lifecycle), which is before it creates anything to clean up.
- Standard input and output must be open, as nbdkit insists: a socket or file opened later
  would otherwise land on fd 0 or 1 and receive whatever is printed.  A closed stderr is
  replaced by /dev/null for the same reason.
- The process runs in the "C" locale, as nbdkit and the lua interpreter do.
- Output into a closed pipe (``luanbd --help | head -1``) ends quietly with status 0, as
  nbdkit's does; output that cannot be written (``>/dev/full``) is one error line, status 1.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)

import errno  # noqa: E402  (after the signal: a Ctrl-C from here on is silent)
import locale  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so that Python's flush at exit cannot fail a second time."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


def main() -> int:
    from luanbd import log

    if _closed(2):
        null = os.open(os.devnull, os.O_WRONLY)
        if null != 2:
            os.dup2(null, 2)
            os.close(null)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (lives as long as we do)
    if _closed(0) or _closed(1):
        log.error(f"expecting stdin/stdout to be opened: {os.strerror(errno.EBADF)}")
        return 1

    # Python adopts the environment's LC_CTYPE at start-up; a C program such as nbdkit or
    # the lua interpreter runs in the "C" locale, which is what Lua scripts see there
    # (os.setlocale(), character classes in patterns, number formatting).
    locale.setlocale(locale.LC_ALL, "C")

    from luanbd.cli import main as cli_main

    try:
        status = cli_main()
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT):
            raise
        _silence_stdout()
        log.error(f"standard output: {err.strerror}")
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
