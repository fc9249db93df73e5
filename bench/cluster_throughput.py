"""generate pairs/s on a two-node local Ray cluster (head 1 CPU + node 1 CPU) ÷ one node with 2 CPUs, both
joined with `generate --address`; then the per-NFE cost of a CIFAR-size DDPM++ teacher (FLOPs counted, CPU
time measured) and a projection of wall time for 1M CIFAR pairs at 35 NFE on N GPUs.

Also home of `LocalCluster`, the multi-node Ray cluster on one machine that tests/test_ray_cluster.py uses.
"""

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


SHARDS, PER_SHARD, BATCH, STEPS = 16, 10000, 1000, 18     # as bench/generate_throughput.py
REPEATS = 2
CIFAR_PAIRS, CIFAR_NFE, NET_BATCH, FORWARDS = 1_000_000, 35, 64, 2     # ~30 s a forward here
# NVIDIA A100 datasheet peaks (dense): FP32 19.5 TFLOP/s; TF32 tensor cores 156 TFLOP/s, which PyTorch uses for
# cuDNN convolutions by default. Utilisation is our assumption for a 32×32 U-Net at large batch: its convolutions
# have few pixels per channel and GroupNorm/attention are memory-bound, so well under half of peak.
GPU_ASSUMPTIONS = {"A100, TF32 convs, 25% of 156 TFLOP/s": 156e12 * 0.25,
                   "A100, strict FP32, 50% of 19.5 TFLOP/s": 19.5e12 * 0.50}
# A cross-check from EDM's README: its CIFAR-10 DDPM++ nets trained 200 Mimg in ~2 days on 8 V100s (FP32);
# a training image costs ~3 forwards.
EDM_TRAINING = dict(images=200e6, forwards_per_image=3, gpus=8, seconds=2 * 86400)


def generate_pairs_per_s(nodes: list[int]) -> float:
    """generate pairs/s with one Ray node per entry of `nodes` (its CPUs), 2 workers × 1 thread in all."""
    from kdm_pipe.config import GenerateConfig
    from stages import generate

    with LocalCluster() as cluster:
        for cpus in nodes:
            cluster.add_node(cpus)
        out = tempfile.mkdtemp()
        try:
            cfg = GenerateConfig(out=out, shards=SHARDS, pairs_per_shard=PER_SHARD, batch=BATCH,
                                 sampler={"steps": STEPS}, workers=2, threads_per_worker=1, cpus_per_worker=1,
                                 address=cluster.address)
            t = time.perf_counter()      # includes connecting the driver and starting workers, as a real run does
            generate.run(cfg, progress=False)
            return SHARDS * PER_SHARD / (time.perf_counter() - t)
        finally:
            shutil.rmtree(out)


def ddpmpp_cost() -> tuple[int, float, float]:
    """(parameters, FLOPs per image per NFE, CPU seconds per image per NFE) of EDM's CIFAR-10 VP teacher."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdm_pipe.networks import ARCHITECTURES, build_network

    torch.manual_seed(0)
    net = build_network("VPPrecond", img_resolution=32, img_channels=3, **ARCHITECTURES["ddpmpp"], dropout=0.13,
                        augment_dim=9).eval()
    x, sigma = 80 * torch.randn(NET_BATCH, 3, 32, 32), torch.full((NET_BATCH,), 80.0)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            net(x, sigma)
        t = time.perf_counter()
        for _ in range(FORWARDS):
            net(x, sigma)
        seconds = time.perf_counter() - t
    return (sum(p.numel() for p in net.parameters()), counter.get_total_flops() / NET_BATCH,
            seconds / (FORWARDS * NET_BATCH))


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


if __name__ == "__main__":
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores; other jobs on the machine skew every number)")
    layouts = {"1 node × 2 CPUs": [2], "2 nodes × 1 CPU": [1, 1]}
    runs: dict[str, list[float]] = {k: [] for k in layouts}
    for i in range(REPEATS):                  # order A B B A …: drift and warm caches favour neither layout
        for name in (list(layouts) if i % 2 == 0 else reversed(layouts)):
            runs[name].append(generate_pairs_per_s(layouts[name]))
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"generate, {k}: {mean[k]:10,.0f} pairs/s   (runs: {', '.join(f'{r:,.0f}' for r in v)})")
    print(f"2 nodes ÷ 1 node at equal cores: {mean['2 nodes × 1 CPU'] / mean['1 node × 2 CPUs']:.2f}")

    import torch
    torch.set_num_threads(2)
    params, flops, cpu_s = ddpmpp_cost()
    work = CIFAR_PAIRS * CIFAR_NFE * flops
    print(f"\nDDPM++ CIFAR-10 (VPPrecond): {params / 1e6:.1f}M parameters, {flops / 1e9:.2f} GFLOP per image per NFE")
    print(f"this CPU, 2 threads, batch {NET_BATCH}: {cpu_s * 1e3:.1f} ms per image per NFE "
          f"({flops / cpu_s / 1e9:.0f} GFLOP/s); {CIFAR_PAIRS:,} pairs × {CIFAR_NFE} NFE here: "
          f"{CIFAR_PAIRS * CIFAR_NFE * cpu_s / 86400:,.0f} days")
    print(f"{CIFAR_PAIRS:,} pairs × {CIFAR_NFE} NFE = {work / 1e15:,.0f} PFLOP; wall time on N GPUs "
          f"(perfect scaling over shards):")
    e = EDM_TRAINING
    implied = e["images"] * e["forwards_per_image"] * flops / (e["gpus"] * e["seconds"])
    print(f"  (EDM's CIFAR training record implies {implied / 1e12:.1f} TFLOP/s per V100, FP32 peak 15.7: cuDNN's "
          f"Winograd convolutions do fewer FLOPs than counted here)")
    for name, rate in GPU_ASSUMPTIONS.items():
        print(f"  {name} = {rate / 1e12:.1f} TFLOP/s effective: " +
              ", ".join(f"N={n}: {hours(work / (n * rate))}" for n in (1, 8, 32, 128)))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
