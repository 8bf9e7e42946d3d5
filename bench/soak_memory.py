"""bench/soak's memory: roundabout's RSS and live heap, sampled every 10 s, the curve per
minute, and the rules the soak judges them by (issue #27). Loaded by bench/soak.

The live heap is `roundabout_heap_bytes{state="in_use"}` from the admin API's /metrics
(the bytes handed out and not freed, as src/allocator.rs counts them); `free` beside it is
the resident memory beyond that (RSS minus the live heap). RSS is VmRSS. A live heap that stays flat while RSS moves
is the allocator settling, not something kept; the rules say which:

  - warm-up: WARMUP seconds (default 900 from an hour's run on, 120 from ten minutes on,
    a fifth of DURATION below that): arenas fill and fragment, the limiter's windows and
    the upstream pools reach their steady size;
  - RSS never more than 10% above its value at the end of the warm-up;
  - the live heap flat: the median of its samples over the run's last stretch within 2% of
    the median over the stretch right after the warm-up (each stretch a tenth of the time
    after the warm-up, at least a minute and at most ten). A single sample moves by the
    requests in flight (a 4 MB upload is 4 MB of heap for a moment); a median over
    minutes does not, and a few bytes kept per request would still show as a trend.

DHAT=1 runs the heap-profiling build instead (`cargo build --profile profiling --features
dhat-heap --bin roundabout`, target/profiling/roundabout; dhat is its allocator): it writes
a profile of what is live, per allocation site, 90 s after the traffic stops (its clients
have finished; the slow ones are still connected) to dhat-heap.json in the temp dir, which
is then kept. Its live heap is dhat's own count, printed every minute in roundabout's log;
its RSS includes dhat's tables (which grow with every new backtrace), so neither rule is
judged then. Two runs of different lengths give what is live at two moments.
"""

import http.client
import re
import statistics
import time

HEAP_LINE = re.compile(rb'^roundabout_heap_bytes\{state="(in_use|free)"\} (\d+)', re.M)
DHAT_LINE = re.compile(r"dhat-heap: t=(\d+) s live (\d+) bytes in (\d+) blocks")
MIB = 1024 * 1024


def dhat_env(duration, tmp):
    """roundabout's environment with DHAT=1: its profile written once the traffic has
    stopped and its clients have finished (at most 45 s), the slow ones still connected:
    what is live then is what stays."""
    return {"ROUNDABOUT_DHAT_AFTER": str(duration + 90),
            "ROUNDABOUT_DHAT_FILE": str(tmp / "dhat-heap.json")}


def wait_for_profile(tmp, failed):
    """With DHAT=1: waits until roundabout has written its profile (it stands still while
    it does, so nothing else asks it anything meanwhile); the profile's path."""
    deadline = time.monotonic() + 700
    while time.monotonic() < deadline:
        if "dhat: The data has been saved" in (tmp / "roundabout.log").read_text(
                errors="replace"):
            return tmp / "dhat-heap.json"
        time.sleep(2)
    raise failed("roundabout wrote no heap profile in time")


def warm_up(duration, env_value=None):
    """Seconds of warm-up before memory is judged."""
    if env_value is not None:
        return env_value
    if duration >= 3600:
        return 900
    return 120 if duration >= 600 else duration // 5


def heap_bytes(admin_port):
    """(in use, free) bytes from /metrics; (None, None) from a build without the gauge."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        found = dict(HEAP_LINE.findall(conn.getresponse().read()))
    finally:
        conn.close()
    return (int(found[b"in_use"]) if b"in_use" in found else None,
            int(found[b"free"]) if b"free" in found else None)


class Memory:
    """Samples (seconds, RSS kB, live heap bytes, free heap bytes, in flight, requests ok)."""

    def __init__(self, duration, warmup, dhat):
        self.duration, self.warmup, self.dhat = duration, warmup, dhat
        self.samples = []
        self.dhat_curve = []  # (seconds since roundabout's start, live bytes, blocks)

    def add(self, t, rss_kb, heap, in_flight, ok):
        self.samples.append((t, rss_kb, heap[0], heap[1], in_flight, ok))

    def read_dhat_log(self, text):
        self.dhat_curve = [tuple(map(int, m)) for m in DHAT_LINE.findall(text)]

    # -- the curve
    def per_minute(self):
        """One row a minute: (minute, RSS kB at its end, median live heap of its samples,
        lowest, highest, free heap at its end, requests ok by then)."""
        rows = []
        for minute in range(1, self.duration // 60 + 1):
            inside = [s for s in self.samples if minute * 60 - 60 < s[0] <= minute * 60]
            if not inside:
                continue
            heaps = [s[2] for s in inside if s[2] is not None]
            last = inside[-1]
            rows.append((minute, last[1], statistics.median(heaps) if heaps else None,
                         min(heaps, default=None), max(heaps, default=None), last[3], last[5]))
        return rows

    def write_csv(self, path):
        lines = ["seconds,rss_kb,heap_in_use_bytes,heap_free_bytes,in_flight,requests_ok"]
        lines += [",".join("" if v is None else str(v) for v in s) for s in self.samples]
        path.write_text("\n".join(lines) + "\n")

    def lines(self):
        """The report's memory part: a row per minute (every five minutes past an hour,
        so that a two-hour run's curve is a table one can read)."""
        rows = self.per_minute()
        step = 5 if len(rows) > 60 else 1
        out = ["| minute | RSS MiB | live heap MiB (median, lowest-highest) | free heap MiB "
               "| requests ok |", "| ---: | ---: | ---: | ---: | ---: |"]
        for minute, rss, med, low, high, free, ok in rows:
            if minute % step and minute != rows[-1][0]:
                continue
            heap = (f"{med / MIB:.2f} ({low / MIB:.2f}-{high / MIB:.2f})" if med is not None
                    else "-")
            out.append(f"| {minute} | {rss / 1024:.1f} | {heap} | "
                       f"{'-' if free is None else f'{free / MIB:.2f}'} | {ok} |")
        if self.dhat_curve:
            out += ["", "dhat's live heap (roundabout's own count, every minute from its start):",
                    "    " + "  ".join(f"{t // 60}m {b / MIB:.2f}M/{n}" for t, b, n in
                                       self.dhat_curve)]
        return out

    # -- the rules
    def stretch(self):
        """Seconds in each of the two stretches the live heap is compared over."""
        return max(60, min(600, (self.duration - self.warmup) // 10))

    def checks(self):
        """[(text, passed or None when not judged)]."""
        after = [s for s in self.samples if s[0] >= self.warmup]
        if not after:
            return [(f"memory: no sample after the warm-up ({self.warmup} s)", False)]
        base_t, base_rss = after[0][0], after[0][1]
        peak = max(s[1] for s in after)
        growth = (peak - base_rss) / base_rss * 100
        judged = None if self.dhat else growth <= 10
        checks = [(f"RSS after the warm-up at most 10% above its t={base_t} s value "
                   f"({base_rss / 1024:.1f} MiB): highest {peak / 1024:.1f} MiB "
                   f"({growth:+.1f}%)" + (" (not judged: DHAT=1)" if self.dhat else ""),
                   judged)]
        span = self.stretch()
        end = self.samples[-1][0]
        first = [s[2] for s in after if s[0] < base_t + span and s[2] is not None]
        last = [s[2] for s in after if s[0] > end - span and s[2] is not None]
        if self.dhat or not first or not last:
            why = "DHAT=1" if self.dhat else "no roundabout_heap_bytes in /metrics"
            checks.append((f"live heap flat after the warm-up: not judged ({why})", None))
            return checks
        a, b = statistics.median(first), statistics.median(last)
        change = (b - a) / a * 100
        checks.append((f"live heap flat after the warm-up: median {b / MIB:.2f} MiB over the "
                       f"last {span} s against {a / MIB:.2f} MiB over t={base_t}-"
                       f"{base_t + span} s ({change:+.1f}%, at most +2%)", change <= 2))
        return checks
