#!/usr/bin/env python3
"""Locked (atomic read-modify-write) instructions per request, from a callgrind.sh run
made with DUMP_INSTR=1.

    DUMP_INSTR=1 benches/load/callgrind.sh 20000 --policies
    python3 benches/load/locked.py benches/load/results/callgrind-<stamp> [--top 20]

or, for the two sidecars of a pair, `callgrind_pair.py --dump-instr` and its output
directory. The addresses are read from the binaries the profile names, as they are now:
run it before rebuilding, or the counts are meaningless.

A locked instruction waits for the store buffer to drain and costs about 20 times a plain
one, so two programs with the same instruction count can differ in time by how many they
run. The addresses of every `lock`-prefixed instruction (and of `xchg` with memory,
locked implicitly) are taken from `objdump -d` of each binary the profile names (tern-proxy,
nginx, libc); callgrind's per-address counts are summed over them, for the N and the N/10
run, and the difference is divided by the requests between them, as callgrind.sh does for
instructions. Prints the total per program and the functions that run the most.
"""
import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

LOCKED = re.compile(r"\s+([0-9a-f]+):\s+(lock |xchg\s+%\w+,-?\w*\(|xchg\s+-?\w*\(.*\),)")


def locked_addresses(binary: str) -> set[int]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary],
                         capture_output=True, text=True, check=True).stdout
    return {int(m.group(1), 16) for line in out.splitlines() if (m := LOCKED.match(line))}


def per_function(path: Path, cache: dict) -> collections.Counter:
    """Locked instructions executed, by function, in one callgrind file (object-relative
    instruction addresses, as --dump-instr=yes writes them)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    ob = fn = None
    last = 0
    skip_next = False
    counts: collections.Counter = collections.Counter()
    for line in path.open():
        head = line[:4]
        if head in ("ob=(", "fn=(", "cob=", "cfn="):
            m = re.match(r"c?(ob|fn)=\((\d+)\)(?: (.*))?", line.strip())
            if m:
                kind, ident, name = m.groups()
                if name:
                    names[kind][ident] = name
                if not line.startswith("c"):
                    if kind == "ob":
                        ob = names["ob"].get(ident)
                    else:
                        fn = names["fn"].get(ident)
            continue
        if line.startswith("calls="):
            skip_next = True  # the next cost line is the call's inclusive cost
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        parts = line.split()
        pos = parts[0]
        if pos.startswith("0x"):
            addr = int(pos, 16)
        elif pos[0] == "+":
            addr = last + int(pos[1:])
        elif pos[0] == "-":
            addr = last - int(pos[1:])
        elif pos == "*":
            addr = last
        else:
            addr = int(pos)
        last = addr
        if skip_next:
            skip_next = False
            continue
        if ob is None or len(parts) < 3:
            continue
        if ob not in cache:
            try:
                cache[ob] = locked_addresses(ob)
            except (OSError, subprocess.CalledProcessError):
                cache[ob] = set()
        if addr in cache[ob]:
            counts[fn] += int(parts[2])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    cache: dict = {}
    # callgrind.sh names its files <program>-<requests>.out; callgrind_pair.py
    # <mode>-<requests>-<sidecar>.out. A program's two runs differ only in the number.
    groups: dict[str, list[tuple[int, Path]]] = collections.defaultdict(list)
    for p in args.dir.glob("*.out"):
        m = re.fullmatch(r"(.*?)-(\d+)(-.*)?", p.stem)
        if m:
            groups[m.group(1) + (m.group(3) or "")].append((int(m.group(2)), p))
    for prog, found in sorted(groups.items()):
        if len(found) != 2:
            continue
        (n_small, small), (n_big, big) = sorted(found)
        s, b = per_function(small, cache), per_function(big, cache)
        if not b:
            sys.exit(f"{big}: no per-instruction counts (run callgrind.sh with DUMP_INSTR=1)")
        n = n_big - n_small
        total = (sum(b.values()) - sum(s.values())) / n
        print(f"{prog}: {total:.1f} locked instructions per request")
        for f in sorted(b, key=lambda k: -(b[k] - s.get(k, 0)))[: args.top]:
            per = (b[f] - s.get(f, 0)) / n
            if per >= 0.5:
                print(f"  {per:6.1f}  {f}")


if __name__ == "__main__":
    main()
