"""Instructions per request of a tern sidecar pair (A outbound -> B inbound -> upstream),
plain or mTLS, counted by valgrind's callgrind: the stable comparison on a noisy machine.

    python3 benches/load/callgrind_pair.py --tern-bin T [--tern-control-bin C --ternctl-bin X]
        [--mode plain,mtls] [-n 20000] [--proto h1|h2c] [--rps R] [--conns C] [--cache-sim]

Each mode runs twice, with N and N/10 requests (h2load, --conns connections, default 64
as in the load benchmark's closed loop, one stream each),
with both sidecars under callgrind; the marginal cost per request ((big - small) / (N -
N/10)) excludes start-up, config, certificates and connection set-up. User-space
instructions only (kernel work is not counted). `mtls` sets the pair up as bench.py's
tern-mtls-pair does (tern-control with a CA, managed sidecars, annotated
EndpointSlices; tern-control runs natively). Output: benches/load/results/
callgrind-pair-<stamp>/ (callgrind files, per-sidecar top functions, summary.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from bench import ADDR, HOST_H1, HOST_H2C, P, Procs  # noqa: E402


# quanta (governor's clock) calibrates against the wall clock once, at the first config:
# a loop of variable length under valgrind, which showed up as ±400-700 instructions per
# request in the marginal cost. It is start-up work: taken out of every total.
CALIBRATION = "<quanta::Clock as core::default::Default>::default"


def totals(out_file: Path) -> int:
    r = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out_file)],
                       capture_output=True, text=True)
    total, calibration = None, 0
    for line in r.stdout.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(line.split()[0].replace(",", ""))
        elif CALIBRATION in line:
            calibration = max(calibration, int(line.split()[0].replace(",", "")))
    if total is None:
        raise RuntimeError(f"no totals in {out_file}")
    return total - calibration


def fn_costs(out_file: Path) -> collections.Counter:
    """Self cost by function ("file:function [object]") of one callgrind file."""
    r = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no",
                        str(out_file)], capture_output=True, text=True)
    d: collections.Counter = collections.Counter()
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            d[m.group(2)] += int(m.group(1).replace(",", ""))
    return d


def category(name: str) -> str:
    """The crate a function belongs to (by its Rust path), or libc's memcpy/malloc."""
    obj = name.rsplit("[", 1)[-1] if name.endswith("]") else ""
    fn = name.split(":", 1)[1] if ":" in name.split(" ")[0] else name
    fn = fn.rsplit(" [", 1)[0].lstrip("<&*")
    if "libc.so" in obj:
        if any(x in fn for x in ("memcpy", "memmove", "memset")):
            return "libc memcpy/memset"
        if any(x in fn for x in ("malloc", "free", "_int_", "unlink_chunk", "realloc")):
            return "libc malloc/free"
        return "libc other"
    if fn.startswith("ring_core") or "aesni" in fn or "gcm_" in fn or "_aes" in fn:
        return "ring (AES-GCM asm)"
    crate = fn.split("::", 1)[0].split(" ", 1)[0]
    crate = {"tern_proxy": "tern", "tokio_rustls": "rustls", "tokio_util": "tokio",
             "http_body_util": "http", "http_body": "http"}.get(crate, crate)
    known = ("tern", "h2", "hyper", "rustls", "ring", "tokio", "http", "bytes", "httparse",
             "core", "alloc", "std")
    return crate if crate in known else "other"


def one_run(args, mode: str, n: int, out: Path) -> dict[str, int]:
    run = out / f"{mode}-{n}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "pids").touch()
    procs = Procs(run)
    sim = ["--cache-sim=yes", "--branch-sim=yes"] if args.cache_sim else []
    if args.dump_instr:
        sim.append("--dump-instr=yes")
    vg = lambda name: ["valgrind", "--tool=callgrind", *sim,  # noqa: E731
                       f"--callgrind-out-file={out / f'{mode}-{n}-{name}.out'}"]
    names = ("ternA", "ternB1") if mode == "plain" else ("ternMA", "ternMB1")
    app = P["up_h1"] if args.proto == "h1" else P["up_h2c"]
    bname = names[1] if args.proto == "h1" else names[1].replace("B1", "B2")
    try:
        bench.start_nginx(procs, "upstream", bench.upstream_conf(run / "upstream"),
                          bench.LOAD_CPU, P["up_h1"])
        if mode == "plain":
            d = run / "conf"
            for name, ports in ((bname, P[bname]), ("ternA", P["ternA"])):
                (d / name).mkdir(parents=True, exist_ok=True)
                (d / name / "bench.yaml").write_text(bench.tern_yaml(*bench.PAIR_ENDPOINTS))
                o, i, a = ports
                procs.start(name, vg(name) + [
                    args.tern_bin, "--config-dir", str(d / name), "--outbound", f"{ADDR}:{o}",
                    "--inbound", f"{ADDR}:{i}", "--app", f"{ADDR}:{app}",
                    "--admin", f"{ADDR}:{a}", "--namespace", "bench", "--workers", "1",
                    "--drain-timeout", "1s", "--log", "warn"], bench.PROXY_CPU)
            a_name = "ternA"
        else:
            # bench.start_mtls_pair with valgrind in front of the sidecars
            orig = procs.start

            def start(name, argv, cpu):
                if name.startswith("ternM"):
                    argv = vg(name) + argv
                return orig(name, argv, cpu)
            procs.start = start
            bench.start_mtls_pair(procs, run / "conf", args.tern_bin, args.tern_control_bin,
                                  args.ternctl_bin, ready_timeout=120)
            a_name = "ternMA"
        a_port = P[a_name][0]
        for name in (a_name, bname):
            if not bench.wait_http(P[name][2], "/ready", timeout=120):
                raise RuntimeError(f"{name} not ready")
        host = HOST_H1 if args.proto == "h1" else HOST_H2C
        cmd = ["taskset", "-c", bench.LOAD_CPU, "h2load", "-n", str(n), "-c", str(args.conns),
               "-H", f":authority: {host}", f"http://{ADDR}:{a_port}/"]
        if args.proto == "h1":
            cmd.insert(4, "--h1")
        if args.rps:
            cmd.insert(4, f"--rps={args.rps / args.conns:g}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        (run / "h2load.txt").write_text(r.stdout + r.stderr)
        if f"status codes: {n} 2xx" not in r.stdout:
            raise RuntimeError(f"{mode}-{n}: not every request succeeded:\n{r.stdout[-600:]}")
        if mode == "mtls":
            print(f"  {mode}-{n}: {bname} inbound clients {bench.check_mtls(bname)}", flush=True)
    finally:
        procs.stop_all()
    time.sleep(0.5)
    res = {}
    for role, name in (("A", a_name), ("B", bname)):
        res[role] = totals(out / f"{mode}-{n}-{name}.out")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tern-bin", required=True)
    ap.add_argument("--tern-control-bin")
    ap.add_argument("--ternctl-bin")
    ap.add_argument("--mode", default="plain,mtls")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--proto", default="h1", choices=["h1", "h2c"])
    ap.add_argument("--rps", type=float, default=None,
                    help="fixed total rate (h2load --rps, over the connections) instead of "
                         "a closed loop: no batching, every request its own wake-ups")
    ap.add_argument("--conns", type=int, default=64,
                    help="client connections (the load benchmark's HTTP/1.1 closed loop: 64)")
    ap.add_argument("--dump-instr", action="store_true",
                    help="counts per instruction address, for locked.py (locked instructions)")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also simulate caches and branch prediction (slower; misses in the "
                         "callgrind files)")
    args = ap.parse_args()
    out = HERE / "results" / f"callgrind-pair-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    n, small = args.n, args.n // 10
    rows = []
    for mode in args.mode.split(","):
        big_r = one_run(args, mode, n, out)
        small_r = one_run(args, mode, small, out)
        per = {k: (big_r[k] - small_r[k]) / (n - small) for k in big_r}
        rows.append((mode, per))
        print(f"{mode}: A {per['A']:,.0f} + B {per['B']:,.0f} = {per['A'] + per['B']:,.0f} "
              f"instructions/request", flush=True)
        for role, name in (("A", "ternA" if mode == "plain" else "ternMA"),
                           ("B", ("ternB1" if mode == "plain" else "ternMB1")
                            if args.proto == "h1" else
                            ("ternB2" if mode == "plain" else "ternMB2"))):
            r = subprocess.run(["callgrind_annotate", "--inclusive=no",
                                str(out / f"{mode}-{n}-{name}.out")],
                               capture_output=True, text=True)
            (out / f"{mode}-{role}-top.txt").write_text("\n".join(r.stdout.splitlines()[:80]))
    # marginal self cost per request by crate, for every sidecar measured
    cats = {}
    for mode, _ in rows:
        for role in ("A", "B"):
            name = {("plain", "A"): "ternA", ("mtls", "A"): "ternMA"}.get((mode, role))
            if name is None:
                b = "B1" if args.proto == "h1" else "B2"
                name = f"tern{b}" if mode == "plain" else f"ternM{b}"
            big = fn_costs(out / f"{mode}-{n}-{name}.out")
            sm = fn_costs(out / f"{mode}-{small}-{name}.out")
            c: collections.Counter = collections.Counter()
            for k, v in big.items():
                c[category(k)] += (v - sm.get(k, 0)) / (n - small)
            cats[(mode, role)] = c
    cols = list(cats)
    crates = sorted({k for c in cats.values() for k in c},
                    key=lambda k: -sum(c[k] for c in cats.values()))
    both = ("plain", "A") in cats and ("mtls", "A") in cats

    def diff(k):  # mTLS minus plain, A + B
        return (f" {sum(cats[('mtls', r)][k] - cats[('plain', r)][k] for r in 'AB'):+,.0f} |"
                if both else "")
    clines = ["| crate | " + " | ".join(f"{m} {r}" for m, r in cols) + " |"
              + (" mTLS − plain (A + B) |" if both else ""),
              "| --- |" + " ---: |" * (len(cols) + both)]
    for k in crates:
        clines.append(f"| {k} | " + " | ".join(f"{cats[c][k]:,.0f}" for c in cols) + " |"
                      + diff(k))
    (out / "crates.md").write_text("\n".join(clines) + "\n")
    print("\n".join(clines))
    load = f"{args.rps:g} req/s" if args.rps else f"closed loop, {args.conns} connections"
    lines = [f"| pair ({args.proto}, {load}, marginal over {n - small:,} requests) | A | B | A + B |",
             "| --- | ---: | ---: | ---: |"]
    for mode, per in rows:
        lines.append(f"| {mode} | {per['A']:,.0f} | {per['B']:,.0f} | {per['A'] + per['B']:,.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"callgrind files and top functions: {out}")


if __name__ == "__main__":
    main()
