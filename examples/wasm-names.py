#!/usr/bin/env python3
"""Names the compiled plugin code in a callgrind profile of respire.

callgrind shows code that wasmtime compiled at run time as ???:0x... addresses. Run respire
with RESPIRE_WASM_PERFMAP=1 (wasmtime then writes /tmp/perf-<pid>.map; under valgrind the pid
is valgrind's own) and build the plugins unstripped to get function names, e.g.

  cargo build --release --target wasm32-wasip2 -p respire-plugin-metrics \
    --config 'profile.release.package.respire-plugin-metrics.strip=false'

then: python3 examples/wasm-names.py callgrind.out /tmp/perf-<pid>.map [count]
prints the most expensive compiled functions (self cost) with their names.
"""
import bisect
import re
import subprocess
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    profile, perfmap = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    entries = []
    with open(perfmap) as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) == 3:
                entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
    entries.sort()
    starts = [e[0] for e in entries]

    def name_of(addr):
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and entries[i][0] <= addr < entries[i][0] + entries[i][1]:
            return entries[i][2]
        return "?"

    out = subprocess.run(["callgrind_annotate", profile], capture_output=True, text=True, check=True).stdout
    shown = 0
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+\?\?\?:0x([0-9a-f]+)", line)
        if m:
            print(f"{m.group(1):>16} {m.group(2):>6}%  {name_of(int(m.group(3), 16))}")
            shown += 1
            if shown >= count:
                break


if __name__ == "__main__":
    main()
