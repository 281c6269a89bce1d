#!/usr/bin/env bash
# The test command: install the project with its test extra, make sure PostgreSQL,
# Redis and Debian's Chromium are there, and run the whole suite (or what the
# arguments select: they go to pytest as they are).
#
#   bash scripts/test.sh                      # everything (what CI runs)
#   bash scripts/test.sh tests/metering -q    # a part (keeps its test database: --reuse-db)
#   CT_TEST_CLOCK=2028-02-29T23:59:30Z bash scripts/test.sh   # every test starts at that instant
#
# PostgreSQL and Redis: DATABASE_URL / REDIS_URL when given; else this machine's
# standard ports (127.0.0.1:5432 user postgres db test, 127.0.0.1:6379) when they
# answer; else throwaway servers on free ports, stopped when this script exits.
# See scripts/services.sh for the knobs (PG_PROBE_PORT, REDIS_PROBE_PORT, CT_SERVERS_FROM).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

source scripts/setup.sh test
source scripts/services.sh
trap ct_services_stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ct_services_ensure
ct_browser_ensure
export DATABASE_URL REDIS_URL
echo "test: setup took $((SECONDS - t0)) s"

# The apps depend one way (pyproject.toml's [tool.importlinter] contracts): a wrong import fails here.
if ! contracts=$(lint-imports --no-cache 2>&1); then
  echo "$contracts" >&2
  echo "test: an import breaks the apps' one-way dependencies (above); fix it before the tests run" >&2
  exit 1
fi
echo "test: import contracts kept ($(grep -o '[0-9]* kept' <<<"$contracts"))"
echo "test: running pytest $*"

# A test that hangs fails on its own after PYTEST_TIMEOUT seconds (pytest-timeout)
# instead of stalling the run; in CI the slowest tests are named, so the suite's
# time stays visible (CI allows 90 minutes on 2 cores).
args=(--timeout="${PYTEST_TIMEOUT:-900}")
[ -n "${CI:-}" ] && args+=(--durations=25)
# A part of the suite (any arguments) keeps the test database for the next part: migrating a
# new one takes about 40 s, longer than most parts. New migrations are still applied to it;
# --create-db starts afresh. The whole suite (no arguments, as CI runs it) makes its own
# database and drops it at the end.
[ "$#" -gt 0 ] && args+=(--reuse-db)
set +e
# pytest starts with SIGINT and SIGQUIT at their defaults even when this script was
# started with them ignored (nohup, a background job): tests that interrupt a
# process they started (Ctrl-C on a live command) must work the same everywhere.
python -c 'import os, signal, sys
for sig in (signal.SIGINT, signal.SIGQUIT):
    signal.signal(sig, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]])' "${args[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # No test was collected: for the whole suite that is a broken suite, never a pass.
  echo "test: pytest collected no tests (exit 5)${*:+ for: $*}" >&2
fi
echo "test: finished in $((SECONDS - t0)) s with exit code $rc"
exit "$rc"
