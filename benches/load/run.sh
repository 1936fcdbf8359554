#!/usr/bin/env bash
# Tern load benchmark: tern-proxy vs nginx vs HAProxy on loopback, side by side.
# See docs/benchmarks.md. Not part of any test command.
#
#   benches/load/run.sh                 # full run (3 reps x 5 s per cell, < 15 min)
#   benches/load/run.sh --quick         # smoke run, 2-3 min
#   benches/load/run.sh --reps 5 --duration 10
#   options: --reps N --duration S --warmup S --tests a,b --targets a,b
#            --idle 64,1000,10000 (or '' to skip) --no-build --no-install
#   binaries: $CARGO_TARGET_DIR/release (default target/release): tern-proxy, and
#   tern-control + ternctl for the tern-mtls-pair target
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RESULTS="$HERE/results"

REPS=3 DURATION=5 WARMUP=1 TESTS="" TARGETS="" IDLE="64,1000,10000"
BUILD=1 INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) REPS=1 DURATION=2 WARMUP=0.5 IDLE="64,1000" ;;
    --reps) REPS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --tests) TESTS="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --idle) IDLE="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done

# --- tools -------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v pgrep >/dev/null || need+=(procps)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$INSTALL" = 1 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # the nginx/haproxy packages may start system services on :80; stop them if so
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      $SUDO systemctl stop nginx haproxy 2>/dev/null || true
    fi
  else
    echo "missing tools: ${need[*]} (rerun without --no-install)" >&2; exit 1
  fi
fi

if [ "$(nproc)" -lt 2 ]; then
  echo "warning: fewer than 2 CPUs: proxy and load generator share a core" >&2
fi

# --- tern-proxy, tern-control, ternctl ------------------------------------------
# CARGO_TARGET_DIR is honoured (binaries built elsewhere: set it, add --no-build)
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac
BIN_DIR="$BIN_DIR/release"
TERN_BIN="$BIN_DIR/tern-proxy"
TERN_ERR=""
if [ "$BUILD" = 1 ]; then
  echo "building tern-proxy and tern-control (release) in $BIN_DIR..."
  # pipefail: a failed cargo fails the pipeline
  if ! (cd "$ROOT" && cargo build --release -p tern-proxy 2>&1 | tail -n 3); then
    TERN_ERR="cargo build --release -p tern-proxy failed"
  fi
  # tern-control and ternctl: only the tern-mtls-pair target needs them
  (cd "$ROOT" && cargo build --release -p tern-control 2>&1 | tail -n 3) ||
    echo "warning: cargo build --release -p tern-control failed; tern-mtls-pair will not run" >&2
fi
if [ -z "$TERN_ERR" ] && [ ! -x "$TERN_BIN" ]; then TERN_ERR="$TERN_BIN not found"; fi
if [ -n "$TERN_ERR" ]; then
  echo "warning: $TERN_ERR; tern targets will be reported as not run" >&2
fi

# --- run -----------------------------------------------------------------------
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS/$STAMP"
mkdir -p "$OUT"
: > "$OUT/pids"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${PY_PID:-}" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill -TERM "$PY_PID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PY_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$PY_PID" 2>/dev/null || true
  fi
  # anything the driver started and did not stop (recorded one pid a line)
  if [ -s "$OUT/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] || continue
      if kill -0 "$pid" 2>/dev/null; then
        # the children first (nginx workers), then the process itself
        pkill -KILL -P "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done < "$OUT/pids"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

args=(--out "$OUT" --reps "$REPS" --duration "$DURATION" --warmup "$WARMUP"
      --idle "$IDLE" --latest "$RESULTS")
[ -n "$TESTS" ] && args+=(--tests "$TESTS")
[ -n "$TARGETS" ] && args+=(--targets "$TARGETS")
if [ -z "$TERN_ERR" ]; then args+=(--tern-bin "$TERN_BIN"); else args+=(--tern-error "$TERN_ERR"); fi
args+=(--tern-control-bin "$BIN_DIR/tern-control" --ternctl-bin "$BIN_DIR/ternctl")

echo "results: $OUT"
# the driver (and so the asyncio idle-connection client) runs on the load CPU
taskset -c 0 python3 "$HERE/bench.py" "${args[@]}" &
PY_PID=$!
wait "$PY_PID"
