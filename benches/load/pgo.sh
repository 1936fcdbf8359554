#!/usr/bin/env bash
# A profile-guided (PGO) build of tern-proxy, to compare with the plain release build:
#
#   benches/load/pgo.sh        -> target/pgo/tern-proxy (about 7 minutes on 2 cores)
#   PGO_TRAIN="--tests h1-rate-1k --targets tern" PGO_OUT=target/pgo-alt benches/load/pgo.sh
#   python3 benches/load/bench.py --out DIR --tern-bin target/pgo/tern-proxy ...
#
# Builds an instrumented tern-proxy, trains it on a short bench.py run (HTTP/1.1 and h2c,
# one hop and the pair, every policy, 3 s each), merges the profile and builds again with
# it. The training traffic is the benchmark's own, which flatters the result: a release
# pipeline would train on traffic like production's. Not used by run.sh or the tests.
# Needs: llvm-profdata of rustc's LLVM major version (Debian: apt-get install llvm-N), and
# the tools run.sh installs (nginx, wrk, h2load).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${PGO_OUT:-$ROOT/target/pgo}"
# Absolute: the training run hands paths under it to nginx, which runs elsewhere.
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

LLVM_MAJOR="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
PROFDATA="$(command -v "llvm-profdata-$LLVM_MAJOR" || true)"
if [ -z "$PROFDATA" ]; then
  echo "llvm-profdata-$LLVM_MAJOR not found: rustc uses LLVM $LLVM_MAJOR (apt-get install llvm-$LLVM_MAJOR)" >&2
  exit 1
fi
PROFILES="$OUT/profiles"
mkdir -p "$OUT"

echo "== instrumented build"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR="$ROOT/target/pgo-gen" \
  cargo build --release -p tern-proxy)
# Build scripts ran instrumented too: only the training run's profiles count.
rm -rf "$PROFILES" "$OUT/train"

echo "== training run"
# PGO_TRAIN: other bench.py selections to train on (default: the benchmark's own closed
# loops, hop and pair), e.g. "--tests h1-rate-1k,h2c-rate-5k --targets tern".
# shellcheck disable=SC2086
taskset -c 0 python3 "$HERE/bench.py" --out "$OUT/train" --reps 1 --duration 3 \
  ${PGO_TRAIN:---tests h1-closed,h2c-closed --targets tern,tern-pair} --idle "" \
  --tern-bin "$ROOT/target/pgo-gen/release/tern-proxy" >"$OUT/train.log" 2>&1 \
  || { echo "training run failed: see $OUT/train.log" >&2; exit 1; }
"$PROFDATA" merge -o "$OUT/merged.profdata" "$PROFILES"/*.profraw

echo "== optimised build"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" CARGO_TARGET_DIR="$ROOT/target/pgo-use" \
  cargo build --release -p tern-proxy)
cp "$ROOT/target/pgo-use/release/tern-proxy" "$OUT/tern-proxy"
echo "PGO build: $OUT/tern-proxy"
