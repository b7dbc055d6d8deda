#!/bin/sh
# The Python (and so the torch) that `make` uses, printed as one line "HOW INTERPRETER" for the
# Makefile; the first that applies:
#   given    PYTHON=... was set (2nd argument): that interpreter, used as it is
#   active   the active virtual environment ($VIRTUAL_ENV) has torch: its python, directly
#            (python3 -m venv --system-site-packages would expose the base interpreter's
#            site-packages, not the active venv's)
#   project  the project's venv (1st argument) exists: its python
#   direct   python3 has torch and runs inside a venv: that python, directly (same reason)
#   share    python3 has torch: a project venv created with --system-site-packages sees it
#   fresh    no torch anywhere: a project venv gets the torch CI tests
#   error    MESSAGE
# Detection uses importlib.util.find_spec, which finds torch without importing it (fast).
# Usage: sh tools/pick_python.sh VENV [PYTHON]
venv=$1
given=${2:-}

has_torch() {
  "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' \
    >/dev/null 2>&1
}
in_venv() {
  "$1" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' >/dev/null 2>&1
}

if [ -n "$given" ]; then
  if "$given" -c 'pass' >/dev/null 2>&1; then
    echo "given $given"
  else
    echo "error PYTHON=$given does not run"
  fi
elif [ -n "${VIRTUAL_ENV:-}" ] && has_torch "$VIRTUAL_ENV/bin/python"; then
  echo "active $VIRTUAL_ENV/bin/python"
elif [ -x "$venv/bin/python" ]; then
  echo "project $venv/bin/python"
elif ! command -v python3 >/dev/null 2>&1; then
  echo "error no python3 on PATH (Python >= 3.10 is needed)"
elif has_torch python3 && in_venv python3; then
  echo "direct $(python3 -c 'import sys; print(sys.executable)')"
elif has_torch python3; then
  echo "share python3"
else
  echo "fresh python3"
fi
