#!/usr/bin/env python3
"""Redis's own CPU per rate-limit check, for each way of writing the check, on a private
redis-server: what bench/README.md's "cheapest atomic command" figures come from.

    bench/redis_cost.py            # N=200000 checks per way and depth, ROUNDS=3, DEPTHS="1 16"

Each way counts one hit of a client key in a fixed window of 60 s and returns the count and
the milliseconds left:

  evalsha                  the limiter's script (src/rate_limit/redis.rs): INCR, PEXPIRE on
                           the first hit, PTTL (and mends a key without expiry)
  fcall                    the same Lua as a Redis 7 function (FUNCTION LOAD, FCALL)
  multi                    MULTI, INCR, PEXPIRE key w NX, PTTL, EXEC: atomic, Redis >= 7.0
  incr+pexpire-nx (not atomic)   the same three without MULTI/EXEC
  set-nx+incr (not atomic)       SET key 0 PX w NX, INCR, PTTL

The checks go over one connection in batches of DEPTH (as many as a worker's connection
carries per write; bench/run reports that depth as "checks/read"), for 10,000 client keys
picked at random, with a FLUSHALL before each way. Redis's CPU (user + sys, /proc) over
the batches, divided by the checks, is the figure; the median of the rounds is printed.
Standard library only; redis-server on PATH; the server is stopped by its PID.
"""

import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
# The limiter's own script, read from the source, so that what is measured is what ships.
SCRIPT = re.search(
    r'WINDOW_SCRIPT: &str = r"(.*?)";',
    (Path(__file__).resolve().parent.parent / "src/rate_limit/redis.rs").read_text(),
    re.S,
).group(1)
FUNCTION = ("#!lua name=roundabout\nredis.register_function('hit', function(KEYS, ARGV)"
            + SCRIPT + "end)")
WINDOW_MS = 60000


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Reader:
    """Reads RESP2 replies off a socket."""

    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, b"", 0

    def _more(self):
        self.buf, self.pos = self.buf[self.pos:], 0
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("redis closed the connection")
        self.buf += data

    def line(self):
        while (i := self.buf.find(b"\r\n", self.pos)) < 0:
            self._more()
        line, self.pos = self.buf[self.pos:i], i + 2
        return line

    def value(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in b"+:":
            return rest
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._more()
            value, self.pos = self.buf[self.pos:self.pos + n], self.pos + n + 2
            return value
        if kind == b"*":
            return [self.value() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def ways(sha):
    """name -> (key -> (bytes of one check, replies it gets))."""
    w = WINDOW_MS
    return {
        "evalsha": lambda k: (resp("EVALSHA", sha, 1, k, w), 1),
        "fcall": lambda k: (resp("FCALL", "hit", 1, k, w), 1),
        "multi": lambda k: (resp("MULTI") + resp("INCR", k) + resp("PEXPIRE", k, w, "NX")
                            + resp("PTTL", k) + resp("EXEC"), 5),
        "incr+pexpire-nx (not atomic)": lambda k: (
            resp("INCR", k) + resp("PEXPIRE", k, w, "NX") + resp("PTTL", k), 3),
        "set-nx+incr (not atomic)": lambda k: (
            resp("SET", k, 0, "PX", w, "NX") + resp("INCR", k) + resp("PTTL", k), 3),
    }


def main():
    n = int(os.environ.get("N", 200000))
    rounds = int(os.environ.get("ROUNDS", 3))
    depths = [int(d) for d in os.environ.get("DEPTHS", "1 16").split()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="redis-cost.")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("redis-server did not start")
        r = Reader(sock)
        sock.sendall(resp("SCRIPT", "LOAD", SCRIPT))
        sha = r.value().decode()
        sock.sendall(resp("FUNCTION", "LOAD", "REPLACE", FUNCTION))
        r.value()
        keys = [f"rl:10.0.{i // 256}.{i % 256}" for i in range(10000)]
        results = {}
        for _ in range(rounds):
            for depth in depths:
                for name, check in ways(sha).items():
                    sock.sendall(resp("FLUSHALL"))
                    r.value()
                    batches = []
                    for _ in range(0, n, depth):
                        parts = [check(random.choice(keys)) for _ in range(depth)]
                        batches.append((b"".join(p for p, _ in parts), sum(k for _, k in parts)))
                    before = cpu_ticks(server.pid)
                    for data, replies in batches:
                        sock.sendall(data)
                        for _ in range(replies):
                            r.value()
                    used = cpu_ticks(server.pid) - before
                    results.setdefault((depth, name), []).append(used / HZ * 1e6 / n)
        print(f"Redis CPU per check (µs, user + sys), {n} checks per run, median of {rounds}:")
        for depth in depths:
            print(f"  {depth} check(s) per write:")
            for name in ways(sha):
                runs = results[(depth, name)]
                print(f"    {name:30s} {statistics.median(runs):6.2f}   (runs: "
                      + " ".join(f"{x:.2f}" for x in runs) + ")")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
