#!/usr/bin/env bash
# Build both C extensions (server/_fastpath, lua/_lualib) with AddressSanitizer and
# UndefinedBehaviorSanitizer in a copy of the tree, and run the checks on that build.
#
#   bash scripts/sanitize.sh            # the whole test suite, every fuzz harness, a leak check
#   bash scripts/sanitize.sh --quick    # CI's bounded job (about 2 minutes on 2 cores)
#   bash scripts/sanitize.sh --shell    # a shell in the sanitized copy, environment set
#   options: --fuzz-seconds=N (fuzz/run.py's time), --keep (keep the copy), -- PYTEST_ARGS
#
# The normal build (the .so files beside the sources, the editable install) is not touched:
# the tracked and untracked-but-not-ignored files are copied to a temporary directory, built
# there with -fsanitize=address,undefined -fno-sanitize-recover=undefined -O1 -g, and that
# copy's src/ goes first on PYTHONPATH, so luanbd servers started by the tests (the venv's
# `luanbd` command, any child python) import the sanitized modules too.  The interpreter is
# not instrumented: libasan is LD_PRELOADed into every python and only there
# (scripts/sanitize_site/sitecustomize.py, also on PYTHONPATH), and every sanitizer report
# of any process goes to a file under the copy's reports/ (log_path), so a report from a
# server whose stderr a test swallows is still counted.  The run fails if there is one.
#
# Leaks: detect_leaks=0 for the suite (CPython does not free everything at exit by design).
# The full mode then runs the compiled-loop harness's seeds and the compiled-loop and lualib
# tests once more with detect_leaks=1 and PYTHONMALLOC=malloc (so Python objects are malloc
# blocks LeakSanitizer sees), and fails on a leak whose stack passes through _fastpath or
# _lualib; the interpreter's own exit-time leaks are listed as a count only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

mode=full keep=0 fuzz_seconds=""
pytest_args=()
while (($#)); do
    case $1 in
        --quick) mode=quick ;;
        --shell) mode=shell ;;
        --keep) keep=1 ;;
        --fuzz-seconds=*) fuzz_seconds=${1#*=} ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "sanitize.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -x "$ROOT/.venv/bin/python" ]; then
    export PATH="$ROOT/.venv/bin:/usr/bin:$PATH"
fi
PY=$(command -v python)
ASAN_LIB=$(gcc -print-file-name=libasan.so)
[ -e "$ASAN_LIB" ] || { echo "sanitize.sh: gcc has no libasan ($ASAN_LIB)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/luanbd-sanitize.XXXXXX)
cleanup() { if ((keep)); then echo "sanitize.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
TREE=$WORK/tree REPORTS=$WORK/reports
mkdir -p "$TREE" "$REPORTS"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -xf - -C "$TREE"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
start=$(date +%s)
(cd "$TREE" && CFLAGS="$SAN" LDFLAGS="$SAN" LUANBD_OPT="-O1 -g" \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build" >"$WORK/build.log" 2>&1) \
    || { cat "$WORK/build.log" >&2; exit 1; }
# The extensions are optional in setup.py: a failed compile is quiet, so check both are there
# and instrumented.
for ext in server/_fastpath lua/_lualib; do
    so=$(ls "$TREE"/src/luanbd/$ext.*.so 2>/dev/null || true)
    if [ -z "$so" ] || ! nm -D "$so" | grep -q __asan_report; then
        cat "$WORK/build.log" >&2
        echo "sanitize.sh: $ext was not built with ASan" >&2
        exit 1
    fi
done
echo "sanitize.sh: built both extensions with ASan+UBSan in $(($(date +%s) - start)) s ($TREE)"

# libasan goes into every python (scripts/sanitize_site/sitecustomize.py re-executes one
# started without it) and into nothing else: nbdkit, qemu and the clients stay as they are.
export LUANBD_ASAN_RUNTIME=$ASAN_LIB
# allocator_may_return_null: a huge malloc fails with ENOMEM as it does without ASan (the
# memory-limit tests rely on it); handle_segv=0 leaves faulthandler to Python.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:\
detect_odr_violation=0:handle_segv=0:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export PYTHONPATH=$TREE/src:$TREE/scripts/sanitize_site
export LUANBD_SANITIZED=1
cd "$TREE"

"$PY" - <<'EOF'
import luanbd.lua.lualib, luanbd.server.compiled as c
from luanbd.server import _fastpath
from luanbd.lua import _lualib
assert c.FASTPATH_BUILT and "luanbd-sanitize" in _fastpath.__file__, _fastpath.__file__
assert "luanbd-sanitize" in _lualib.__file__, _lualib.__file__
EOF

if [ "$mode" = shell ]; then
    keep=1
    echo "sanitize.sh: sanitized environment; reports go to $REPORTS" >&2
    "${SHELL:-bash}" || true
    exit 0
fi

status=0
phase() {  # phase NAME COMMAND...: run, time and record one check
    local name=$1 t0 rc
    shift
    t0=$(date +%s)
    echo "=== sanitize.sh: $name: $*"
    set +e
    "$@"
    rc=$?
    set -e
    echo "=== sanitize.sh: $name: exit $rc in $(($(date +%s) - t0)) s"
    ((rc == 0)) || status=1
}

if [ "$mode" = quick ]; then
    phase tests pytest -q -p no:cacheprovider tests/protocol tests/server \
        tests/integration/test_fastpath.py tests/lua "${pytest_args[@]}"
    phase fuzz "$PY" fuzz/run.py --seconds "${fuzz_seconds:-30}" \
        --only handshake,requests,fastpath --artifacts "$WORK/findings"
else
    phase tests pytest -q -p no:cacheprovider "${pytest_args[@]}"
    phase fuzz "$PY" fuzz/run.py --seconds "${fuzz_seconds:-240}" \
        --only handshake,requests,fastpath,server --artifacts "$WORK/findings"
    # Leak check: only leaks through our extensions count (see the top of this file).
    leaks() {
        ASAN_OPTIONS="${ASAN_OPTIONS/detect_leaks=0/detect_leaks=1}:log_path=$REPORTS/leak" \
            PYTHONMALLOC=malloc "$@"
    }
    phase leak-run leaks "$PY" fuzz/fuzz_fastpath.py --replay fuzz/corpus/fastpath
    phase leak-tests leaks pytest -q -p no:cacheprovider tests/server/test_compiled_loop.py \
        tests/lua/test_lualib.py
    phase leak-check "$PY" scripts/sanitize_leaks.py "$REPORTS"
fi

# Every report of every process, whatever the tests made of it.  A file with only
# warnings (qemu's coroutines: "ASan doesn't fully support makecontext/swapcontext") is
# listed, not counted.
reports=$(grep -lE "ERROR: [A-Za-z]+Sanitizer|runtime error:" "$REPORTS"/asan.* \
    "$REPORTS"/ubsan.* 2>/dev/null | sort || true)
warnings=$(find "$REPORTS" -name 'asan.*' -o -name 'ubsan.*' | wc -l)
if [ -n "$reports" ]; then
    for f in $reports; do echo "--- $f"; cat "$f"; done
    echo "sanitize.sh: $(echo "$reports" | wc -l) sanitizer report(s)" >&2
    keep=1
    status=1
else
    echo "sanitize.sh: no sanitizer reports ($warnings file(s) with warnings only)"
fi
echo "sanitize.sh: $mode run $( ((status == 0)) && echo passed || echo FAILED) in \
$(($(date +%s) - start)) s"
exit $status
