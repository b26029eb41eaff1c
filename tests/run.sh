#!/usr/bin/env bash
# Runs every test of respire on a fresh machine: installs what is missing,
# builds, then runs the whole workspace's tests against real Redis servers.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "==> adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

if ! python3 -c 'import redis' >/dev/null 2>&1; then
  echo "==> installing redis-py (the cluster-aware client the tests use)"
  python3 -m pip install --quiet redis
fi

echo "==> redis: $(redis-server --version)"
echo "==> building"
cargo build --workspace --all-targets --locked
echo "==> testing"
cargo test --workspace --locked -- --test-threads="${RESPIRE_TEST_THREADS:-4}"
