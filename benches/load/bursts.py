#!/usr/bin/env python3
"""Where the fixed-rate tail comes from: bursts, and what ran on each CPU during the slow ones.

    python3 benches/load/bursts.py --out DIR [--test h1-rate-1k] [--targets nginx,tern]
        [--reps 3] [--duration 10] [--tern-bin target/release/tern-proxy] [--show 3]
        [--awake]

h2load's clients fire in step, so a fixed-rate test is a burst of `conns` requests every
`conns / rps` seconds, and a high percentile is the end of a slow burst. For each target and
rep this records the scheduler (`perf record -e sched:sched_switch,sched:sched_waking -a`,
monotonic clock, aligned with h2load's log) and prints, per target:

- burst latency (the last response of a burst, from h2load's log) at p50/p90/p99;
- the proxy's run per burst: from its first wake-up to its last switch-out (span), the
  time it was on the CPU, and how often it slept mid-burst;
- for the `--show` slowest bursts of the last rep, every switch and wake-up on both CPUs.

Switches out of the idle task are not traced on these VMs, so a run starts at the proxy's
wake-up (`sched_waking`, traced on the waker's CPU), not at its switch-in.

--awake keeps the proxies' CPU out of idle with a SCHED_IDLE spinner: on a VM whose idle is
a halt (cpuidle haltpoll with guest_halt_poll_ns=0), every wake-up of a sleeping proxy costs
an exit to the hypervisor, and this shows how much of a tail that is. It changes the
machine, not the proxies: a diagnosis, never a benchmark result.

Needs perf (Debian: linux-perf) and what bench.py needs. Not part of run.sh.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import parse  # noqa: E402

SWITCH = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_(switch|waking):\s+(.*)$")
PREV = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*==> next_comm=(.*?) next_pid=(\d+)")
WAKEE = re.compile(r"comm=(.*?) pid=(\d+) .*target_cpu=(\d+)")
GAP_S = 0.002  # runs closer than this belong to one burst (bursts are >= 2 ms apart)


def events(data: Path) -> list[tuple]:
    """(time s, cpu, kind, a, b): a switch is (prev tid, next tid), a waking (tid, cpu)."""
    out = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True,
                         text=True, check=True).stdout
    ev = []
    for line in out.splitlines():
        m = SWITCH.match(line)
        if not m:
            continue
        t, cpu, kind, rest = float(m[4]), int(m[3]), m[5], m[6]
        if kind == "switch":
            p = PREV.search(rest)
            if p:
                ev.append((t, cpu, kind, (p[1], int(p[2])), (p[3], int(p[4]))))
        else:
            w = WAKEE.search(rest)
            if w:
                ev.append((t, cpu, kind, (w[1], int(w[2])), int(w[3])))
    ev.sort(key=lambda e: e[0])
    return ev


def proxy_runs(ev: list[tuple], tids: set[int]) -> list[list[float]]:
    """Bursts of the proxy: [start, end, on-CPU seconds, runs]."""
    runs, cur = [], None
    for t, _cpu, kind, a, b in ev:
        if kind == "waking":
            if a[1] in tids and cur is None:
                cur = t
            continue
        if a[1] in tids:
            if cur is not None:
                runs.append((cur, t))
            cur = None
        if b[1] in tids and cur is None:
            cur = t
    bursts: list[list[float]] = []
    for s, e in runs:
        if bursts and s - bursts[-1][1] < GAP_S:
            b = bursts[-1]
            b[1], b[2], b[3] = e, b[2] + e - s, b[3] + 1
        else:
            bursts.append([s, e, e - s, 1])
    return bursts


def log_bursts(rows: list[tuple[int, int]], offset: float) -> list[tuple[float, float]]:
    """(start, end) of each burst of h2load's log `rows`, in the monotonic clock perf used."""
    out: list[list[int]] = []
    for s, d in sorted(rows):
        if out and s - out[-1][0] < GAP_S * 1e6:
            out[-1][1] = max(out[-1][1], s + d)
        else:
            out.append([s, s + d])
    return [(s / 1e6 - offset, e / 1e6 - offset) for s, e in out]


def pcts(name: str, us: list[float]) -> dict:
    """`name`_p50/p90/p99_us of `us` (nan when empty)."""
    return {f"{name}_p{p}_us": round(parse.percentile(us, p)) if us else float("nan")
            for p in (50, 90, 99)}


def timeline(ev: list[tuple], start: float, end: float) -> list[str]:
    lines = []
    for t, cpu, kind, a, b in ev:
        if t < start - 100e-6 or t > end + 50e-6:
            continue
        what = (f"{a[0]} -> {b[0]}" if kind == "switch"
                else f"wakes {a[0]} (to cpu{b})")
        lines.append(f"  {(t - start) * 1e6:8.1f} us  cpu{cpu}  {what}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--test", default="h1-rate-1k")
    ap.add_argument("--targets", default="nginx,tern")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--tern-bin", default=str(HERE.parents[1] / "target/release/tern-proxy"))
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--awake", action="store_true")
    args = ap.parse_args()
    test = bench.TESTS[args.test]
    if not test.rps:
        sys.exit(f"{args.test} is not a fixed-rate test")
    run = Path(args.out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    every = bench.make_targets()
    targets = {n: every[n] for n in args.targets.split(",")}
    procs = bench.Procs(run)
    spinner = None
    if args.awake:
        spinner = subprocess.Popen(["chrt", "-i", "0", "taskset", "-c", bench.PROXY_CPU,
                                    sys.executable, "-c", "while True: pass"])
    results = []
    try:
        os.sync()
        bench.start_all(procs, run / "conf", targets, args.tern_bin, None)
        for rep in range(args.reps):
            for name, target in targets.items():
                pids = [p for n in target.procs[test.proto] for p in procs.tree(n)]
                tids = {int(t) for p in pids for t in os.listdir(f"/proc/{p}/task")}
                bench.run_load(bench.load_cmd(target, test, 1, None), 60)  # warm-up
                data, log = run / f"{name}_r{rep}.perf", run / f"{name}_r{rep}.h2log"
                rec = subprocess.Popen(
                    ["perf", "record", "-q", "-k", "mono", "-e", "sched:sched_switch",
                     "-e", "sched:sched_waking", "-a", "-o", str(data), "--",
                     "sleep", str(args.duration + 1)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                bench.run_load(bench.load_cmd(target, test, args.duration, log),
                               args.duration + 60)
                if rec.wait() != 0:
                    raise RuntimeError("perf record failed")
                offset = time.time() - time.monotonic()
                ev = events(data)
                runs = proxy_runs(ev, tids)
                with open(log) as f:
                    rows = parse.h2load_log_rows(f)
                lat = log_bursts(rows, offset)
                durs = [d for _, d in rows]
                r = {
                    "target": name, "rep": rep, "awake": args.awake,
                    "p50_ms": parse.percentile(durs, 50) / 1e3,
                    "p99_ms": parse.percentile(durs, 99) / 1e3,
                    "bursts": len(lat),
                    **pcts("burst", [(e - s) * 1e6 for s, e in lat]),
                    **pcts("span", [(b[1] - b[0]) * 1e6 for b in runs]),
                    **pcts("oncpu", [b[2] * 1e6 for b in runs]),
                    "sleeps_per_burst": round(sum(b[3] - 1 for b in runs) / max(1, len(runs)), 2),
                }
                results.append(r)
                print(json.dumps(r), flush=True)
                if rep == args.reps - 1 and args.show:
                    lo, hi = ev[0][0], ev[-1][0]
                    slow = sorted((x for x in lat if lo < x[0] < hi),
                                  key=lambda x: x[1] - x[0])[-args.show:]
                    for s, e in reversed(slow):
                        print(f"{name}: burst of {(e - s) * 1e6:.0f} us")
                        print("\n".join(timeline(ev, s, e)))
    finally:
        procs.stop_all()
        if spinner:
            spinner.kill()
    with open(run / "bursts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
