"""nbdkit's number and size parsing for filter parameters (nbdkit_parse_unsigned,
nbdkit_parse_size): the same one-line message and exit status as nbdkit 1.32 for each
spelling, good or bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from differential import PLUGINS, nbdkit_available, strip_prefix

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

SCRIPT = str(PLUGINS / "ramdisk.lua")


def _run(argv: list[str]) -> tuple[int, list[str]]:
    r = subprocess.run([*argv, "--run", "true"], capture_output=True, text=True, timeout=30,
                       check=False, cwd=Path(SCRIPT).parent)
    return r.returncode, [strip_prefix(line)[0] for line in r.stderr.splitlines()]


@pytest.mark.parametrize(("filter", "key", "value"), [
    *[("delay", "rdelay", v) for v in ("5-", " -5", "99999999999x", "0x", "08", "+3", "",
                                       "4294967296", "0x1", "017")],
    *[("offset", "offset", v) for v in ("1x", "0x10", "9E", "abc", "", "-1", " 5", "1.5M",
                                        "1KB", "99999999999999999999", "+5", "1 M", "5 ",
                                        "1s", "1e")],
])
def test_same_message_as_nbdkit(filter: str, key: str, value: str) -> None:
    args = [f"--filter={filter}"]
    expected = _run(["nbdkit", *args, "lua", SCRIPT, f"{key}={value}"])
    got = _run([sys.executable, "-m", "luanbd", *args, SCRIPT, f"{key}={value}"])
    assert got == expected
