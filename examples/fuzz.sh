#!/usr/bin/env bash
# Runs each property test of host/tests/properties.rs (request framing, reply framing, slot
# hashing, MGET split and merge, SCAN cursors) on random inputs for a set time, then each
# cargo-fuzz target of fuzz/ (request parser, reply framing, routing) with libFuzzer and
# AddressSanitizer for the same time; not part of CI, whose test command runs the properties
# with proptest's default 256 cases. A failure prints proptest's minimal failing input, or
# leaves libFuzzer's crash file under fuzz/artifacts/; add it as a unit test when fixing it.
#
#   bash examples/fuzz.sh                 # 5 minutes per property and per target
#   SECONDS_EACH=60 bash examples/fuzz.sh
#   FUZZ_TARGETS=no bash examples/fuzz.sh # the properties only
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

if [ "${FUZZ_TARGETS:-yes}" = yes ]; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
  # cargo-fuzz passes -Z flags (sanitizers): RUSTC_BOOTSTRAP lets the stable toolchain take them.
  export RUSTC_BOOTSTRAP=1
  for t in $(cargo fuzz list --fuzz-dir fuzz); do
    echo "==> cargo fuzz $t (${SECONDS_EACH}s)"
    set +e
    cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 \
      >"/tmp/respire-fuzz-$t.log" 2>&1
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then
      echo "    no failure found ($(grep -o 'stat::number_of_executed_units: [0-9]*' "/tmp/respire-fuzz-$t.log" | awk '{print $2}') runs)"
    else
      echo "    FAILED (log: /tmp/respire-fuzz-$t.log; input under fuzz/artifacts/$t/)"; failed=1
    fi
  done
fi
exit $failed
