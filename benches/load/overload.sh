#!/usr/bin/env bash
# Overload benchmark: offer ten times an upstream's capacity through tern-proxy and see
# what the admitted requests, the shed requests and the proxy's memory do.
#
#   benches/load/overload.sh            (about 30 s; release builds)
#
# The upstream (tern-demo-app) answers after 20 ms; a ConcurrencyPolicy admits 8 at once
# with a queue of 4 waiting at most 20 ms, so capacity is 8 / 20 ms = 400 req/s.
#  1. unloaded: 200 req/s for 5 s   -> p99 of admitted requests
#  2. overload: 4,000 req/s for 10 s (open loop, tern-overload) -> p99 of admitted and
#     of shed (503) requests, peak RSS of the proxy
# Targets (issue 6): admitted p99 under overload within 2x the unloaded p99; shed
# requests answered within a millisecond or two; memory bounded.
# tern-proxy runs on CPU 0 (one worker); the app and the generator on CPU 1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$HERE/results/overload-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/cfg"
(cd "$ROOT" && cargo build --release -q -p tern-proxy -p tern-demo -p tern-benches --bin tern-proxy --bin tern-demo-app --bin tern-overload)
BIN="$ROOT/target/release"
APP=18480 OUTB=18481 INB=18482 ADMIN=18483
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

cat >"$OUT/cfg/overload.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: slow, namespace: bench}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: slow-1, namespace: bench, labels: {kubernetes.io/service-name: slow}}
addressType: IPv4
endpoints: [{addresses: ["127.0.0.1"]}]
ports: [{name: http, port: $APP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: slow, port: 80}]
  rules:
  - backendRefs: [{name: slow, port: 80}]
---
apiVersion: policy.tern.dev/v1alpha1
kind: ConcurrencyPolicy
metadata: {name: slow, namespace: bench}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: slow}]
  maxConcurrent: 8
  maxQueue: 4
  queueTimeout: 20ms
YAML

taskset -c 1 "$BIN/tern-demo-app" --listen "127.0.0.1:$APP" --name slow --latency-ms 20 >"$OUT/app.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN/tern-proxy" --config-dir "$OUT/cfg" --outbound "127.0.0.1:$OUTB" --inbound "127.0.0.1:$INB" \
  --app "127.0.0.1:$APP" --admin "127.0.0.1:$ADMIN" --namespace bench --workers 1 --log warn >"$OUT/proxy.log" 2>&1 &
PROXY=$!
PIDS+=($PROXY)
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$ADMIN/ready" && break; sleep 0.1; done

rss() { awk '/VmRSS/ {print $2}' "/proc/$PROXY/status"; }
gen() { taskset -c 1 "$BIN/tern-overload" --target "127.0.0.1:$OUTB" --host slow.bench "$@"; }

gen --rate 100 --duration 2 >/dev/null # warm-up
rss_before=$(rss)
gen --rate 200 --duration 5 | tee "$OUT/unloaded.json"
peak=$rss_before
( while kill -0 "$PROXY" 2>/dev/null; do r=$(rss); echo "$r"; sleep 0.2; done ) >"$OUT/rss.samples" &
SAMPLER=$!
gen --rate 4000 --duration 10 | tee "$OUT/overload.json"
kill "$SAMPLER" 2>/dev/null || true
peak=$(sort -n "$OUT/rss.samples" | tail -1)
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^tern_shed_total|^tern_concurrency_limit' >"$OUT/metrics.txt" || true

python3 - "$OUT" "$rss_before" "$peak" <<'PY' | tee "$OUT/summary.md"
import json, sys
out, before, peak = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = json.load(open(f"{out}/unloaded.json"))
o = json.load(open(f"{out}/overload.json"))
up99 = u["admitted"]["p99_ms"]
op99 = o["admitted"]["p99_ms"]
sp99 = o["shed"]["p99_ms"]
print("| measure | value | target |")
print("| --- | ---: | --- |")
print(f"| admitted p99, unloaded (200 req/s) | {up99:.1f} ms | |")
print(f"| admitted p99, 10x overload (4,000 req/s offered) | {op99:.1f} ms (x{op99 / up99:.2f}) | <= x2 |")
print(f"| admitted / shed / other / errors under overload | {o['admitted']['count']} / {o['shed']['count']} / {o['other']['count']} / {o['errors']} | |")
if sp99 is not None:
    print(f"| shed p50 / p99 | {o['shed']['p50_ms']:.2f} / {sp99:.2f} ms | <= 2 ms |")
print(f"| proxy RSS before / peak under overload | {before / 1024:.1f} / {peak / 1024:.1f} MB | bounded |")
PY
echo "results: $OUT"
