import os

# Ray writes no auth token into $HOME and reports nothing; must be set before any Ray process starts.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")      # as kdm_pipe.raypool does for its private clusters

import torch  # noqa: E402

# Two cores shared by the test process and any Ray workers: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


import pytest  # noqa: E402


def make_pairs(out, **kw):
    """Real pairs through the real generate stage (a private 2-CPU Ray session)."""
    import ray

    from kdm_pipe.config import GenerateConfig
    from stages import generate
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        generate.run(GenerateConfig.model_validate({"out": out, **kw}), progress=False)
    finally:
        ray.shutdown()
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A private 2-CPU Ray session for one test module (`pytestmark = pytest.mark.usefixtures("ray_cluster")`)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digit_pairs(tmp_path_factory):
    """3 shards × 64 image pairs from the shipped digits teacher (3 Heun steps: fast, still digit-like)."""
    return make_pairs(tmp_path_factory.mktemp("digits"), teacher={"name": "digits"}, shards=3, pairs_per_shard=64,
                      batch=32, sampler={"steps": 3})


@pytest.fixture(scope="session")
def vector_pairs(tmp_path_factory):
    """5 shards × 1000 checkerboard pairs."""
    return make_pairs(tmp_path_factory.mktemp("board"), shards=5, pairs_per_shard=1000, batch=500)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's standalone server) on a free loopback port for the whole session. The standard
    AWS variables point every process started afterwards at it: CLI subprocesses and Ray workers (module-scoped Ray
    clusters start after this session-scoped fixture)."""
    from infra import moto_server

    try:
        proc, env = moto_server()
    except RuntimeError as e:
        pytest.fail(str(e))
    url = env["AWS_ENDPOINT_URL"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the S3 server: its s3:// URL."""
    import uuid

    import s3fs
    name = f"kdm-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def assert_resume_is_exact(cfg_at, root, steps: int, stop: int, parts=("model", "ema")) -> dict:
    """Train `cfg_at(root / "full", steps)` in one go, and `cfg_at(root / "half", stop)` then `--resume` to `steps`:
    the two final checkpoints must hold the same step and bit-equal `parts`. Returns the uninterrupted one."""
    from kdm_pipe.trained import latest_checkpoint
    from kdm_pipe.training import train
    train(cfg_at(root / "full", steps), progress=False)
    train(cfg_at(root / "half", stop), progress=False)
    train(cfg_at(root / "half", steps), resume=True, progress=False)
    a, b = (torch.load(latest_checkpoint(root / n), weights_only=True) for n in ("full", "half"))
    assert a["step"] == b["step"] == steps
    for part in parts:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    return a
