#!/usr/bin/env python3
"""Build lupa from its source release with every bundled Lua configured as Debian builds it.

lupa's wheels compile Lua for no particular OS (Lua's ``make generic``), so io.popen fails
with "'popen' not supported", os.execute returns the raw wait status and os.tmpname uses
tmpnam.  nbdkit's Lua plugin links Debian's Lua, built with ``LUA_USE_LINUX`` and the
compatibility switches of Debian's packages, and with Debian's module directories in
package.path/cpath.  This script builds the same sources that way, so every standard
function is Lua's own: nothing is reimplemented.

Usage: build_lupa.py WHEEL_DIR   (prints the path of the wheel; reuses one already built)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

LUPA_VERSION = "2.8"
SDIST_URL = ("https://files.pythonhosted.org/packages/c3/a6/"
             "0f869fbb07c393f15473b1eefefb7b5bec162fb7481803d040ed4dc46002/lupa-2.8.tar.gz")
SDIST_SHA256 = "d8022641b9ec8ecf2c5ecbe9f47e5a70e0b87c4b5ae921b92cb02a638e0acd08"
#: The local version label says which build recipe made the wheel; bump it when this file
#: changes what is built.
LOCAL = "linux1"

#: What Debian's packages (and Lua's own ``make linux``) define for each bundled version.
#: 5.5 has no Debian package yet: it gets upstream's ``make linux`` switches only.
COMPAT = {
    "lua51": [],
    "lua52": ["LUA_COMPAT_ALL"],
    "lua53": ["LUA_COMPAT_5_2"],
    "lua54": ["LUA_COMPAT_5_3"],
    "lua55": [],
}


def multiarch() -> str:
    out = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "x86_64-linux-gnu"


def debian_paths(vdir: str, arch: str) -> tuple[str, str]:
    """package.path and package.cpath as Debian's lua5.x interpreters print them."""
    local_l = f"/usr/local/share/lua/{vdir}/"
    local_c = f"/usr/local/lib/lua/{vdir}/"
    sys_l = f"/usr/share/lua/{vdir}/"
    lpath = [
        f"{local_l}?.lua", f"{local_l}?/init.lua",
        f"{local_c}?.lua", f"{local_c}?/init.lua",
        f"{sys_l}?.lua", f"{sys_l}?/init.lua",
    ]
    cpath = [
        f"{local_c}?.so", f"/usr/lib/{arch}/lua/{vdir}/?.so",
        f"/usr/lib/lua/{vdir}/?.so", f"{local_c}loadall.so",
    ]
    if vdir == "5.1":
        return ";".join(["./?.lua", *lpath]), ";".join(["./?.so", *cpath])
    if vdir == "5.2":
        return ";".join([*lpath, "./?.lua"]), ";".join([*cpath, "./?.so"])
    return ";".join([*lpath, "./?.lua", "./?/init.lua"]), ";".join([*cpath, "./?.so"])


def patch_lua(src: Path, name: str, arch: str) -> None:
    luaconf = next(p for p in (src / "luaconf.h", src / "src" / "luaconf.h") if p.exists())
    vdir = f"{name[3]}.{name[4]}"
    lpath, cpath = debian_paths(vdir, arch)
    defines = ["LUA_USE_LINUX", *COMPAT[name]]
    head = "".join(f"#ifndef {d}\n#define {d}\n#endif\n" for d in defines)
    tail = (
        "\n#undef LUA_PATH_DEFAULT\n"
        f'#define LUA_PATH_DEFAULT "{lpath}"\n'
        "#undef LUA_CPATH_DEFAULT\n"
        f'#define LUA_CPATH_DEFAULT "{cpath}"\n'
    )
    luaconf.write_text("/* luanbd: built as Debian builds Lua */\n" + head
                       + luaconf.read_text() + tail)


def build(wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    version = f"{LUPA_VERSION}+{LOCAL}"
    for old in wheel_dir.glob(f"lupa-{version}-*.whl"):
        return old
    with tempfile.TemporaryDirectory(prefix="luanbd-lupa-") as tmp:
        work = Path(tmp)
        sdist = work / f"lupa-{LUPA_VERSION}.tar.gz"
        with urllib.request.urlopen(SDIST_URL, timeout=120) as response:
            sdist.write_bytes(response.read())
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
            sys.exit(f"build_lupa: {SDIST_URL} does not have the expected sha256")
        with tarfile.open(sdist) as tar:
            tar.extractall(work)
        root = work / f"lupa-{LUPA_VERSION}"
        arch = multiarch()
        third = root / "third-party"
        # LuaJIT 2.0 is not offered by --lua; not building it saves a quarter of the time.
        shutil.rmtree(third / "luajit20", ignore_errors=True)
        (root / "lupa" / "luajit20.c").unlink(missing_ok=True)
        for name in COMPAT:
            patch_lua(third / name, name, arch)
        # One extension per Lua version: build them side by side.
        with (root / "setup.cfg").open("a") as cfg:
            cfg.write(f"\n[build_ext]\nparallel = {os.cpu_count() or 1}\n")
        setup = root / "setup.py"
        setup.write_text(setup.read_text().replace(
            f"VERSION = '{LUPA_VERSION}'", f"VERSION = '{version}'", 1))
        env = dict(os.environ)
        # lupa's own Linux wheels are built with these; LuaJIT's makefile takes the
        # install prefix that Debian's luajit uses for its module paths.
        env.update({
            "CFLAGS": "-O3 -g0 -pipe -fPIC",
            "LUPA_USE_BUNDLE": "true",
            "PREFIX": "/usr",
            "MULTILIB": f"lib/{arch}",
        })
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
             "-w", str(wheel_dir), str(root)],
            check=True, env=env,
        )
    return next(wheel_dir.glob(f"lupa-{version}-*.whl"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
