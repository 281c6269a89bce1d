# Sourced by scripts/run.sh and scripts/test.sh, from the project root:
# create .venv if missing, activate it, and install the project (`pip install -e .`,
# with the test extra when $1 is "test"). A stamp that records pyproject.toml's
# hash skips the install when nothing changed since the last one.
#   PYTHON   the interpreter for a new .venv (default python3; needs 3.11 or newer)

PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: $PYTHON is missing or older than Python 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "setup: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

_ct_extras=""
[ "${1:-}" = "test" ] && _ct_extras="[test]"
_ct_stamp=".venv/.installed${_ct_extras}"
# (the Python client, clients/python, is installed beside it: its tests and bench/ use it)
_ct_want="$(python -c 'import hashlib; print(hashlib.sha256(b"".join(open(p, "rb").read() for p in ("pyproject.toml", "clients/python/pyproject.toml"))).hexdigest())')"
# An up-to-date test install holds the plain one too (run.sh after test.sh installs nothing).
if [ "$(cat "$_ct_stamp" 2>/dev/null)" != "$_ct_want" ] &&
   { [ -n "$_ct_extras" ] || [ "$(cat ".venv/.installed[test]" 2>/dev/null)" != "$_ct_want" ]; }; then
  echo "setup: pip install -e .${_ct_extras} -e ./clients/python"
  _ct_t0=$SECONDS
  # (the filter drops this machine's notes about local package mirrors it does not have)
  python -m pip install -q -e ".${_ct_extras}" -e ./clients/python 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$_ct_want" >"$_ct_stamp"
  echo "setup: installed in $((SECONDS - _ct_t0)) s"
fi
# The project's packages are imported from the project root (pyproject installs
# none): make that hold for every process we start, whatever its working directory.
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ;; esac
unset _ct_extras _ct_stamp _ct_want _ct_t0
