#!/usr/bin/env bash
# The suite on a busy machine: one CPU hog per core (stress-ng if installed, else a Python busy
# loop per core) beside N runs of `python -m pytest -q` in a row (default 3). A test that races
# the clock instead of waiting for what it needs fails here. The hogs are stopped on exit, Ctrl-C
# included. Prints each run's result and time; exits non-zero if any run failed.
#
#   scripts/stress_test.sh                 # 3 runs of the whole suite
#   scripts/stress_test.sh 1 -k resume     # N runs, then any arguments for pytest
#   PYTHON=.venv/bin/python scripts/stress_test.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
runs=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    runs=$1
    shift
fi
cores=$(nproc)
logs=$(mktemp -d "${TMPDIR:-/tmp}/stress_test.XXXXXX")

set -m  # every background job in a process group of its own: one kill stops a whole test run
hogs=()
tests=
stop() {
    [[ -n $tests ]] && kill -- "-$tests" 2>/dev/null
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait 2>/dev/null
}
trap stop EXIT
trap 'exit 130' INT TERM

if command -v stress-ng >/dev/null; then
    stress-ng --cpu "$cores" --quiet &
    hogs+=($!)
    kind=stress-ng
else
    for _ in $(seq "$cores"); do
        "$PYTHON" -c 'while True: pass' &
        hogs+=($!)
    done
    kind="Python busy loops"
fi
echo "stress test: $cores CPU hog(s) ($kind); $runs run(s) of $PYTHON -m pytest -q$(printf ' %q' "$@"); logs in $logs"

results=()
failed=0
for i in $(seq "$runs"); do
    start=$SECONDS
    # in the background, so that Ctrl-C or a kill reaches this script's trap at once
    { "$PYTHON" -m pytest -q "$@" </dev/null; echo $? >"$logs/run$i.rc"; } 2>&1 | tee "$logs/run$i.log" &
    tests=$(jobs -p %+)
    wait "$!"
    tests=
    rc=$(cat "$logs/run$i.rc")
    seconds=$((SECONDS - start))
    [[ $rc -ne 0 ]] && failed=$((failed + 1))
    results+=("run $i: exit $rc in $((seconds / 60))m$((seconds % 60))s: $(tail -n 1 "$logs/run$i.log")")
done

echo
echo "stress test: $((runs - failed)) of $runs run(s) passed beside $cores CPU hog(s) ($kind)"
printf '  %s\n' "${results[@]}"
[[ $failed -eq 0 ]]
