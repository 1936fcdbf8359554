"""Parsers and statistics for the load benchmark (benches/load/run.sh).

Everything here is pure (text in, numbers out) so it can be unit-tested with
pytest: see test_parse.py. No third-party dependencies.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Iterable, Optional

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def pkey(p: float) -> str:
    """50.0 -> 'p50', 99.9 -> 'p99.9'."""
    return "p" + (f"{p:g}")


# ---------------------------------------------------------------------------
# wrk


_WRK_STATS = re.compile(r"^TERNSTATS (.*)$", re.M)
_WRK_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_WRK_SOCKERR = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_wrk(text: str) -> dict:
    """Parse wrk output produced with `-s wrk_stats.lua`.

    The Lua `done` hook prints one line:
      TERNSTATS requests=N duration_us=N errors_connect=N ... p50=US p90=US p99=US p99.9=US
    Latencies are in microseconds (wrk's native unit). Returns requests,
    duration_s, rps, errors, non_2xx and latency percentiles in ms.
    """
    m = _WRK_STATS.search(text)
    if not m:
        raise ValueError("wrk output has no TERNSTATS line (was -s wrk_stats.lua given?)")
    kv = dict(tok.split("=", 1) for tok in m.group(1).split())
    requests = int(kv["requests"])
    duration_s = int(kv["duration_us"]) / 1e6
    errors = sum(int(kv.get(k, 0)) for k in
                 ("errors_connect", "errors_read", "errors_write", "errors_timeout"))
    non2xx = int(kv.get("errors_status", 0))
    out = {
        "requests": requests,
        "duration_s": duration_s,
        "rps": requests / duration_s if duration_s > 0 else 0.0,
        "errors": errors,
        "non_2xx": non2xx,
    }
    for p in PERCENTILES:
        out[pkey(p) + "_ms"] = float(kv[pkey(p)]) / 1000.0
    return out


def parse_wrk_summary(text: str) -> dict:
    """Fallback parse of wrk's human summary (no Lua): requests and errors only."""
    m = _WRK_REQS.search(text)
    if not m:
        raise ValueError("no 'N requests in T' line in wrk output")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    requests = int(m.group(1))
    duration = float(m.group(2)) * unit
    out = {"requests": requests, "duration_s": duration,
           "rps": requests / duration if duration else 0.0, "errors": 0, "non_2xx": 0}
    e = _WRK_SOCKERR.search(text)
    if e:
        out["errors"] = sum(int(x) for x in e.groups())
    n = _WRK_NON2XX.search(text)
    if n:
        out["non_2xx"] = int(n.group(1))
    return out


# ---------------------------------------------------------------------------
# h2load

_H2_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout", re.M)
_H2_STATUS = re.compile(
    r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)

_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_h2load(text: str) -> dict:
    """Parse h2load's summary: requests succeeded, duration, req/s, failures.

    h2load prints no latency percentiles; those come from --log-file via
    parse_h2load_log().
    """
    f = _H2_FINISHED.search(text)
    r = _H2_REQUESTS.search(text)
    if not f or not r:
        raise ValueError("unrecognised h2load output")
    duration_s = float(f.group(1)) * _UNIT[f.group(2)]
    total, started, done, ok, failed, errored, timeout = (int(x) for x in r.groups())
    out = {
        "requests": ok,
        "duration_s": duration_s,
        "rps": float(f.group(3)),
        "errors": failed + errored + timeout,
        "non_2xx": 0,
    }
    s = _H2_STATUS.search(text)
    if s:
        two, three, four, five = (int(x) for x in s.groups())
        out["non_2xx"] = three + four + five
    return out


def h2load_log_rows(lines: Iterable[str]) -> list[tuple[int, int]]:
    """(start_us, duration_us) of 2xx responses from h2load --log-file.

    Each row: start_us <TAB> status <TAB> duration_us [<TAB> more...].
    Rows with a status of -1 (failed stream) or non-2xx are skipped.
    """
    out = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            start, status, dur = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if 200 <= status < 300:
            out.append((start, dur))
    return out


def parse_h2load_log(lines: Iterable[str]) -> list[int]:
    """Per-request durations (microseconds) of 2xx responses from h2load --log-file."""
    return [dur for _, dur in h2load_log_rows(lines)]


# ---------------------------------------------------------------------------
# statistics


def _rank(p: float, n: int) -> int:
    """1-based nearest rank; rounding guards against 0.99 * 1000 = 990.0000000000001."""
    return min(max(math.ceil(round(p * n / 100.0, 6)), 1), n)


def percentile(values: list, p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p% of samples <= it).

    Same definition HdrHistogram/wrk use. `values` need not be sorted.
    """
    if not values:
        raise ValueError("percentile of empty list")
    if not 0 < p <= 100:
        raise ValueError("p must be in (0, 100]")
    s = sorted(values)
    return s[_rank(p, len(s)) - 1]


def latency_percentiles_ms(durations_us: list[int]) -> dict:
    if not durations_us:
        return {pkey(p) + "_ms": None for p in PERCENTILES}
    s = sorted(durations_us)
    n = len(s)
    return {pkey(p) + "_ms": s[_rank(p, n) - 1] / 1000.0 for p in PERCENTILES}


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------
# /proc


def parse_proc_stat(text: str) -> dict:
    """Parse /proc/PID/stat: pid, comm, state, ppid, utime, stime (clock ticks).

    comm may contain spaces and parentheses, so split at the *last* ')'.
    """
    lpar = text.index("(")
    rpar = text.rindex(")")
    pid = int(text[:lpar].strip())
    comm = text[lpar + 1:rpar]
    rest = text[rpar + 1:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    return {
        "pid": pid,
        "comm": comm,
        "state": rest[0],
        "ppid": int(rest[1]),
        "utime": int(rest[11]),
        "stime": int(rest[12]),
    }


def parse_proc_status_kb(text: str, field: str) -> Optional[int]:
    """A 'kB' field of /proc/PID/status, e.g. VmHWM or VmRSS, in KiB."""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def cpu_us_per_request(ticks_before: int, ticks_after: int, clk_tck: int,
                       requests: int) -> Optional[float]:
    if requests <= 0:
        return None
    return (ticks_after - ticks_before) * 1e6 / clk_tck / requests


# ---------------------------------------------------------------------------
# table rendering


def fmt(v, spec: str = ".2f", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_table(headers: list[str], rows: list[list[str]],
                   align: Optional[list[str]] = None) -> str:
    """Render a GitHub-flavoured Markdown table. align: 'l' or 'r' per column."""
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)
