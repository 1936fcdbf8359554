#!/usr/bin/env bash
# Where does tern-proxy spend its CPU? Sample one tern hop under wrk load with perf.
#
#   benches/load/profile.sh [SECONDS] [h1|h2c]     (default 10 h1)
#
# Needs: perf (apt-get install linux-perf), the tools run.sh installs, a release build
# (target/release/tern-proxy; built with debug line tables so symbols resolve).
# Uses the software clock event (cpu-clock): VMs often have no hardware counters.
# Output: benches/load/results/profile-<stamp>/{perf.data,report.txt}. Not a test.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SECS="${1:-10}" PROTO="${2:-h1}"
OUT="$HERE/results/profile-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 1; }
BIN="$ROOT/target/release/tern-proxy"
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -p tern-proxy)

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# upstream + tern, from bench.py's own config generators (same ports as run.sh: do not run both at once)
HERE="$HERE" python3 -c "
import sys, os; sys.path.insert(0, os.environ['HERE'])
from pathlib import Path
import bench
out = Path('$OUT')
bench.upstream_conf(out / 'upstream')
d = out / 'tern'; d.mkdir(parents=True, exist_ok=True)
(d / 'bench.yaml').write_text(bench.tern_yaml(bench.P['up_h1'], bench.P['up_h2c']))
"
taskset -c 0 nginx -c "$OUT/upstream/nginx.conf" -p "$OUT/upstream" >"$OUT/upstream.log" 2>&1 &
PIDS+=($!)
taskset -c 1 "$BIN" --config-dir "$OUT/tern" --outbound 127.0.0.1:18140 --inbound 127.0.0.1:18141 \
  --app 127.0.0.1:18080 --admin 127.0.0.1:18142 --namespace bench --workers 1 \
  --drain-timeout 1s --log warn >"$OUT/tern.log" 2>&1 &
TERN=$!
PIDS+=($TERN)
for _ in $(seq 100); do
  curl -fs http://127.0.0.1:18142/ready >/dev/null 2>&1 && break; sleep 0.1
done

if [ "$PROTO" = h1 ]; then
  LOAD=(taskset -c 0 wrk -t1 -c64 -d"$((SECS + 2))"s -H "Host: upstream.bench" http://127.0.0.1:18140/)
else
  LOAD=(taskset -c 0 h2load -t1 -c16 -m4 -D"$((SECS + 2))" -H ":authority: upstream-h2c.bench" http://127.0.0.1:18140/)
fi
"${LOAD[@]}" >"$OUT/load.txt" 2>&1 &
PIDS+=($!)
sleep 1
perf record -e cpu-clock -F 1999 -g -p "$TERN" -o "$OUT/perf.data" -- sleep "$SECS" 2>"$OUT/perf-record.log"
wait "${PIDS[-1]}" || true
perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
  | grep -v '^$' | grep -E '^ +[0-9]' | head -40 > "$OUT/report.txt" || true
perf report -i "$OUT/perf.data" --children --sort symbol --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' | head -60 > "$OUT/report-children.txt" || true
echo "== self time (top 40) =="; cat "$OUT/report.txt"
echo "== including children (top 60) =="; cat "$OUT/report-children.txt"
echo "load:"; grep -E "requests in|Requests/sec|finished in|requests:" "$OUT/load.txt" || true
