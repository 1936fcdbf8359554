#!/usr/bin/env bash
# Control-plane scale benchmark: tern-control against 10,000 simulated sidecars.
#
#   benches/control/run.sh                  # full run (about 1-2 min after the build)
#   benches/control/run.sh --sidecars 2000 --duration 10 --no-build
#
# Generates a config directory with --services Services (Service + EndpointSlice with 2
# endpoints + HTTPRoute each, namespace bench), starts tern-control on CPU 0, runs
# tern-sidecar-sim on CPU 1 (connect ramp, changes to bench/svc-0 every --change-every
# seconds for --duration seconds, then a reconnect storm), samples tern-control's CPU
# and memory from /proc, and prints a Markdown table. Everything goes to
# benches/control/results/<timestamp>/ (git-ignored). Every process it starts is
# stopped at the end, also on Ctrl-C or error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

sidecars=10000
services=1000
per_sidecar=3
connect_rate=2000
duration=20
change_every=2
storm=1
storm_resume=0
build=1
listen=127.0.0.1:18180
admin=127.0.0.1:18181
control_cpu=0
sim_cpu=1
extra_control_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    --sidecars) sidecars=$2; shift 2 ;;
    --services) services=$2; shift 2 ;;
    --services-per-sidecar) per_sidecar=$2; shift 2 ;;
    --connect-rate) connect_rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --change-every) change_every=$2; shift 2 ;;
    --no-storm) storm=0; shift ;;
    --storm-resume) storm_resume=1; shift ;;
    --no-build) build=0; shift ;;
    --listen) listen=$2; shift 2 ;;
    --admin) admin=$2; shift 2 ;;
    --control-arg) extra_control_args+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done

target=${CARGO_TARGET_DIR:-$root/target}
control_bin=$target/release/tern-control
sim_bin=$target/release/tern-sidecar-sim
ts=$(date -u +%Y%m%d-%H%M%S)
out=$here/results/$ts
mkdir -p "$out"
cfg=$out/config

pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$build" = 1 ]; then
  echo "run.sh: building release binaries (target dir $target)" >&2
  (cd "$root" && cargo build --release -p tern-benches --bin tern-sidecar-sim)
  if ! (cd "$root" && cargo build --release -p tern-control --bin tern-control) >"$out/build-control.log" 2>&1; then
    echo "run.sh: tern-control does not build; see $out/build-control.log" >&2
    tail -20 "$out/build-control.log" >&2
    exit 1
  fi
fi
for b in "$control_bin" "$sim_bin"; do
  [ -x "$b" ] || { echo "run.sh: missing $b (drop --no-build)" >&2; exit 1; }
done

# 10,000 streams ride on ~50 connections, but leave room anyway.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

"$sim_bin" --generate "$cfg" --services "$services"

echo "run.sh: starting tern-control on CPU $control_cpu" >&2
taskset -c "$control_cpu" "$control_bin" --config-dir "$cfg" --listen "$listen" --admin "$admin" \
  "${extra_control_args[@]}" >"$out/tern-control.log" 2>&1 &
cp_pid=$!
pids+=("$cp_pid")
echo "$cp_pid" >"$out/pids"

# Wait (bounded) for the gRPC port, then for /ready (its config loaded: before that it
# answers UNAVAILABLE).
python3 - "$listen" "$admin" <<'EOF'
import socket, sys, time, urllib.request
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.time() + 30
while time.time() < deadline:
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("run.sh: tern-control did not listen within 30 s")
while time.time() < deadline:
    try:
        if urllib.request.urlopen(f"http://{sys.argv[2]}/ready", timeout=0.5).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
print("run.sh: tern-control not ready after 30 s; starting anyway", file=sys.stderr)
EOF
kill -0 "$cp_pid" || { echo "run.sh: tern-control exited; see $out/tern-control.log" >&2; exit 1; }

# Sampler: utime+stime, VmRSS and VmHWM of tern-control every 250 ms; its own count of
# connected sidecars (/metrics) every second.
python3 - "$cp_pid" "$out/samples.tsv" "$admin" <<'EOF' &
import os, sys, time, urllib.request
pid, path, admin = sys.argv[1], sys.argv[2], sys.argv[3]
tck = os.sysconf("SC_CLK_TCK")
connected, k = -1, 0
with open(path, "w") as f:
    f.write("t\tcpu_s\trss_kb\thwm_kb\tconnected\n")
    while True:
        if k % 4 == 0:
            try:
                body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=0.5).read().decode()
                connected = next(int(float(l.split()[-1])) for l in body.splitlines()
                                 if l.startswith("tern_control_sidecars_connected"))
            except Exception:
                connected = -1
        k += 1
        try:
            st = open(f"/proc/{pid}/stat").read()
            fields = st[st.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / tck
            rss = hwm = 0
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        except (OSError, ValueError):
            break
        f.write(f"{time.time():.3f}\t{cpu:.2f}\t{rss}\t{hwm}\t{connected}\n")
        f.flush()
        time.sleep(0.25)
EOF
pids+=("$!")

sim_args=(--control-plane "$listen" --sidecars "$sidecars" --services "$services"
  --services-per-sidecar "$per_sidecar" --connect-rate "$connect_rate" --duration "$duration"
  --change-file "$cfg/svc-0.yaml" --change-every "$change_every" --json)
[ "$storm" = 1 ] && sim_args+=(--storm)
[ "$storm_resume" = 1 ] && sim_args+=(--storm-resume)
echo "run.sh: tern-sidecar-sim ${sim_args[*]} (CPU $sim_cpu)" >&2
sim_start=$(date +%s.%N)
set +e
timeout 240 taskset -c "$sim_cpu" "$sim_bin" "${sim_args[@]}" >"$out/sim.json" 2>"$out/sim.log"
sim_rc=$?
set -e
sim_end=$(date +%s.%N)
[ "$sim_rc" = 0 ] || { echo "run.sh: simulator exited with $sim_rc; see $out/sim.log" >&2; tail -5 "$out/sim.log" >&2; }

# Admin endpoints, for the record (bounded).
python3 - "$admin" "$out" <<'EOF' || true
import sys, urllib.request
admin, out = sys.argv[1], sys.argv[2]
for path in ("metrics", "sidecars"):
    try:
        body = urllib.request.urlopen(f"http://{admin}/{path}", timeout=5).read()
        open(f"{out}/{path}.txt", "wb").write(body)
    except Exception as e:
        print(f"run.sh: /{path}: {e}", file=sys.stderr)
EOF
alive=yes
kill -0 "$cp_pid" 2>/dev/null || alive="no (see tern-control.log)"
cleanup
pids=()

python3 - "$out" "$sim_start" "$sim_end" "$alive" "$sidecars" "$services" "$per_sidecar" <<'EOF' | tee "$out/summary.md"
import json, sys, time
out, t0, t1, alive, n, services, per = sys.argv[1:8]
t0, t1 = float(t0), float(t1)
try:
    sim = json.load(open(f"{out}/sim.json"))
except (OSError, ValueError):
    sim = {}
rows = [l.split("\t") for l in open(f"{out}/samples.tsv").read().splitlines()[1:]]
rows = [(float(a), float(b), int(c), int(d), int(e)) for a, b, c, d, e in rows]
peak_connected = max((r[4] for r in rows), default=-1)
win = [r for r in rows if t0 <= r[0] <= t1] or rows
cpu_avg = cpu_peak = float("nan")
if len(win) >= 2:
    cpu_avg = 100 * (win[-1][1] - win[0][1]) / (win[-1][0] - win[0][0])
    # Busiest one-second window.
    j = 0
    cpu_peak = 0.0
    for i in range(len(win)):
        while win[i][0] - win[j + 1][0] >= 1.0:
            j += 1
        if win[i][0] - win[j][0] >= 0.9:
            cpu_peak = max(cpu_peak, 100 * (win[i][1] - win[j][1]) / (win[i][0] - win[j][0]))
hwm = max((r[3] for r in rows), default=0) / 1024
rss_end = rows[-1][2] / 1024 if rows else float("nan")

def f(v, unit="", nd=0):
    if v is None or v != v:
        return "n/a"
    return f"{v:,.{nd}f}{unit}"

def met(ok):
    return "**met**" if ok else "**missed**"

c = sim.get("connect", {})
ch = sim.get("change", {})
lat = ch.get("latency", {})
st = sim.get("storm", {})
n = int(n)
p99 = lat.get("p99_ms")
print(f"### Control plane at scale — {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(t0))}")
print()
print(f"{n:,} simulated sidecars, {int(services):,} services, {per} calls each "
      f"(+ bench/svc-0 for 10 %: {ch.get('subscribers', 'n/a')} subscribers); "
      f"tern-control on CPU 0, simulator on CPU 1.")
print()
print("| measure | value | target |")
print("| --- | ---: | --- |")
print(f"| sidecars connected (simulator / tern-control's peak `tern_control_sidecars_connected`) | "
      f"{c.get('connected', 0):,} / {f(peak_connected) if peak_connected >= 0 else 'n/a'} | {n:,} |")
print(f"| time to connect all (ramp {f(c.get('ramp_s'), ' s', 1)}) | {f(c.get('all_connected_s'), ' s', 2)} | |")
print(f"| change-to-ACK p50 / p90 | {f(lat.get('p50_ms'), ' ms', 1)} / {f(lat.get('p90_ms'), ' ms', 1)} | |")
ok = p99 is not None and p99 <= 1000 and ch.get("all_converged")
print(f"| change-to-ACK p99 / max | {f(p99, ' ms', 1)} / {f(lat.get('max_ms'), ' ms', 1)} "
      f"({lat.get('count', 0):,} ACKs over {ch.get('changes', 0)} changes, all converged: "
      f"{'yes' if ch.get('all_converged') else 'no'}) | p99 <= 1 s: {met(ok) if p99 is not None else 'n/a'} |")
print(f"| pushes to sidecars not calling the changed service | {ch.get('pushes_to_non_subscribers', 'n/a')} | 0 |")
print(f"| control plane peak RSS (VmHWM) / at end | {f(hwm, ' MB', 1)} / {f(rss_end, ' MB', 1)} | <= 512 MB: {met(hwm <= 512)} |")
print(f"| control plane CPU, average over the run / busiest second | {f(cpu_avg, ' %')} / {f(cpu_peak, ' %')} of one core | within one core |")
if st:
    conv = st.get("converged_s")
    what = "resume with their version, all streams accepted" if st.get("resume") else "all have config again"
    print(f"| storm: {n:,} reconnect at once, {what} | {st.get('reconnected', 0):,} in "
          f"{f(st.get('last_first_push_s'), ' s', 2)} (p50 {f(st.get('per_sidecar', {}).get('p50_ms'), ' ms')}) "
          f"| <= 30 s: {met(conv is not None and conv == conv and conv <= 30)} |")
    errs = st.get("errors", {})
    print(f"| storm: rejected/failed streams (retried) | {', '.join(f'{k} {v:,}' for k, v in errs.items()) or 'none'} | |")
print(f"| connect: rejected/failed streams (retried) | {', '.join(f'{k} {v:,}' for k, v in c.get('errors', {}).items()) or 'none'} | |")
print(f"| tern-control alive at the end | {alive} | yes |")
print()
print(f"Raw: `{out}` (sim.json, samples.tsv, tern-control.log, metrics.txt, sidecars.txt).")
EOF
