#!/usr/bin/env python3
"""bench/run tls: TLS termination, roundabout against nginx with the same certificate
(ECDSA P-256, made here with openssl), side by side in one run, on 127.0.0.1.

Three loads, the two proxies taking turns within every round (the order rotates):
  keep-alive   wrk -c CONNS over HTTPS on kept-alive connections: requests/s through TLS
  resumed      wrk -c HS_CONNS with "Connection: close": a new connection per request, and
               wrk resumes its TLS session on each (abbreviated handshakes; both proxies
               keep a session cache): connections/s
  full         HS_PROCS `openssl s_time -new` at once, each a new connection with a full
               handshake (no resumption) and one GET, one after another: handshakes/s

Environment: DURATION (seconds per run, 5), ROUNDS (3), CONNS (64), HS_CONNS (16),
HS_PROCS (4), THREADS (wrk threads, 2), WORKERS (roundabout workers = nginx worker processes, 2), PIN=1
(proxies and backends on CPU 0, wrk on CPU 1), NO_BUILD=1, KEEP_TMP=1. About
3 × 2 × ROUNDS × DURATION seconds plus the build.

Both proxies forward to the same three plain-HTTP backends (examples/backend), so the
difference is TLS and proxying. The helpers (processes stopped by PID, free ports, tool
installation) are bench/run's.
"""

import importlib.machinery
import importlib.util
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import http.client
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_loader = importlib.machinery.SourceFileLoader("bench_run", str(ROOT / "bench" / "run"))
_spec = importlib.util.spec_from_loader("bench_run", _loader)
run = importlib.util.module_from_spec(_spec)
_loader.exec_module(run)
run.PACKAGES["openssl"] = "openssl"


def knobs():
    e = os.environ
    env = {k: int(e.get(k, d)) for k, d in
           (("DURATION", 5), ("ROUNDS", 3), ("CONNS", 64), ("HS_CONNS", 16), ("HS_PROCS", 4),
            ("THREADS", 2),
            ("WORKERS", 2))}
    for flag in ("PIN", "NO_BUILD", "KEEP_TMP"):
        env[flag] = e.get(flag, "0") == "1"
    return env


def https_get(port, timeout=1.0):
    """(status, body) of GET / over TLS on 127.0.0.1:port; the certificate is not checked
    here (wrk does not check it either)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_https(port, proc, tmp):
    for _ in range(100):
        if not proc.alive():
            raise run.Failed(f"{proc.name} exited at start (see {tmp})")
        try:
            status, body = https_get(port)
            if status == 200 and b"Hello from backend" in body:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise run.Failed(f"{proc.name} does not answer over TLS on port {port} (see {tmp})")


class TlsBench:
    def __init__(self, env, tmp, procs):
        self.env, self.tmp, self.procs = env, tmp, procs
        self.ports = run.Ports()
        self.results = {}  # (proxy, load) -> [req/s of each round]
        self.cpu = {}  # (proxy, load) -> [µs of CPU per request]

    def main(self):
        run.install_missing(["wrk", "nginx", "openssl"])
        if not self.env["NO_BUILD"]:
            run.log("cargo build --release --bin roundabout --example backend")
            subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "roundabout",
                            "--example", "backend"], cwd=ROOT, check=True)
        if self.env["PIN"]:
            os.sched_setaffinity(0, {1})
        self.certificate()
        self.backends = []
        for i in (1, 2, 3):
            port = self.ports.take()
            p = self.procs.start(f"backend {i}", [run.BACKEND, "--port", port, "--workers", 1],
                                 self.tmp / f"backend{i}.log", pin="0")
            run.wait_http(port, p, self.tmp)
            self.backends.append(port)
        targets = [self.nginx(), self.roundabout()]
        loads = [("keep-alive", self.env["CONNS"], False),
                 ("resumed", self.env["HS_CONNS"], True),
                 ("full", self.env["HS_PROCS"], None)]
        for load, conns, close in loads:
            for t in targets:  # warm: connections and upstream pools made
                if close is not None:
                    self.wrk(t, conns, 1, close, self.tmp / "warm.out")
            for r in range(self.env["ROUNDS"]):
                for t in targets[r % 2:] + targets[: r % 2]:
                    self.measure(t, load, conns, close, r + 1)
        self.report(loads)

    def certificate(self):
        self.cert, self.key = self.tmp / "cert.pem", self.tmp / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-keyout", self.key, "-out", self.cert],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def nginx(self):
        nginx, d, port = run.tool("nginx"), self.tmp / "nginx", self.ports.take()
        d.mkdir()
        run.fill("nginx-tls.conf", d / "nginx.conf", workers=self.env["WORKERS"], dir=d,
                 port=port, cert=self.cert, key=self.key, keepalive=self.env["CONNS"],
                 user_line="user root;" if os.geteuid() == 0 else "",
                 servers="\n".join(f"    server 127.0.0.1:{p};" for p in self.backends))
        args = [nginx, "-p", d, "-e", d / "error.log", "-c", d / "nginx.conf"]
        if subprocess.run([*args, "-t", "-q"]).returncode:
            raise run.Failed(f"nginx rejected {d / 'nginx.conf'}")
        p = self.procs.start("nginx", [*args, "-g", "daemon off;"], d / "stdout.log", pin="0")
        wait_https(port, p, self.tmp)
        for worker in run.children_of(p.pid):
            self.procs.adopt(p, worker)
        self.nginx_version = run.version([nginx, "-v"], r"nginx/(\S+)")
        run.log(f"nginx {self.nginx_version} (TLS) on {port}")
        return run.Target("nginx", port, p.pids)

    def roundabout(self):
        port, config = self.ports.take(), self.tmp / "roundabout.toml"
        run.fill("roundabout-tls.toml", config, port=port, cert=self.cert, key=self.key,
                 workers=self.env["WORKERS"],
                 servers=", ".join(f'"http://127.0.0.1:{p}"' for p in self.backends))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ROUNDABOUT__") and k != "RUST_LOG"}
        p = self.procs.start("roundabout", [run.BIN, "--config", config],
                             self.tmp / "roundabout.log", env=env, pin="0")
        wait_https(port, p, self.tmp)
        run.log(f"roundabout (TLS) on {port}")
        return run.Target("roundabout", port, [p.pid])

    def wrk(self, target, conns, secs, close, out):
        pin = ["taskset", "-c", "1"] if self.env["PIN"] else []
        cmd = [*pin, "wrk", f"-t{self.env['THREADS']}", f"-c{conns}", f"-d{secs}s",
               "--timeout", "2s"]
        cmd += ["-H", "Connection: close"] if close else []
        cmd += [f"https://127.0.0.1:{target.port}/"]
        proc = self.procs.start("wrk", cmd, out)
        try:
            proc.popen.wait(secs + 30)
        finally:
            self.procs.stop(proc)
        return Path(out).read_text()

    def s_time(self, target, procs, secs, out):
        """procs `openssl s_time -new` at once for secs seconds: (connections, seconds)."""
        pin = ["taskset", "-c", "1"] if self.env["PIN"] else []
        cmd = [*pin, "openssl", "s_time", "-connect", f"127.0.0.1:{target.port}", "-new",
               "-time", secs, "-www", "/"]
        started = time.monotonic()
        running = [self.procs.start("s_time", cmd, f"{out}.{i}") for i in range(procs)]
        try:
            for p in running:
                p.popen.wait(secs + 30)
        finally:
            for p in running:
                self.procs.stop(p)
        wall = time.monotonic() - started
        done = 0
        for i in range(procs):
            m = re.search(r"^(\d+) connections in [0-9.]+s", Path(f"{out}.{i}").read_text(),
                          re.M)
            done += int(m.group(1)) if m else 0
        return done, wall, ""

    def measure(self, target, load, conns, close, rnd):
        out = self.tmp / f"load.{target.name}.{load}.r{rnd}"
        c0 = run.cpu_ticks(target.pids)
        if close is None:
            total, secs, notes = self.s_time(target, conns, self.env["DURATION"], out)
        else:
            text = self.wrk(target, conns, self.env["DURATION"], close, out)
            m = re.search(r"^\s*(\d+) requests in ([0-9.]+)s", text, re.M)
            total, secs = (int(m.group(1)), float(m.group(2))) if m else (0, 1)
            non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
            sockerr = re.search(r"Socket errors:(.*)", text)
            notes = (f"  non-2xx {non2xx.group(1) if non2xx else 0}"
                     f"  socket errors {sockerr.group(1).strip() if sockerr else 'none'}")
        c1 = run.cpu_ticks(target.pids)
        if total == 0:
            raise run.Failed(f"no result on {target.name} ({out}*)")
        rate, cpu = total / secs, (sum(c1) - sum(c0)) * 1e6 / run.HZ / total
        self.results.setdefault((target.name, load), []).append(rate)
        self.cpu.setdefault((target.name, load), []).append(cpu)
        run.log(f"{target.name:<10} {load:<10} c={conns:<4} {rate:9.0f}/s"
                f"  CPU {cpu:6.1f} µs each{notes}")

    def report(self, loads):
        e = self.env
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out = [f"## TLS termination, roundabout vs nginx {self.nginx_version}, {now},"
               " bench/run tls", "",
               f"Same certificate (ECDSA P-256, openssl), the TLS version the clients chose;"
               f" wrk -t{e['THREADS']} -d{e['DURATION']}s, {e['ROUNDS']} rounds, the proxies"
               f" taking turns; {e['WORKERS']} workers each"
               + ("; PIN=1." if e["PIN"] else "; not pinned."), "",
               "| load | nginx /s | roundabout /s | roundabout / nginx (lowest–highest"
               " round) | CPU µs each: nginx | roundabout |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for load, conns, _ in loads:
            n, r = self.results[("nginx", load)], self.results[("roundabout", load)]
            ratios = [b / a for a, b in zip(n, r)]
            out.append(
                f"| {load} (c={conns}) | {statistics.mean(n):,.0f} | {statistics.mean(r):,.0f}"
                f" | {statistics.mean(r) / statistics.mean(n):.2f}× ({min(ratios):.2f}–"
                f"{max(ratios):.2f}) | {statistics.mean(self.cpu[('nginx', load)]):.1f}"
                f" | {statistics.mean(self.cpu[('roundabout', load)]):.1f} |")
        text = "\n".join(out) + "\n"
        (self.tmp / "table.md").write_text(text)
        print("\n" + text, end="", flush=True)


def main():
    env = knobs()
    tmp = Path(tempfile.mkdtemp(prefix="roundabout-bench-tls."))
    procs = run.Procs(pin=env["PIN"])
    for s in (run.signal.SIGINT, run.signal.SIGTERM, run.signal.SIGHUP):
        run.signal.signal(s, run.on_signal)
    rc = 1
    try:
        TlsBench(env, tmp, procs).main()
        rc = 0
    except run.Interrupted as e:
        run.log(f"{e}: stopping")
        rc = 128 + e.signum
    except (run.Failed, subprocess.CalledProcessError, OSError) as e:
        run.log(f"error: {e}")
    finally:
        for s in (run.signal.SIGINT, run.signal.SIGTERM, run.signal.SIGHUP):
            run.signal.signal(s, run.signal.SIG_IGN)
        procs.stop_all()
        if env["KEEP_TMP"] or rc != 0:
            run.log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
