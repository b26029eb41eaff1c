#!/usr/bin/env bash
# Runs each property test of host/tests/properties.rs (request framing, reply framing, slot
# hashing, MGET split and merge) on random inputs for a set time; not part of CI, whose test
# command runs them with proptest's default 256 cases. A failure prints proptest's minimal
# failing input; add it as a unit test when fixing it.
#
#   bash examples/fuzz.sh                 # 5 minutes per property
#   SECONDS_EACH=60 bash examples/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${SECONDS_EACH:-300}
cargo build --release --locked -p respire --tests >/dev/null
props=$(cargo test --release --locked -p respire --test properties -- --list 2>/dev/null | sed -n 's/: test$//p')
failed=0
for p in $props; do
  echo "==> $p (${SECONDS_EACH}s)"
  set +e
  PROPTEST_CASES=1000000000 timeout "$SECONDS_EACH" \
    cargo test --release --locked -q -p respire --test properties -- --exact "$p" >"/tmp/respire-fuzz-$p.log" 2>&1
  rc=$?
  set -e
  case $rc in
    124) echo "    no failure found" ;;
    0) echo "    all cases passed" ;;
    *) echo "    FAILED (log: /tmp/respire-fuzz-$p.log)"; grep -m1 -A3 'minimal failing input' "/tmp/respire-fuzz-$p.log" || true; failed=1 ;;
  esac
done
exit $failed
