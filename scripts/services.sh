# Sourced: make sure PostgreSQL and Redis answer; export DATABASE_URL / REDIS_URL.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
if [ -z "${DATABASE_URL:-}" ]; then
  if port_open 127.0.0.1 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
  else
    echo "no PostgreSQL on 127.0.0.1:5432 and no DATABASE_URL: provisioning one is not implemented yet" >&2
    exit 1
  fi
fi
if [ -z "${REDIS_URL:-}" ]; then
  if port_open 127.0.0.1 6379; then
    export REDIS_URL="redis://127.0.0.1:6379/15"
  else
    echo "no Redis on 127.0.0.1:6379 and no REDIS_URL: provisioning one is not implemented yet" >&2
    exit 1
  fi
fi
