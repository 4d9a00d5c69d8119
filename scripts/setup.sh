#!/usr/bin/env bash
# Installs and starts everything Waveline's build and tests need, on a fresh Debian 12 machine
# or an already prepared one. Idempotent: run it as often as you like.
#
#   scripts/setup.sh              everything: packages, PostgreSQL, RabbitMQ, the S3 test server,
#                                 the MongoDB test server (nx-27017)
#   scripts/setup.sh --embedded   only what the embedded mode (scripts/demo.sh) needs
#
# Environment (defaults in brackets):
#   WAVELINE_TEST_S3_PORT [9900]        port of the local S3-compatible server (s3s-fs)
#   WAVELINE_TEST_MONGODB_PORT [27017]  port of the MongoDB wire-protocol test server (nx-27017)
#   WAVELINE_STATE_DIR    [REPO/.waveline]  where those servers keep their data and logs
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state=${WAVELINE_STATE_DIR:-$root/.waveline}
s3_port=${WAVELINE_TEST_S3_PORT:-9900}
s3fs_version=0.14.1
mongodb_port=${WAVELINE_TEST_MONGODB_PORT:-27017}
mode=${1:-all}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds, or fails naming NAME.
wait_for() {
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$name is not ready after ${seconds}s (checked with: $*)"
    sleep 0.5
  done
  log "$name is ready"
}

install_packages() {
  # postgresql: Debian's postgresql-15 ships the contrib extensions too (unaccent and pg_trgm,
  # which search's migration creates); no postgresql-contrib package is needed.
  local wanted=(pkg-config clang ffmpeg sox postgresql curl
    libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libswresample-dev libswscale-dev libavdevice-dev)
  if [ "$mode" != --embedded ]; then
    # openssl: the push tests make a fresh service-account key with it.
    wanted+=(rabbitmq-server nginx-light wrk hyperfine time bc python3-venv openssl)
  fi
  local missing=()
  for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "Debian packages present"
  fi
}

start_postgres() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || die "no PostgreSQL cluster under /etc/postgresql"
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_for "PostgreSQL on 127.0.0.1:5432" 60 pg_isready -h 127.0.0.1 -p 5432
  psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null \
    || die "PostgreSQL answers but user postgres cannot log in over TCP without a password (trust auth expected)"
}

start_rabbitmq() {
  if ! port_open 5672; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
  fi
  wait_for "RabbitMQ on 127.0.0.1:5672" 120 port_open 5672
  wait_for "RabbitMQ application" 60 as_root rabbitmqctl -q await_startup
}

start_s3() {
  local bin=${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs
  if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$s3fs_version"; }; then
    log "installing s3s-fs $s3fs_version (cached in $bin after the first time)"
    cargo install --quiet --locked "s3s-fs@$s3fs_version" --features binary
  fi
  if ! port_open "$s3_port"; then
    mkdir -p "$state/s3"
    log "starting s3s-fs on 127.0.0.1:$s3_port (data in $state/s3)"
    setsid nohup "$bin" --host 127.0.0.1 --port "$s3_port" \
      --access-key "${AWS_ACCESS_KEY_ID:-waveline-test}" --secret-key "${AWS_SECRET_ACCESS_KEY:-waveline-test-secret}" \
      "$state/s3" >"$state/s3s-fs.log" 2>&1 </dev/null &
  fi
  wait_for "S3 server (s3s-fs) on 127.0.0.1:$s3_port" 30 port_open "$s3_port"
}

# schemathesis (PyPI): the contract fuzzer scripts/schemathesis.sh runs against the API.
# In a virtual environment of its own under the state directory, so neither the system's
# Python nor the user's packages are touched.
install_schemathesis() {
  local version=4.32.5 venv=$state/venv
  if ! { [ -x "$venv/bin/st" ] && "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; }; then
    log "installing schemathesis $version (pip, in $venv)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
  fi
}

# nx-27017 (PyPI): a MongoDB wire-protocol server on SQLite, the stand-in for MongoDB in tests
# (no MongoDB server can be installed here; README.md says what it lacks). In the same venv as
# schemathesis; one SQLite file per database under the state directory, so a test that drops
# its database removes its file.
start_mongodb() {
  local version=0.8.1 venv=$state/venv
  if ! "$venv/bin/pip" show nx-27017 2>/dev/null | grep -qx "Version: $version"; then
    log "installing nx-27017 $version (pip, in $venv)"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nx-27017==$version"
  fi
  if ! port_open "$mongodb_port"; then
    mkdir -p "$state/mongodb"
    log "starting nx-27017 on 127.0.0.1:$mongodb_port (data in $state/mongodb)"
    setsid nohup "$venv/bin/nx-27017" --host 127.0.0.1 --port "$mongodb_port" --data-dir "$state/mongodb" \
      --log-file "$state/nx-27017.log" --pid-file "$state/nx-27017.pid" >"$state/nx-27017.out" 2>&1 </dev/null &
  fi
  wait_for "MongoDB test server (nx-27017) on 127.0.0.1:$mongodb_port" 30 port_open "$mongodb_port"
}

install_packages
start_postgres
if [ "$mode" != --embedded ]; then
  start_rabbitmq
  start_s3
  install_schemathesis
  start_mongodb
fi
log "done"
