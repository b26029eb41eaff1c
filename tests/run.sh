#!/usr/bin/env bash
# Runs every test of respire on a fresh machine: installs what is missing,
# builds, then runs the whole workspace's tests against real Redis servers.
set -euo pipefail
cd "$(dirname "$0")/.."

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools promtool:prometheus openssl:openssl
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "==> adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

ensure_redis_py

echo "==> redis: $(redis-server --version)"
echo "==> building"
cargo build --workspace --all-targets --locked
echo "==> testing"
cargo test --workspace --locked -- --test-threads="${RESPIRE_TEST_THREADS:-4}"
