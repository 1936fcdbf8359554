#!/usr/bin/env bash
# Instructions per request, tern-proxy vs nginx, one HTTP/1.1 hop (client -> proxy ->
# upstream), counted by valgrind's callgrind. Instruction counts are repeatable on a
# noisy machine, unlike time: use this to judge a change to the data path.
#
#   benches/load/callgrind.sh [N] [--policies]        (default N=20000)
#
# Env: CONNS (client connections, default 64 as in the load benchmark's closed loop; rows
# measured before 2026-11-24 evening used 8), CACHE_SIM=1 (also simulate caches and
# branch prediction: misses per function in the callgrind files; slower), DUMP_INSTR=1
# (counts per instruction address, for `locked.py`: locked instructions per request).
#
# --policies adds every outbound layer to tern's config (route retry and timeout,
# BackendPolicy breaker, limits and a concurrency limit, a rate limit: as bench.py): run with and without to see
# what the layers cost.
#
# Each proxy runs under callgrind twice: with N and with N/10 requests (h2load --h1,
# CONNS connections). The marginal cost (difference / (N - N/10)) excludes start-up and
# config compilation. User-space instructions only: kernel time is not counted.
# Needs: valgrind, nginx, h2load (run.sh installs nginx and h2load), a release build.
# Output: benches/load/results/callgrind-<stamp>/ (callgrind files, top functions).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
N="${1:-20000}"
POLICIES="${2:-}"
SMALL=$((N / 10))
OUT="$HERE/results/callgrind-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/cfg"
for tool in valgrind callgrind_annotate nginx h2load curl; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
BIN="${TERN_BIN:-$ROOT/target/release/tern-proxy}"  # TERN_BIN: another build, for A/B
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -p tern-proxy)

UP=18380 TERN=18381 TERN_ADMIN=18382 NGINX=18383
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

body=$(head -c 1024 /dev/zero | tr '\0' 'A')
cat >"$OUT/upstream.conf" <<EOF
worker_processes 1;
daemon off;
error_log $OUT/upstream-error.log;
pid $OUT/upstream.pid;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "$body"; } }
}
EOF
cat >"$OUT/proxy.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
error_log $OUT/proxy-error.log;
pid $OUT/proxy.pid;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
cat >"$OUT/cfg/bench.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: upstream, namespace: bench}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: upstream-1, namespace: bench, labels: {kubernetes.io/service-name: upstream}}
addressType: IPv4
endpoints: [{addresses: ["127.0.0.1"]}]
ports: [{name: http, port: $UP}]
EOF
if [ "$POLICIES" = "--policies" ]; then
  cat >>"$OUT/cfg/bench.yaml" <<EOF
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: upstream, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: upstream, port: 80}]
  rules:
  - backendRefs: [{name: upstream, port: 80}]
    timeouts: {request: 10s}
    retry: {attempts: 2, backoff: 25ms, codes: [502, 503]}
---
apiVersion: policy.tern.dev/v1alpha1
kind: BackendPolicy
metadata: {name: upstream, namespace: bench}
spec:
  targetRefs: [{group: "", kind: Service, name: upstream}]
  circuitBreaker: {consecutiveFailures: 5}
  limits: {maxConnections: 100000, maxPendingRequests: 100000, maxRequests: 100000}
  concurrency: {maxConcurrent: 4096, maxQueue: 4096, queueTimeout: 1s}
---
apiVersion: policy.tern.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: upstream, namespace: bench}
spec:
  targetRefs: [{group: "", kind: Service, name: upstream}]
  rate: {requests: 10000000, per: 1s}
EOF
fi

nginx -c "$OUT/upstream.conf" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do curl -fs -o /dev/null "http://127.0.0.1:$UP/" && break; sleep 0.1; done

# total_instructions LABEL REQUESTS -- command...
total() {
  local label=$1 n=$2 ready=$3 authority=$4 port=$5
  shift 5
  valgrind --tool=callgrind ${CACHE_SIM:+--cache-sim=yes --branch-sim=yes} \
    ${DUMP_INSTR:+--dump-instr=yes} --callgrind-out-file="$OUT/$label.out" "$@" >"$OUT/$label.log" 2>&1 &
  local vg=$!
  PIDS+=($vg)
  for _ in $(seq 600); do curl -fs -o /dev/null "$ready" && break; sleep 0.1; done
  h2load --h1 -n "$n" -c "${CONNS:-64}" -H ":authority: $authority" "http://127.0.0.1:$port/" >"$OUT/$label.load" 2>&1
  grep -q "status codes: $n 2xx" "$OUT/$label.load" || { echo "$label: not every request succeeded" >&2; cat "$OUT/$label.load" >&2; exit 1; }
  kill -TERM "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  # quanta (governor's clock) calibrates against the wall clock once, at the first config:
  # a loop of variable length under valgrind (±400-700 instructions per request in the
  # marginal). It is start-up work: taken out of the total.
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/$label.out" 2>/dev/null | awk '
    /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
    /<quanta::Clock as core::default::Default>::default/ { gsub(",", "", $1); v = $1 + 0; if (v > cal) cal = v }
    END { print total - cal }'
}

tern_cmd=("$BIN" --config-dir "$OUT/cfg" --outbound "127.0.0.1:$TERN" --inbound 127.0.0.1:18384
  --app "127.0.0.1:$UP" --admin "127.0.0.1:$TERN_ADMIN" --workers 1 --drain-timeout 1s --log warn)
tern_ready="http://127.0.0.1:$TERN_ADMIN/ready"
nginx_cmd=(nginx -c "$OUT/proxy.conf")
nginx_ready="http://127.0.0.1:$NGINX/"

t_big=$(total tern-$N "$N" "$tern_ready" upstream.bench "$TERN" "${tern_cmd[@]}")
t_small=$(total tern-$SMALL "$SMALL" "$tern_ready" upstream.bench "$TERN" "${tern_cmd[@]}")
n_big=$(total nginx-$N "$N" "$nginx_ready" localhost "$NGINX" "${nginx_cmd[@]}")
n_small=$(total nginx-$SMALL "$SMALL" "$nginx_ready" localhost "$NGINX" "${nginx_cmd[@]}")

callgrind_annotate --inclusive=no "$OUT/tern-$N.out" >"$OUT/tern-annotate.txt" 2>/dev/null || true
sed -n 1,60p "$OUT/tern-annotate.txt" >"$OUT/tern-top.txt"
python3 - "$N" "$SMALL" "$t_big" "$t_small" "$n_big" "$n_small" <<'EOF' | tee "$OUT/summary.md"
import sys
n, small, tb, ts, nb, ns = map(int, sys.argv[1:])
tern = (tb - ts) / (n - small)
nginx = (nb - ns) / (n - small)
print(f"| proxy | instructions per request (HTTP/1.1 hop, marginal over {n - small:,} requests) |")
print("| --- | ---: |")
print(f"| nginx | {nginx:,.0f} |")
print(f"| tern-proxy | {tern:,.0f} (x{tern / nginx:.2f}) |")
EOF
echo "callgrind files and top functions: $OUT"
