#!/usr/bin/env python3
"""bench/run cluster: the Redis limiter on a local 3-master Redis Cluster against one Redis,
side by side in one run, with the limiter off beside them (and nginx and HAProxy, as in every
bench/run table), all driven by wrk with 10,000 client IPs (X-Forwarded-For).

  xff             roundabout, limiter off
  rl-redis-xff    the limiter on one redis-server
  rl-cluster-xff  the limiter on a Redis Cluster: six redis-servers on this machine, three
                  masters each with a replica (`redis-cli --cluster create
                  --cluster-replicas 1`), roundabout given all six as seeds

Environment: as bench/run (DURATION 5, ROUNDS 3, CONNS "64 256", THREADS, WORKERS, PIN,
NO_BUILD, KEEP_TMP, VARIANTS, ROUNDABOUT_BIN). Redis's CPU beside the proxy's is the sum
over the cluster's six processes for the cluster row, and checks per read(2) the same sum
of INFO stats' reads. Everything is bench/run's (this file adds the cluster and the
variant, and borrows the rest); every process started is stopped by its PID.
"""

import importlib.machinery
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_loader = importlib.machinery.SourceFileLoader("bench_run", str(ROOT / "bench" / "run"))
_spec = importlib.util.spec_from_loader("bench_run", _loader)
run = importlib.util.module_from_spec(_spec)
_loader.exec_module(run)

CLUSTER = "rl-cluster-xff"
# Limiter on, and not `redis`: bench/run's one-Redis steps (its URL, its key count) are not
# this variant's; the cluster's URL goes into the config below, its CPU beside the proxy's.
run.VARIANTS[CLUSTER] = run.Variant(
    "roundabout + limiter, Redis Cluster (3 masters + 3 replicas), {ips} client IPs (XFF)",
    limiter=True, xff=True)
run.MODES["cluster"] = (f"xff rl-redis-xff {CLUSTER}", 5, 3)

_fill = run.fill


def fill(template, path, **values):
    """bench/run's fill; the cluster variant's config gets the seed list as redis_url."""
    _fill(template, path, **values)
    if Path(path).name == f"{CLUSTER}.toml":
        text = Path(path).read_text()
        seeds = ", ".join(f'"redis://127.0.0.1:{p}"' for p in Session.cluster_ports)
        Path(path).write_text(text.replace('redis_url = ""', f"redis_url = [{seeds}]", 1))


run.fill = fill


class Session(run.Session):
    cluster_ports = []

    def start_backends(self):
        super().start_backends()
        if CLUSTER in self.variants:
            self.start_cluster()

    def start_cluster(self):
        """Six cluster-enabled redis-servers, then `redis-cli --cluster create`; waits until
        every node says cluster_state:ok."""
        run.install_missing(["redis-server", "redis-cli"])
        self.nodes = []
        for i in range(6):
            port, bus = self.ports.take(), self.ports.take()
            d = self.tmp / f"cluster-{port}"
            d.mkdir()
            p = self.procs.start(f"redis cluster node {port}", [
                run.tool("redis-server"), "--port", port, "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-port", bus,
                "--cluster-config-file", d / "nodes.conf", "--cluster-node-timeout", 5000,
                "--save", "", "--appendonly", "no", "--dir", d, "--logfile", d / "redis.log"],
                d / "stdout", pin="0")
            self.nodes.append((port, p))
        Session.cluster_ports = [port for port, _ in self.nodes]
        for port, p in self.nodes:
            for _ in range(50):
                if "PONG" in self.cli(port, "ping"):
                    break
                if not p.alive():
                    raise run.Failed(f"redis cluster node {port} exited at start")
                time.sleep(0.1)
        create = subprocess.run(
            [run.tool("redis-cli"), "--cluster", "create",
             *[f"127.0.0.1:{port}" for port, _ in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True)
        if create.returncode:
            raise run.Failed(f"redis-cli --cluster create: {create.stdout}{create.stderr}")
        for _ in range(200):
            if all("cluster_state:ok" in self.cli(port, "cluster", "info")
                   for port, _ in self.nodes):
                break
            time.sleep(0.1)
        else:
            raise run.Failed("the Redis Cluster did not form")
        masters = [port for port, _ in self.nodes
                   if "role:master" in self.cli(port, "info", "replication")]
        run.log(f"redis cluster on {' '.join(map(str, self.cluster_ports))} "
                f"(masters {' '.join(map(str, masters))})")

    def cli(self, port, *args):
        return subprocess.run([run.tool("redis-cli"), "-p", str(port), *map(str, args)],
                              capture_output=True, text=True).stdout

    def cluster_reads(self):
        """Reads of client sockets by all six nodes so far (INFO stats)."""
        total = 0
        for port, _ in self.nodes:
            m = re.search(r"^total_reads_processed:(\d+)", self.cli(port, "info", "stats"), re.M)
            total += int(m.group(1)) if m else 0
        return total

    def start_roundabout(self, v):
        proc, target = super().start_roundabout(v)
        if v == CLUSTER:
            target.aux = [p.pid for _, p in self.nodes]
            target.aux_stats = self.cluster_reads
        return proc, target

    def measure_variant(self, v):
        super().measure_variant(v)
        if v == CLUSTER:
            held = [self.cli(port, "dbsize").strip() for port, _ in self.nodes]
            run.log(f"cluster nodes hold {' + '.join(held)} keys (masters' counters, "
                    "replicated to their replicas)")

    def report(self):
        super().report()
        table = run.Table(self.bench.runs, self.variants, self.labels, {}, self.idle, self.cmax)
        lines = [s for c in self.conns if (s := table.compare(CLUSTER, "rl-redis-xff", c))]
        if lines:
            text = "\nRedis Cluster (3 masters) / one Redis, limiter on, 10,000 client IPs:\n"
            text += "".join(f"    {s}\n" for s in lines)
            print(text, end="", flush=True)
            with open(self.tmp / "table.md", "a") as f:
                f.write(text)


def main():
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, run.on_signal)
    run.Session = Session
    sys.argv = [sys.argv[0], "cluster"]
    return run.entry()


if __name__ == "__main__":
    sys.exit(main())
