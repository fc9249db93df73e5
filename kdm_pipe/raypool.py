"""Ray plumbing shared by the stages: one cluster session and a bounded stream of tasks."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import ray


@contextmanager
def ray_session(address: str | None, num_cpus: float, num_gpus: float = 0) -> Iterator[None]:
    """Connect to `address`, or start a local cluster sized for the job; shut down what we started."""
    if ray.is_initialized():                     # a caller (a test, a notebook) already owns the session
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")     # set inside a RayJob / a Ray cluster's containers
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A private single-machine cluster: no auth token written to $HOME, no usage reporting, no dashboard.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(1, int(round(num_cpus))), num_gpus=int(num_gpus) if num_gpus else None,
                 include_dashboard=False, object_store_memory=256 * 1024 * 1024, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def run_bounded(remote_fn: Any, calls: list[tuple], max_in_flight: int) -> Iterator[Any]:
    """Submit `remote_fn.remote(*args)` for each call with at most `max_in_flight` pending; yield results as they finish.

    Bounding keeps the driver's memory and the object store flat for any number of shards.
    """
    pending, queue = [], list(calls)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            pending.append(remote_fn.remote(*queue.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def remote(fn: Callable, num_cpus: float, num_gpus: float = 0, max_retries: int = 3) -> Any:
    """`fn` as a Ray task; tasks whose worker or node dies are retried (system failures only, not exceptions)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(fn)
