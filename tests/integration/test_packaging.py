"""Packaging: a wheel built from the source tree installs into a fresh virtualenv and its
``luanbd`` command serves a disk to a real client; ``man luanbd`` and the bash completion
work from that virtualenv, and from an editable one set up as scripts/setup.sh does.

The wheel is built from a copy of the tree (pip builds in place, and would leave build/
and egg-info behind in the checkout).  The fresh virtualenv uses Debian's python3 with
``--system-site-packages`` so that libnbd's bindings stay importable; lupa comes from PyPI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from luanbd_procs import client_env, not_sanitized
from test_man import PAGES, check_man, man_env

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"

# Under scripts/sanitize.sh, PYTHONPATH puts the sanitized tree ahead of the installed wheel,
# so the wheel's own files would not be the ones tested.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              not_sanitized("PYTHONPATH shadows the installed wheel")]


def _run(*args: str | Path, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True,
                            timeout=540, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what pip needs of the source tree (and the link script of setup.sh)."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy2(REPO / "pyproject.toml", tree)
    shutil.copy2(REPO / "README.md", tree)
    shutil.copytree(REPO / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    shutil.copytree(REPO / "man", tree / "man")
    shutil.copytree(REPO / "completion", tree / "completion")
    (tree / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "link_data_files.py", tree / "scripts")
    return tree


@pytest.fixture(scope="module")
def wheel(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A luanbd wheel built with pip from a copy of the source tree."""
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, tree)
    wheels = list(out.glob("luanbd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel (and lupa from PyPI) installed; returns its bin."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} not found")
    path = tmp_path_factory.mktemp("venv")
    _run(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", path)
    _run(path / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    return path / "bin"


def test_wheel_contains_lua_runtime_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "luanbd/lua/nbdkit.lua" in names, sorted(names)
    assert "luanbd/py.typed" in names, sorted(names)
    assert "luanbd/cli.py" in names, sorted(names)
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    assert data == {*(f"share/man/man{p[-1]}/{p}" for p in PAGES),
                    "share/bash-completion/completions/luanbd"}, sorted(names)
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert entry_points, sorted(names)
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    assert "luanbd = luanbd.__main__:main" in text, text


def test_installed_wheel_serves_a_disk(venv: Path) -> None:
    env = client_env()
    # The fresh venv's bin first (for `luanbd` and its children), then the system tools.
    env["PATH"] = f"{venv}:/usr/bin:/bin"
    env.pop("VIRTUAL_ENV", None)
    result = _run(venv / "luanbd", "-U", "-", REPO / "examples" / "ramdisk.lua", "size=16M",
                  "--run", 'nbdinfo --size "$uri"', env=env, cwd=REPO)
    assert result.stdout == f"{16 * 1024 * 1024}\n", result
    # The installed command is the venv's, not the development one.
    where = _run(venv / "python", "-c", "import luanbd; print(luanbd.__file__)", env=env,
                 cwd=venv)
    assert where.stdout.startswith(str(venv.parent)), where.stdout


def test_installed_wheel_python_m_version(venv: Path) -> None:
    result = _run(venv / "python", "-m", "luanbd", "-V", cwd=venv)
    version = _run(venv / "python", "-c",
                   "import importlib.metadata as m; print(m.version('luanbd'))", cwd=venv)
    assert result.stdout == f"luanbd {version.stdout.strip()}\n", result
    assert result.stderr == ""


POPEN_SCRIPT = """\
local p = io.popen("echo hi"); print("popen=" .. p:read("*l")); p:close()
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset) return string.rep("\\0", count) end
"""


def test_installed_wheel_reports_which_runtimes_are_incomplete(venv: Path,
                                                               tmp_path: Path) -> None:
    # lupa's own wheel (what a plain pip install gets) has every runtime in one process
    # here: --dump-config once crashed loading a second one.  What it says must be true.
    result = _run(venv / "luanbd", "--dump-config", env=client_env(), cwd=venv)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines())
    installed = fields["lua_versions"].split(",")
    incomplete = [v for v in fields["lua_incomplete"].split(",") if v]
    assert set(incomplete) <= set(installed), fields
    script = tmp_path / "popen.lua"
    script.write_text(POPEN_SCRIPT)
    for lua in ("5.4", "luajit"):
        dump = subprocess.run([venv / "luanbd", f"--lua={lua}", script, "--dump-plugin"],
                              capture_output=True, text=True, timeout=60, check=False,
                              env=client_env(), stdin=subprocess.DEVNULL)
        if lua in incomplete:
            assert dump.returncode == 1 and "'popen' not supported" in dump.stderr, dump
        else:
            assert dump.returncode == 0 and "popen=hi" in dump.stdout, dump


def _complete(completion: Path, bin_dir: Path, *words: str) -> list[str]:
    result = _run("bash", "-c", 'source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
                  '_luanbd; printf "%s\\n" "${COMPREPLY[@]}"', completion, "luanbd", *words,
                  env=client_env(PATH=f"{bin_dir}:/usr/bin:/bin"), cwd=bin_dir)
    assert result.stderr == "", result
    return result.stdout.split()


def test_installed_wheel_has_man_pages_and_completion(venv: Path, tmp_path: Path) -> None:
    prefix = venv.parent
    check_man(prefix, prefix / "share" / "man")
    # whatis / man -k read mandb's index, which a user (or a package) builds.
    shutil.copytree(prefix / "share" / "man", tmp_path / "man")
    _run("mandb", "-q", tmp_path / "man", env=man_env(prefix))
    found = _run("whatis", "-M", tmp_path / "man", "luanbd-lua-plugin", env=man_env(prefix))
    assert found.stdout.startswith("luanbd-lua-plugin (3)"), found
    completion = prefix / "share" / "bash-completion" / "completions" / "luanbd"
    assert _complete(completion, venv, "--filter=cb") == ["--filter=cbt"]
    assert _complete(completion, venv, "--fil") == ["--filter"]


def test_editable_install_as_setup_sh_makes_it(tree: Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    # pip install -e installs no data-files (PEP 660 editable wheels leave them out);
    # scripts/setup.sh links them into .venv afterwards.
    prefix = tmp_path_factory.mktemp("editable")
    _run(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", prefix)
    _run(prefix / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "-e", tree,
         cwd=tree)
    _run(prefix / "bin" / "python", tree / "scripts" / "link_data_files.py", prefix)
    check_man(prefix, tree / "man")
