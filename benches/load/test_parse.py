"""Unit tests for the benchmark parsers: `python3 -m pytest benches/load`.

Not part of the project's test command.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parse  # noqa: E402

WRK_OUT = """Running 5s test @ http://127.0.0.1:18080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.97ms  225.43us   8.12ms   91.20%
    Req/Sec    66.12k     2.01k   69.00k    80.00%
  329012 requests in 5.00s, 402.11MB read
Requests/sec:  65802.40
Transfer/sec:     80.42MB
TERNSTATS requests=329012 duration_us=5000123 errors_connect=0 errors_read=1 errors_write=0 errors_status=3 errors_timeout=2 p50=695 p90=884 p99=1112 p99.9=2319
"""

H2LOAD_OUT = """starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 5.00s, 31518.40 req/s, 35.12MB/s
requests: 157592 total, 157656 started, 157592 done, 157590 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 157590 2xx, 0 3xx, 2 4xx, 0 5xx
traffic: 175.60MB (184131234) total, 1.20MB (1260736) headers (space savings 94.12%), 158.32MB (166014240) data
                     min         max         mean         sd        +/- sd
time for request:      201us     12.11ms      1.98ms       801us    70.11%
"""


def test_parse_wrk():
    r = parse.parse_wrk(WRK_OUT)
    assert r["requests"] == 329012
    assert r["duration_s"] == pytest.approx(5.000123)
    assert r["rps"] == pytest.approx(329012 / 5.000123)
    assert r["errors"] == 3  # read + timeout
    assert r["non_2xx"] == 3
    assert r["p50_ms"] == pytest.approx(0.695)
    assert r["p90_ms"] == pytest.approx(0.884)
    assert r["p99_ms"] == pytest.approx(1.112)
    assert r["p99.9_ms"] == pytest.approx(2.319)


def test_parse_wrk_requires_stats_line():
    with pytest.raises(ValueError):
        parse.parse_wrk("  10 requests in 1.00s, 1KB read\n")


def test_parse_wrk_summary_fallback():
    text = WRK_OUT + "  Socket errors: connect 1, read 2, write 0, timeout 4\n" \
        "  Non-2xx or 3xx responses: 7\n"
    r = parse.parse_wrk_summary(text)
    assert r["requests"] == 329012
    assert r["duration_s"] == pytest.approx(5.0)
    assert r["errors"] == 7
    assert r["non_2xx"] == 7
    r = parse.parse_wrk_summary("  12 requests in 250.00ms, 1KB read\n")
    assert r["duration_s"] == pytest.approx(0.25)
    assert r["rps"] == pytest.approx(48)


def test_parse_h2load():
    r = parse.parse_h2load(H2LOAD_OUT)
    assert r["requests"] == 157590
    assert r["duration_s"] == pytest.approx(5.0)
    assert r["rps"] == pytest.approx(31518.40)
    assert r["errors"] == 2
    assert r["non_2xx"] == 2


def test_parse_h2load_ms_duration():
    text = H2LOAD_OUT.replace("finished in 5.00s", "finished in 505.55ms")
    assert parse.parse_h2load(text)["duration_s"] == pytest.approx(0.50555)


def test_parse_h2load_rejects_garbage():
    with pytest.raises(ValueError):
        parse.parse_h2load("connect: Connection refused\n")


def test_parse_h2load_log_skips_failures_and_junk():
    lines = [
        "1700000000000000\t200\t150\n",
        "1700000000000100\t200\t250\n",
        "1700000000000200\t-1\t999\n",   # failed stream
        "1700000000000300\t503\t10\n",   # non-2xx
        "garbage\n",
        "1700000000000400\t204\t300\textra\n",
    ]
    assert parse.parse_h2load_log(lines) == [150, 250, 300]


def test_percentile_nearest_rank():
    v = list(range(1, 101))  # 1..100
    assert parse.percentile(v, 50) == 50
    assert parse.percentile(v, 90) == 90
    assert parse.percentile(v, 99) == 99
    assert parse.percentile(v, 99.9) == 100
    assert parse.percentile(v, 100) == 100
    assert parse.percentile([7], 50) == 7
    assert parse.percentile([3, 1, 2], 50) == 2  # unsorted input
    with pytest.raises(ValueError):
        parse.percentile([], 50)
    with pytest.raises(ValueError):
        parse.percentile([1], 0)


def test_latency_percentiles_ms():
    us = [1000] * 990 + [5000] * 9 + [20000]
    p = parse.latency_percentiles_ms(us)
    assert p == {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "p99.9_ms": 5.0}
    us = [1000] * 989 + [5000] * 10 + [20000]
    assert parse.latency_percentiles_ms(us)["p99_ms"] == 5.0
    assert parse.latency_percentiles_ms([])["p50_ms"] is None
    # agrees with percentile()
    us = [int(x) for x in range(17, 100017, 37)]
    p = parse.latency_percentiles_ms(us)
    assert p["p99.9_ms"] == parse.percentile(us, 99.9) / 1000


def test_median_and_ratio():
    assert parse.median([3, 1, 2]) == 2
    assert parse.median([4, 1, None, 2, 3]) == 2.5
    assert parse.median([None]) is None
    assert parse.ratio(3, 2) == 1.5
    assert parse.ratio(None, 2) is None
    assert parse.ratio(3, 0) is None


def test_parse_proc_stat_with_odd_comm():
    text = ("4242 (nginx: worker (x) ) S 4241 4241 4241 0 -1 4194624 1200 0 0 0 "
            "731 259 0 0 20 0 1 0 5000 12345678 900 18446744073709551615 1 1 0 0 0 0 0 "
            "1073745920 402745863 0 0 0 17 1 0 0 0 0 0\n")
    st = parse.parse_proc_stat(text)
    assert st["pid"] == 4242
    assert st["comm"] == "nginx: worker (x) "
    assert st["state"] == "S"
    assert st["ppid"] == 4241
    assert st["utime"] == 731
    assert st["stime"] == 259


def test_parse_proc_stat_self():
    with open("/proc/self/stat") as f:
        st = parse.parse_proc_stat(f.read())
    assert st["pid"] == os.getpid()
    assert st["ppid"] == os.getppid()
    assert st["utime"] >= 0


def test_parse_proc_status_kb():
    text = "Name:\tnginx\nVmPeak:\t  20000 kB\nVmHWM:\t    6784 kB\nVmRSS:\t    6000 kB\n"
    assert parse.parse_proc_status_kb(text, "VmHWM") == 6784
    assert parse.parse_proc_status_kb(text, "VmRSS") == 6000
    assert parse.parse_proc_status_kb(text, "VmSwap") is None


def test_cpu_us_per_request():
    # 250 ticks at 100 Hz = 2.5 s of CPU over 100,000 requests = 25 µs each
    assert parse.cpu_us_per_request(1000, 1250, 100, 100_000) == pytest.approx(25.0)
    assert parse.cpu_us_per_request(0, 10, 100, 0) is None


def test_markdown_table_and_fmt():
    t = parse.markdown_table(["a", "b"], [["x", parse.fmt(1.234, ".1f")], ["y", parse.fmt(None)]])
    assert t.splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1.2 |", "| y | – |"]
    assert parse.pkey(99.9) == "p99.9"
    assert parse.pkey(50.0) == "p50"
