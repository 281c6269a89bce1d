#!/usr/bin/env bash
# Set up and run the whole test suite against real PostgreSQL and Redis.
# Uses DATABASE_URL / REDIS_URL when given; otherwise this machine's standard
# ports; where nothing answers there, provisions throwaway servers (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh test
source scripts/services.sh
exec python -m pytest "$@"
