#!/usr/bin/env bash
# Prepare this machine (Debian 12, root) for vitalgate's tests, demo and bench:
# system packages, TimescaleDB, and the project venv in .venv.
# Idempotent and fast when everything is already there; never reads stdin.
#
# Environment:
#   PYTHON3   interpreter that creates the venv (default: python3 on PATH, >= 3.11)
#   EXTRAS    extras installed into the venv (default: dev)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

PYTHON3="${PYTHON3:-python3}"
EXTRAS="${EXTRAS:-dev}"
VENV=.venv
STAMP="$VENV/.vitalgate-${EXTRAS//,/-}.stamp"
# chromium: the headless browser of the page's test (driven by Playwright from the dev extra);
# prometheus: promtool, which checks the alert rules
APT_PACKAGES=(postgresql-15 postgresql-client-15 mosquitto mosquitto-clients prometheus chromium)

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

installed() { dpkg -s "$1" 2>/dev/null | grep -qx 'Status: install ok installed'; }

[ "$(id -u)" -eq 0 ] || die "run as root (installs apt packages and TimescaleDB)"

# One run at a time: concurrent `make test` runs would race on apt and on the venv.
exec 9>/var/lock/vitalgate-setup.lock
flock 9

# --- apt packages (apt-get update only when something is missing)
command -v "$PYTHON3" >/dev/null || APT_PACKAGES+=(python3)
if ! "$PYTHON3" -c 'import ensurepip, venv' 2>/dev/null && [ "$(command -v "$PYTHON3")" = /usr/bin/python3 ]; then
  APT_PACKAGES+=(python3-venv)  # Debian splits ensurepip out of the system python
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  step "apt: ${APT_PACKAGES[*]} already installed"
fi

# --- TimescaleDB (the script skips when the extension is already installed)
printf '==> timescaledb: '
bash scripts/install-timescaledb.sh

# --- venv
new_venv=0
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  "$PYTHON3" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON3 is $("$PYTHON3" -V 2>&1); vitalgate needs Python >= 3.11"
  step "venv: creating $VENV with $("$PYTHON3" -V 2>&1)"
  "$PYTHON3" -m venv --clear "$VENV"
  new_venv=1
fi
if [ "$new_venv" -eq 1 ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  step "venv: pip install -e '.[$EXTRAS]' (log: $VENV/pip-install.log)"
  # Quiet on success (setuptools' build warnings are noise here); the whole log on failure.
  if ! "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" >"$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    die "pip install failed"
  fi
  touch "$STAMP"
else
  step "venv: $VENV up to date with pyproject.toml"
fi
