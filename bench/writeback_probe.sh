#!/bin/bash
# Issue 14: does extract keep its speed when other writes have just filled the page cache with
# dirty pages, and does writeback pacing (SAFEGENE_WRITEBACK) help? Interleaved rounds of
#   alone: extract of a 1.2 GB bf16 pair (inputs warm in the page cache, nothing dirty)
#   junk:  the same right after `dd` wrote 5 GiB without syncing
# for each SAFEGENE_WRITEBACK mode; prints one line per run ("seconds condition mode") and the
# medians. Usage: bash bench/writeback_probe.sh [WORKDIR] [ROUNDS]  (about 3 min at 5 rounds)
set -euo pipefail
W=${1:-/tmp/safegene-writeback}
ROUNDS=${2:-5}
mkdir -p "$W"
python -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from bench_stream import make_family
make_family(Path('$W/fam'), 1.2)"
F=$W/fam/1.2gb
run() {
  rm -rf "$W/gene"; sync
  cat "$F/aligned/model.safetensors" "$F/degraded/model.safetensors" > /dev/null
  if [ "$1" = junk ]; then dd if=/dev/zero of="$W/junk" bs=16M count=320 status=none; fi
  /usr/bin/time -f "%e $1 $2" env SAFEGENE_WRITEBACK="$2" safegene extract "$F/aligned" "$F/degraded" -o "$W/gene" --quiet 2>&1 | tail -1
  rm -f "$W/junk"; sync
}
for _ in $(seq "$ROUNDS"); do for m in off kick pace; do run junk $m; run alone $m; done; done | tee "$W/runs.txt"
python - "$W/runs.txt" <<'PY'
import collections, statistics, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    t, cond, mode = line.split()
    d[(cond, mode)].append(float(t))
for (cond, mode), v in sorted(d.items()):
    print(f"{cond:>5} {mode:<5} median {statistics.median(v):.2f} s of {len(v)}: {v}")
PY
