"""Open N keep-alive HTTP/1.1 connections, send one request on each, hold them idle.

Used by bench.py for the memory-against-connections test; also runnable alone:

    python3 idle_conns.py --port 18140 --host upstream.bench -n 1000 --hold 5

Bounded: connects at most --parallel at a time, every step has a timeout, and
everything is closed before returning. Only 127.0.0.1 is allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    target = want if hard == resource.RLIM_INFINITY or hard >= want else hard
    try:
        if hard != resource.RLIM_INFINITY and hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root only
            target = want
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        target = hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def open_idle(port: int, host_header: str, n: int, parallel: int = 200,
                    timeout: float = 10.0, addr: str = "127.0.0.1"):
    """Return (connections, failures): connections is a list of (reader, writer)."""
    if addr not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("loopback only")
    sem = asyncio.Semaphore(parallel)
    conns = []
    failures = 0
    req = (f"GET / HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: tern-bench-idle\r\n\r\n").encode()

    async def one():
        nonlocal failures
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout)
            except (OSError, asyncio.TimeoutError):
                failures += 1
                return
            try:
                w.write(req)
                await asyncio.wait_for(w.drain(), timeout)
                status = await asyncio.wait_for(_read_response(r), timeout)
                if status != 200:
                    failures += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                failures += 1
                w.close()
                return
            conns.append((r, w))

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, failures


def count_open(conns) -> int:
    """Connections the peer has not closed (EOF not yet seen)."""
    return sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())


async def close_all(conns):
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.2)


async def _main(args):
    raise_nofile(args.n + 1024)
    t0 = time.monotonic()
    conns, failures = await open_idle(args.port, args.host, args.n, args.parallel)
    print(f"opened {len(conns)} ({failures} failed) in {time.monotonic() - t0:.2f}s")
    await asyncio.sleep(args.hold)
    print(f"still open after {args.hold}s: {count_open(conns)}")
    await close_all(conns)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="upstream.bench")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--hold", type=float, default=2.0)
    asyncio.run(_main(ap.parse_args()))
