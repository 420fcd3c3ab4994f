#!/usr/bin/env bash
# Bounded soak of shmreplay (not a CI test): writers SIGKILLed and restarted, samplers checking
# every row, stale-segment gc, then a full read-back and leak checks. See ci/soak.py.
#
#   ci/soak.sh --minutes N [--seed S] [--capacity C] [--writers W] [--samplers K]
#              [--path DIR] [--no-gc] [--no-build]
#
# --no-build skips `make dev` (venv + extension build), e.g. while other processes use the
# installed extension. Exit code 0 iff the soak is ok; the last output line is "SOAK-RESULT {json}".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build=1
args=()
for a in "$@"; do
    if [[ "$a" == "--no-build" ]]; then build=0; else args+=("$a"); fi
done
if [[ $build == 1 || ! -x "$repo/.venv/bin/python" ]]; then
    # Idempotent: creates the venv once, rebuilds the extension only if sources changed.
    # Its output goes to stderr so that stdout is the soak's report.
    make -C "$repo" dev >&2
fi
cd "$repo"
exec "$repo/.venv/bin/python" "$repo/ci/soak.py" ${args[@]+"${args[@]}"}
