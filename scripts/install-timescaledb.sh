#!/usr/bin/env bash
# Build and install the TimescaleDB extension for PostgreSQL 15 from Debian's own
# source package (trixie), since Debian 12 ships no binary package of it.
# Skipped when the extension is already installed. Needs root.
set -euo pipefail

PG_MAJOR="${PG_MAJOR:-15}"
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
SRC_LIST=/etc/apt/sources.list.d/vitalgate-trixie-src.sources
BUILD_DIR="${TIMESCALEDB_BUILD_DIR:-/var/tmp/vitalgate-timescaledb}"

libdir() { "$PG_CONFIG" --pkglibdir; }
sharedir() { "$PG_CONFIG" --sharedir; }

if [ -x "$PG_CONFIG" ] && ls "$(libdir)"/timescaledb*.so >/dev/null 2>&1 \
   && [ -f "$(sharedir)/extension/timescaledb.control" ]; then
  echo "TimescaleDB already installed for PostgreSQL ${PG_MAJOR}; skipping build."
  exit 0
fi

echo "Building TimescaleDB for PostgreSQL ${PG_MAJOR} from Debian's source package."
if [ ! -f "$SRC_LIST" ]; then
  cat >"$SRC_LIST" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  "postgresql-server-dev-${PG_MAJOR}" dpkg-dev cmake gcc make libssl-dev libkrb5-dev >/dev/null

rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
chown _apt "$BUILD_DIR" 2>/dev/null || true
cd "$BUILD_DIR"
apt-get source -qq --download-only timescaledb >/dev/null
dpkg-source --no-check -x ./*.dsc src >/dev/null
cd src
cmake -S . -B build \
  -DPG_CONFIG="$PG_CONFIG" \
  -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
  -DAPACHE_ONLY=ON -DLINTER=OFF -DCLANG_FORMAT=OFF -DSEND_TELEMETRY_DEFAULT=NO \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
cmake --install build >/dev/null
echo "TimescaleDB installed: $(ls "$(libdir)"/timescaledb*.so | tr '\n' ' ')"
