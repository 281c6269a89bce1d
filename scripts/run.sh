#!/usr/bin/env bash
# The run command: install, migrate, load the demo data and serve the app.
#
#   bash scripts/run.sh                 # http://127.0.0.1:8000
#   PORT=8001 bash scripts/run.sh       # another port (HOST likewise)
#
# With nothing set it runs on the embedded default (SQLite in db.sqlite3, a
# local-memory cache, Celery tasks run in-process): no servers needed.
# DATABASE_URL / REDIS_URL are honoured when set; with REDIS_URL, Celery sends
# tasks to Redis, so a worker with an embedded beat is started beside the server.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
export DJANGO_SETTINGS_MODULE=${DJANGO_SETTINGS_MODULE:-consensus_tokens.settings.local}
# Links the app builds (alert e-mails, Stripe Checkout's return URLs) point at this server.
export SITE_URL=${SITE_URL:-http://$HOST:$PORT}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
if port_open "$HOST" "$PORT"; then
  echo "run: $HOST:$PORT is already in use; choose another with PORT=8001 bash scripts/run.sh" >&2
  exit 1
fi

source scripts/setup.sh

echo "run: database ${DATABASE_URL:-sqlite (db.sqlite3)}; cache/broker ${REDIS_URL:-local memory, Celery eager}"
# A new SQLite database starts from the recorded baseline (consensus_tokens/sqlite_baseline.py):
# a full migrate would spend most of a minute on CPU; migrate then applies only what is newer.
python manage.py sqlite_baseline_load
python manage.py migrate --noinput
python manage.py setup_periodic_tasks
python manage.py setup_support_group
python manage.py collectstatic --noinput -v 0
echo
echo "== demo users, staff logins and service key ================================="
demo_out=$(python manage.py demo)
echo "$demo_out"
echo "=============================================================================="

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${REDIS_URL:-}" ]; then
  mkdir -p .cache
  echo "run: REDIS_URL is set: starting a Celery worker with an embedded beat (log: .cache/celery.log)"
  celery -A consensus_tokens worker -B --loglevel INFO --concurrency 2 >.cache/celery.log 2>&1 &
  pids+=($!)
fi

key=$(sed -n 's/^SERVICE_KEY=//p' <<<"$demo_out")
uid=$(sed -n 's/^USER alice id=\([0-9]*\).*/\1/p' <<<"$demo_out")
base="http://$HOST:$PORT"
cat <<EOF

Consensus Tokens is starting on $base  (Ctrl-C stops it)
  sign in        $base/accounts/login/   as alice / bob / carol with the USER passwords above
  dashboard      $base/dashboard/
  admin          $base/admin/   as support (the support console) or admin (superuser), STAFF passwords above
  API schema     $base/api/schema/
  try the API    curl -s -H "Authorization: Api-Key $key" "$base/api/tokens/usage?userId=${uid:-1}"
  manage.py      .venv/bin/python manage.py <command>   (or first: source .venv/bin/activate)

EOF
# --insecure: serve static files from the app even when DEBUG is off; --noreload:
# one process, so stopping this script stops the server.
python manage.py runserver --insecure --noreload "$HOST:$PORT" &
pids+=($!)
wait "${pids[-1]}"
