#!/usr/bin/env bash
# Creates (or reuses) the project venv outside the clone, keyed by a hash of the dependency spec.
# Prints the venv path on stdout; everything else goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Installed without its dependencies: megatron-core's own pins would pull a second torch, and 0.16.1 is
# the last release for Python 3.11. Only the Megatron plug's test needs it.
NO_DEPS_EXTRAS="megatron-core==0.16.1"
# Key: the dependency lists only (editing other pyproject fields must not trigger a reinstall).
key=$( (sed -n '/^dependencies = \[/,/^\[project.scripts\]/p' "$root/pyproject.toml"; echo "$NO_DEPS_EXTRAS") \
      | sha256sum | cut -c1-16)
venv="${SGLGYM_VENV_DIR:-$HOME/.cache/sglgym}/venv-$key"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "[venv] creating $venv (first time: ~4 min, ~11 GB)" >&2
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  # Install the dependencies (keyed above); the project itself is installed editable below.
  "$venv/bin/pip" install -q -e "$root[dev]" 2>&1 | grep -v -E "is ignored: it is neither|^\s*$" >&2 || true
  "$venv/bin/pip" install -q --no-deps $NO_DEPS_EXTRAS 2>&1 | grep -v -E "is ignored: it is neither|^\s*$" >&2 || true
  "$venv/bin/python" -c "import sglang, torch, triton, pytest, sglang_router, megatron.core" || { echo "[venv] install failed" >&2; exit 1; }
  touch "$venv/.complete"
fi
# The venv is shared between clones: (re)point the editable install at this one when it is elsewhere.
here=$(cd / && "$venv/bin/python" -c "import os, sglgym; print(os.path.dirname(os.path.dirname(os.path.realpath(sglgym.__file__))))" 2>/dev/null || true)
if [ "$here" != "$(realpath "$root")" ]; then
  "$venv/bin/pip" install -q --no-deps -e "$root" > /tmp/sglgym-pip-$$.log 2>&1 || { cat /tmp/sglgym-pip-$$.log >&2; exit 1; }
fi
echo "$venv"
