#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs and starts the services (setup.sh),
# checks formatting and lints, then runs every test with cargo-nextest against real
# PostgreSQL, RabbitMQ, an S3-compatible server, a MongoDB wire-protocol server and FFmpeg.
# Exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/setup.sh

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-waveline-test}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-waveline-test-secret}
export WAVELINE_TEST_S3_ENDPOINT=${WAVELINE_TEST_S3_ENDPOINT:-http://127.0.0.1:${WAVELINE_TEST_S3_PORT:-9900}}
export WAVELINE_TEST_DATABASE_URL=${WAVELINE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export WAVELINE_TEST_AMQP_URL=${WAVELINE_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
# The MongoDB server without a database: each test adds a database of its own (wltest_*).
export WAVELINE_TEST_MONGODB_URL=${WAVELINE_TEST_MONGODB_URL:-mongodb://127.0.0.1:${WAVELINE_TEST_MONGODB_PORT:-27017}}

# Databases left by an earlier run that was killed before its clean-up.
psql "$WAVELINE_TEST_DATABASE_URL" -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'waveline\_test\_%'" | while read -r db; do
  psql "$WAVELINE_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
done

# MongoDB databases left the same way (pymongo comes with nx-27017, in setup.sh's venv).
"${WAVELINE_STATE_DIR:-$root/.waveline}/venv/bin/python" - "$WAVELINE_TEST_MONGODB_URL" <<'PY' || true
import sys
from pymongo import MongoClient
client = MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
for name in client.list_database_names():
    if name.startswith("wltest_"):
        client.drop_database(name)
PY

# Logs of the waveline processes the end-to-end tests start (a failing test prints its path).
rm -rf "${TMPDIR:-/tmp}/waveline-test-logs"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build the waveline binary (and every test) for the end-to-end tests"
# The whole workspace in one invocation, so the binary and the tests share one feature set and
# nextest below rebuilds nothing (`-p waveline` alone would unify features differently).
cargo build --workspace --all-targets --locked
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast
# Tests that restart shared services (named exclusive_*, #[ignore]d so the parallel pass skips
# them) run alone, one at a time, after everything else.
echo "== tests that restart shared services, one at a time"
cargo nextest run --workspace --locked --no-fail-fast --run-ignored only --test-threads 1
# Contract fuzzing against the OpenAPI document (a short budget; scripts/schemathesis.sh
# takes a longer one as its argument).
echo "== schemathesis against /openapi.json, as a user and as an admin"
scripts/schemathesis.sh "${WAVELINE_SCHEMATHESIS_SECONDS:-45}"
