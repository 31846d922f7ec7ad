#!/usr/bin/env bash
# Checks the README's set-up commands on a fresh virtual environment, as a new user runs them.
#
# Copies the working tree (tracked and untracked, not ignored files) to a temporary folder,
# creates a fresh venv there (no system site-packages), runs the README's two set-up
# commands exactly as written, and checks that the demo wrote selmix-demo/index.html and
# every image that it references.
#
# Usage: scripts/check_fresh_venv.sh            # both commands
#        SKIP_TESTS=1 scripts/check_fresh_venv.sh   # only the demo command
#        KEEP=1 ...                              # keep the temporary folder
set -euo pipefail

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
readme="$repo/README.md"
# The README's two set-up commands; the check fails if the README no longer shows them verbatim.
demo_command='pip install -e . && selmix demo'
test_command='pip install -e ".[dev]" && python -m pytest'
for command in "$demo_command" "$test_command"; do
    if ! grep -qxF "    $command" "$readme"; then
        echo "FAIL: README.md no longer shows the set-up command: $command" >&2
        exit 1
    fi
done

work=$(mktemp -d /tmp/selmix-fresh-venv.XXXXXX)
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$work"' EXIT; fi
mkdir "$work/repo"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -cf - -T - 2>/dev/null) | tar -xf - -C "$work/repo"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
echo "fresh venv: $(python --version), $(command -v python)"
if python -c "import selmix" 2>/dev/null; then
    echo "FAIL: selmix is importable before installing: not a fresh environment" >&2
    exit 1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
cd "$work/repo"

echo "\$ $demo_command"
start=$SECONDS
bash -c "$demo_command" > "$work/demo.log" 2>&1 || {
    tail -n 30 "$work/demo.log" >&2
    echo "FAIL: the demo command exited with an error" >&2
    exit 1
}
# progress bars redraw with \r: keep only the lines a reader needs
tr '\r' '\n' < "$work/demo.log" | grep -v -e '^Requirement already satisfied' -e '^  ' -e '%|' \
    | grep -v '^ *$' | tail -n 25
echo "(demo command: $((SECONDS - start)) s)"

report="$work/repo/selmix-demo/index.html"
if [[ ! -s "$report" ]]; then
    echo "FAIL: the demo wrote no report: $report is missing" >&2
    exit 1
fi
images=$(grep -oE '<img [^>]*src="[^"]+"' "$report" | sed -E 's/.*src="([^"]+)"/\1/' || true)
count=0
for image in $images; do
    if [[ ! -s "$work/repo/selmix-demo/$image" ]]; then
        echo "FAIL: index.html references $image, which is missing" >&2
        exit 1
    fi
    count=$((count + 1))
done
if [[ $count -eq 0 ]]; then
    echo "FAIL: index.html references no images" >&2
    exit 1
fi
echo "OK: selmix-demo/index.html and all $count images it references exist"

if [[ -n "${SKIP_TESTS:-}" ]]; then
    echo "skipped: $test_command (SKIP_TESTS is set)"
    exit 0
fi
echo "\$ $test_command"
start=$SECONDS
bash -c "$test_command" > "$work/tests.log" 2>&1 || {
    tail -n 30 "$work/tests.log" >&2
    echo "FAIL: the test command exited with an error" >&2
    exit 1
}
tail -n 3 "$work/tests.log"
echo "(test command: $((SECONDS - start)) s)"
echo "OK: both README set-up commands work in a fresh venv"
