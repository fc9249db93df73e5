"""Local infrastructure the tests and benchmarks start on this one machine: a multi-node Ray cluster
(`LocalCluster`) and a real S3 API server (`moto_server`), each on free loopback ports and private to its starter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# The GCS declares a node dead after `threshold` failed health checks `period` apart: 5 × 3 s by default,
# 3 × 0.5 s here. Tasks are retried sooner (the owner sees its worker die); this only speeds up the verdict.
FAST_FAILURE_DETECTION = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                          "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ticks_since_boot() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid → (parent pid, process group, command name, start tick) of every process here, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:                       # exited while we looked
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), int(fields[2]), comm, int(fields[19]))
    return table


class LocalCluster:
    """Ray nodes started with `ray start` on this machine, private to whoever started them.

    Other Ray users here are left alone: a temp dir of our own (so their `ray.init()` never finds this cluster
    through /tmp/ray/ray_current_cluster), free ports instead of Ray's fixed defaults (6379, 8265, 52365), and
    `stop` kills only the process groups this object started, where `ray stop` kills every Ray process here.
    """

    def __init__(self, object_store_mb: int = 100, env: dict[str, str] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="kdmc-", dir="/tmp"))    # short: Ray's socket paths must fit 107 bytes
        self.store = object_store_mb * 1024**2
        self.env = {**os.environ, **RAY_ENV, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.address: str | None = None
        self.groups: list[int] = []           # one process group per node (its `ray start`'s), head first
        self.born = ticks_since_boot()        # older processes are never ours, whatever pid they reuse

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> int:
        """Start a node (the first one is the head); returns its index."""
        i = len(self.groups)
        args = [RAY, "start", "--num-cpus", str(num_cpus), "--object-store-memory", str(self.store),
                "--temp-dir", str(self.root / f"node{i}"), "--node-ip-address", "127.0.0.1",
                "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        if self.address is None:
            port = free_port()
            args += ["--head", "--port", str(port), "--include-dashboard", "false",
                     "--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        # A new session makes the `ray start` process a group leader; the daemons it leaves behind keep its group.
        p = subprocess.Popen(args, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.groups.append(p.pid)
        log = p.communicate(timeout=120)[0]
        if p.returncode:
            raise RuntimeError(f"`{' '.join(args)}` failed:\n{log}")
        if self.address is None:
            self.address = f"127.0.0.1:{port}"
        return i

    def pids(self, node: int) -> list[int]:
        """The node's daemons and their descendants (Ray workers start their own process groups)."""
        table = {pid: row for pid, row in proc_table().items() if row[3] >= self.born}
        found = {pid for pid, row in table.items() if row[1] == self.groups[node]}
        grew = True
        while grew:
            more = {pid for pid, row in table.items() if row[0] in found} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    def raylet_pid(self, node: int) -> int:
        table = proc_table()
        (pid,) = [p for p in self.pids(node) if p in table and table[p][2] == "raylet"]
        return pid

    def kill_raylet(self, node: int) -> None:
        """Lose a node the hard way: SIGKILL its raylet, as a crashed machine would."""
        os.kill(self.raylet_pid(node), signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(range(len(self.groups))):
            for pid in self.pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def moto_server(**env: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's standalone S3 server on a free loopback port (with `env` in its environment), and the AWS variables
    that point a process (and the processes it starts: CLI subprocesses, Ray workers) at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's S3 server did not start on {url}") from None
            time.sleep(0.2)
    return proc, {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
